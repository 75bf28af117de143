#!/usr/bin/env bash
# Two builds of the cluster side by side: the same fanout run against 3 nodes and a router
# (CQL store and Redis from deploy/local/servers.sh), alternating A, B, A, B, ...; the
# load generator is A's chat-bench in every run, so only the servers differ.
#   bench/reports/ab-runs.sh NAME BIN_A BIN_B [REPS]
# BIN_A and BIN_B are directories holding chat-node, chat-router (and, in BIN_A,
# chat-bench). Writes bench/reports/NAME-{a,b}-<rep>.{md,json} and prints one line per run.
# Environment: ROOMS (50), MEMBERS (10), RATE (2 msg/s per member), DURATION (30).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$repo/bench/reports
name=$1 bin_a=$2 bin_b=$3 reps=${4:-3}
rooms=${ROOMS:-50} members=${MEMBERS:-10} rate=${RATE:-2} duration=${DURATION:-30}
eval "$("$repo/deploy/local/servers.sh" env)"
started=()
# shellcheck source=runs-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/runs-lib.sh"
stop() { stop_started; }
trap stop EXIT
run() { # LABEL BIN REP
    local label=$1 bin=$2 rep=$3 prefix=ab-$1-$3-$$
    start_cluster "$bin" "$prefix" chat_bench_ab ab
    "$bin_a/chat-bench" fanout --url ws://127.0.0.1:7200 --rooms "$rooms" --members "$members" \
        --rate "$rate" --duration "$duration" --warmup 5 --drain 5 --quiet \
        --room-prefix "$prefix" --server-pids "$pids" \
        --json "$out/$name-$label-$rep.json" --markdown "$out/$name-$label-$rep.md" || true
    stop
}
for rep in $(seq "$reps"); do
    run a "$bin_a" "$rep"
    run b "$bin_b" "$rep"
done
for f in "$out/$name"-[ab]-*.json; do
    python3 - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
a = r["ack_latency_us"]
cost = r.get("cluster_cost") or {}
cpu = sum(p["percent_of_core"] for p in cost.get("processes", []) if p["name"].startswith("node"))
print(f'{sys.argv[1].rsplit("/", 1)[1]}: sends/s {r["throughput"]["sends_per_s"]:.0f}, lost {r["messages"]["lost"]}, '
      f'ack p50 {a["p50"]/1000:.2f} ms p99 {a["p99"]/1000:.2f} ms, node CPU {cpu:.1f} % of a core')
PY
done
