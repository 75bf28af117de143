#!/usr/bin/env bash
# What webhooks cost: the same fanout run against a 3-node cluster (CQL store, Redis from
# deploy/local/servers.sh) with webhooks off, on (chat-bench is the endpoint:
# --webhook-sink) and down (the endpoint refuses every connection, so every delivery is
# retried), alternating (off, on, down, off, ...).
#   bench/reports/webhooks-runs.sh [REPS]
# Writes bench/reports/webhooks-{off,on,down}-<rep>.{md,json}. Binaries: target/release (build
# them first: cargo build --release -p chat-node -p chat-router -p chat-bench).
# Environment: ROOMS (50), MEMBERS (10), RATE (2 msg/s per member), DURATION (30).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=$repo/target/release
out=$repo/bench/reports
reps=${1:-2}
rooms=${ROOMS:-50} members=${MEMBERS:-10} rate=${RATE:-2} duration=${DURATION:-30}
eval "$("$repo/deploy/local/servers.sh" env)"
started=()
# shellcheck source=runs-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/runs-lib.sh"
stop() { stop_started; }
trap stop EXIT
run() { # MODE REP
    local mode=$1 rep=$2 prefix=hooks-$1-$2-$$ hook=()
    # Each run's webhooks cover its own rooms only: a "down" run leaves its backlog in the
    # store, which later runs would otherwise pick up and deliver (as they should).
    local hooked=(--webhook-secret bench-webhook-secret-0123 --webhook-rooms "$prefix")
    [[ $mode == on ]] && hook=(--webhook-url http://127.0.0.1:7299/hook "${hooked[@]}")
    [[ $mode == down ]] && hook=(--webhook-url http://127.0.0.1:7298/hook "${hooked[@]}")
    start_cluster "$bin" "$prefix" chat_bench_hooks hooks "${hook[@]}"
    local sink=()
    [[ $mode == on ]] && sink=(--webhook-sink 127.0.0.1:7299)
    "$bin/chat-bench" fanout --url ws://127.0.0.1:7200 --rooms "$rooms" --members "$members" \
        --rate "$rate" --duration "$duration" --warmup 5 --drain 5 --quiet "${sink[@]}" \
        --room-prefix "$prefix" \
        --server-pids "$pids" \
        --json "$out/webhooks-$mode-$rep.json" --markdown "$out/webhooks-$mode-$rep.md" || true
    stop
}
for rep in $(seq "$reps"); do
    run off "$rep"
    run on "$rep"
    run down "$rep"
done
for f in "$out"/webhooks-*-*.json; do
    python3 - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
a, w = r["ack_latency_us"], r.get("webhook")
cost = (r.get("cluster_cost") or {})
cpu = {p["name"]: round(p["percent_of_core"], 1) for p in cost.get("processes", [])}
line = f'{sys.argv[1].rsplit("/", 1)[1]}: sends/s {r["throughput"]["sends_per_s"]:.0f}, lost {r["messages"]["lost"]}, ack p50 {a["p50"]/1000:.2f} ms p99 {a["p99"]/1000:.2f} ms, CPU % {cpu}'
if w:
    line += f', webhook {w["per_second"]:.0f}/s unique {w["unique"]} dup {w["duplicates"]} lag p50 {w["lag_us"]["p50"]/1000:.0f} ms p99 {w["lag_us"]["p99"]/1000:.0f} ms'
print(line)
PY
done
