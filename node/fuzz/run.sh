#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a few seconds over its seed corpus; exits 1 if
# any target crashed (a panic, a sanitizer report, a hang past -timeout or a leak).
#
#   node/fuzz/run.sh                 every target, 5 seconds each
#   FUZZ_SECONDS=60 node/fuzz/run.sh
#   node/fuzz/run.sh client_frame    only the named targets
#
# The build is the quick one the test command can afford (FUZZ_BUILD="--dev -s none":
# coverage-guided, unoptimized, no AddressSanitizer, no debuginfo: a cold build took 4.4
# CPU-minutes here, 6 min 11 s on 2 cores shared with a fuzzer).
# Long runs use cargo-fuzz's default, the optimized build with AddressSanitizer:
#   FUZZ_BUILD= FUZZ_SECONDS=3600 node/fuzz/run.sh frame_reader
#
# Needs a nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz if it
# is missing. What the fuzzer finds goes to a temporary directory, not to node/fuzz/corpus (the
# seeds kept in git); a crashing input is kept under node/fuzz/artifacts/<target>/.
set -euo pipefail

# cargo-fuzz works from the fuzzed crate: node/, which holds fuzz/.
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-5}"
read -r -a build <<<"${FUZZ_BUILD---dev -s none}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "node/fuzz/run.sh: a nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# One build for all targets (each `fuzz run` below then finds them built).
if ! cargo +nightly fuzz build "${build[@]}" >"$work/build.log" 2>&1; then
    tail -40 "$work/build.log" >&2
    echo "node/fuzz/run.sh: the fuzz targets do not build" >&2
    exit 1
fi

failed=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    log="$work/$t.log"
    if cargo +nightly fuzz run "${build[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
        cov="$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)"
        echo "fuzz $t: ok, ${runs:-?} runs in ${seconds}s, $cov"
    else
        echo "fuzz $t: FAILED" >&2
        grep -E 'panicked at|ERROR: |SUMMARY: |Test unit written to' -A1 "$log" >&2 || tail -40 "$log" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "node/fuzz/run.sh: crashed: ${failed[*]} (inputs under node/fuzz/artifacts/)" >&2
    exit 1
fi
