#!/usr/bin/env bash
# The project's test command (README, CI): validate the deployment files (deploy/check.sh:
# promtool, compose/Kubernetes/Grafana structure, metric names; it installs Debian's
# prometheus package when missing, which the Prometheus scrape test also needs), start the
# real servers (or use the ones named by CHAT_REDIS_URL / CHAT_CQL_NODES), export their
# addresses (and CHAT_REDIS_PID / CHAT_CQL_PID for outage tests), run
# `cargo test --workspace "$@"` against them; with no arguments also the TypeScript
# client's tests (common/client-ts: unit, against a local cluster of the binaries just
# built, and in headless Chromium, which it installs from Debian when missing) and each fuzz target for a few seconds over its seed corpus (node/fuzz/run.sh; nightly
# toolchain, installs cargo-fuzz when missing). Stops on exit whatever this run started.
# Exits non-zero when the checks, cargo, the client or a fuzz target failed. With
# -p/--package, --workspace is left out.
#   deploy/local/test.sh                 # whole workspace
#   deploy/local/test.sh -p common       # extra arguments go to cargo test
# CHAT_KEEP_SERVERS=1 leaves the servers running afterwards (faster repeated runs; stop them
# with deploy/local/servers.sh stop). Other settings: see servers.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
servers=$here/servers.sh

started=$(mktemp "${TMPDIR:-/tmp}/chat-servers-started.XXXXXX")
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ ${CHAT_KEEP_SERVERS:-0} != 1 && -s $started ]]; then
        # Stop only the servers this run started, not ones that were already running.
        # shellcheck disable=SC2046
        "$servers" stop $(sort -u "$started") || true
    fi
    rm -f "$started"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

checks=0
"$repo/deploy/check.sh" || checks=$?

# The browser tests drive Debian's Chromium (headless).
if (($# == 0)) && [[ -z ${CHROMIUM:-} ]] && ! command -v chromium >/dev/null 2>&1; then
    echo "[test] chromium not found: installing Debian's chromium package" >&2
    sudo=()
    (($(id -u) == 0)) || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >&2 ||
        echo "[test] could not install chromium: the browser tests will fail" >&2
fi

CHAT_SERVERS_STARTED_FILE=$started "$servers" start
eval "$("$servers" env)"
echo "[test] CHAT_REDIS_URL=$CHAT_REDIS_URL CHAT_CQL_NODES=$CHAT_CQL_NODES" \
    "CHAT_REDIS_PID=${CHAT_REDIS_PID:-} CHAT_CQL_PID=${CHAT_CQL_PID:-}" >&2

cd "$repo"
# `cargo test --workspace -p X` tests the whole workspace, so --workspace is only added when no
# package is selected.
scope=(--workspace)
for arg in "$@"; do
    case $arg in
    --) break ;;
    -p | -p* | --package | --package=*) scope=() ;;
    esac
done
rc=0
cargo test --no-fail-fast "${scope[@]}" "$@" || rc=$?
if (($# == 0)); then
    # The TypeScript client: unit tests, then against a cluster of the binaries cargo just
    # built, on the same servers. npm installs from the committed lockfile.
    (cd common/client-ts && npm ci --no-audit --no-fund && npm test && npm run test:cluster) ||
        { echo "[test] common/client-ts tests failed" >&2; ((rc != 0)) || rc=1; }
    "$repo/node/fuzz/run.sh" || { echo "[test] node/fuzz/run.sh failed" >&2; ((rc != 0)) || rc=1; }
fi
if ((checks != 0)); then
    echo "[test] deploy/check.sh failed (see its summary above)" >&2
    ((rc != 0)) || rc=$checks
fi
exit "$rc"
