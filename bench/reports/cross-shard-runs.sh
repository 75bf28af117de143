#!/usr/bin/env bash
# Cross-shard cost runs: the same cross-shard shapes against a given set of binaries, with the
# cluster cost accounting on. Starts its own Redis (a private redis-server on 6391 with
# servers.sh's flags, so nobody else's traffic lands in INFO's counters and nobody's Redis
# restart breaks the run; CROSS_SHARD_REDIS_URL=redis://... uses that one instead) and, per run,
# a fresh cluster (router 7100, nodes 7101.., memory store, presence off, Redis prefix
# i12-<suffix>), then stops everything it started.
#   bench/reports/cross-shard-runs.sh BIN_DIR SUFFIX [SHAPE...]
# BIN_DIR holds chat-node, chat-router, chat-bench. SUFFIX names the outputs:
#   $OUT/cross-shard-SUFFIX-<shape>.{md,json} (OUT defaults to /work/wt-bench/bench/reports).
# Shapes: 100x10hz 200x2.5hz 400x0.625hz 100rooms-10x1hz 100x10hz-1node (default: all).
# Before each run it waits (up to QUIET_WAIT s, 300) for the machine to be quiet (under 0.35
# of a core busy over 3 s), and writes $OUT/cross-shard-SUFFIX-<shape>.machine.txt: the CPU the
# whole machine used during the bench's run, ours (servers + bench) and everyone else's.
# Environment: OUT, DURATION (20), QUIET_WAIT (300), CROSS_SHARD_REDIS_URL, ROUTER_PORT (7100), NODE_BASE_PORT (7101),
#   REPO (/work/wt-bench: the bench runs there, so its reports carry that checkout's git rev;
#   point it at the checkout the binaries were built from).
set -euo pipefail

bin=$(cd "${1:?BIN_DIR}" && pwd)
suffix=${2:?SUFFIX}
shift 2
shapes=("$@")
((${#shapes[@]})) || shapes=(100x10hz 200x2.5hz 400x0.625hz 100rooms-10x1hz 100x10hz-1node)
out=${OUT:-/work/wt-bench/bench/reports}
duration=${DURATION:-20}
router_port=${ROUTER_PORT:-7100}
base_port=${NODE_BASE_PORT:-7101}
state=/tmp/meas/state-$suffix
mkdir -p "$out" "$state"
for b in chat-node chat-router chat-bench; do
    [[ -x $bin/$b ]] || { echo "no $bin/$b" >&2; exit 64; }
done

started=()   # pids this script started, stopped on exit
redis_pid=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_cluster
    if [[ -n $redis_pid ]]; then
        kill -TERM "$redis_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$redis_pid" 2>/dev/null || break; sleep 0.1; done
    fi
    exit "$rc"
}
# shellcheck source=runs-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/runs-lib.sh"
stop_cluster() {
    stop_started
    rm -f "$state"/pids/*.pid
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${CROSS_SHARD_REDIS_URL:-} ]]; then
    redis_url=$CROSS_SHARD_REDIS_URL
else
    redis_port=6391
    if redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
        echo "port $redis_port already answers: stop that Redis or set CROSS_SHARD_REDIS_URL" >&2
        exit 1
    fi
    mkdir -p "$state/redis"
    redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$state/redis" \
        --daemonize no --logfile "$state/redis.log" --save '' --appendonly no </dev/null &
    redis_pid=$!
    for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$redis_port" ping >/dev/null
    redis_url=redis://127.0.0.1:$redis_port
fi
prefix=i12-$suffix
hz=$(getconf CLK_TCK)

# busy_ticks: CPU ticks used by every process so far, with the reaped children of each
# (utime stime cutime cstime): a process that exits between two reads moves into its
# parent's cutime/cstime, so the difference of two reads is what ran in between. (The
# /proc/stat cpu line is tick-sampled and undercounts short network bursts on this VM.)
busy_ticks() { sed 's/^.*) //' /proc/[0-9]*/stat 2>/dev/null | awk '{t += $12 + $13 + $14 + $15} END {print t}'; }
# pid_ticks PID...: utime+stime of these processes (0 for one that is gone).
pid_ticks() {
    local p t=0 f
    for p in "$@"; do
        f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        set -- $f
        t=$((t + ${12} + ${13}))
    done
    echo "$t"
}
wait_quiet() {
    local deadline=$((SECONDS + ${QUIET_WAIT:-300})) b0 b1 busy
    while :; do
        b0=$(busy_ticks); sleep 3; b1=$(busy_ticks)
        busy=$(awk -v d=$((b1 - b0)) -v hz="$hz" 'BEGIN{printf "%.2f", d / hz / 3}')
        if awk -v b="$busy" 'BEGIN{exit !(b < 0.35)}'; then
            echo "[cross-shard] machine quiet: $busy cores busy over 3 s" >&2
            return 0
        fi
        if ((SECONDS > deadline)); then
            echo "[cross-shard] machine still busy ($busy cores) after ${QUIET_WAIT:-300} s; running anyway" >&2
            return 0
        fi
        sleep 5
    done
}

# wait_url URL [JQ-ish grep]: until it answers 200 (and contains PATTERN), at most 30 s.
wait_url() {
    local url=$1 pattern=${2:-} deadline=$((SECONDS + 30))
    until body=$(curl -fsS "$url" 2>/dev/null) && [[ -z $pattern || $body == *"$pattern"* ]]; do
        ((SECONDS > deadline)) && { echo "not ready: $url ${pattern:+($pattern)}" >&2; return 1; }
        sleep 0.2
    done
}

start_cluster() {
    local nodes=$1 i port
    local logs=$state/logs/$2
    mkdir -p "$state/pids" "$logs"
    for ((i = 1; i <= nodes; i++)); do
        port=$((base_port + i - 1))
        "$bin/chat-node" --listen "127.0.0.1:$port" --node-id "$i" --store memory \
            --presence false --redis-url "$redis_url" --redis-prefix "$prefix" \
            --insecure-dev-auth >"$logs/chat-node-$i.log" 2>&1 &
        started+=($!)
        echo $! >"$state/pids/chat-node-$i.pid"
        wait_url "http://127.0.0.1:$port/readyz"
    done
    "$bin/chat-router" --listen "127.0.0.1:$router_port" --redis-url "$redis_url" \
        --redis-prefix "$prefix" >"$logs/chat-router.log" 2>&1 &
    started+=($!)
    echo $! >"$state/pids/chat-router.pid"
    wait_url "http://127.0.0.1:$router_port/readyz" "\"ring_size\":$nodes"
}

for shape in "${shapes[@]}"; do
    case $shape in
    100x10hz) nodes=3 flags=(--rooms 1 --members 100 --rate 10) ;;
    200x2.5hz) nodes=3 flags=(--rooms 1 --members 200 --rate 2.5) ;;
    400x0.625hz) nodes=3 flags=(--rooms 1 --members 400 --rate 0.625) ;;
    100rooms-10x1hz) nodes=3 flags=(--rooms 100 --members 10 --rate 1) ;;
    100x10hz-1node) nodes=1 flags=(--rooms 1 --members 100 --rate 10) ;;
    *) echo "unknown shape $shape" >&2; exit 64 ;;
    esac
    wait_quiet
    echo "[cross-shard] $shape: $nodes node(s), $(cat /proc/loadavg)" >&2
    start_cluster "$nodes" "$shape"
    sleep 2
    name=$out/cross-shard-$suffix-$shape
    ours=("${started[@]}")
    [[ -n $redis_pid ]] && ours+=("$redis_pid")
    b0=$(busy_ticks); p0=$(pid_ticks "${ours[@]}"); w0=$EPOCHREALTIME
    TIMEFORMAT='%U %S'
    { time (cd "${REPO:-/work/wt-bench}" && "$bin/chat-bench" cross-shard \
        --url "ws://127.0.0.1:$router_port" "${flags[@]}" --duration "$duration" \
        --redis-url "$redis_url" --pid-dir "$state/pids" --quiet \
        --markdown "$name.md" --json "$name.json" >/dev/null) ; } 2>"$state/time"
    b1=$(busy_ticks); p1=$(pid_ticks "${ours[@]}"); w1=$EPOCHREALTIME
    read -r bu bs <"$state/time"
    awk -v b=$((b1 - b0)) -v p=$((p1 - p0)) -v bu="$bu" -v bs="$bs" -v hz="$hz" -v w0="$w0" -v w1="$w1" \
        -v shape="$shape" -v r="$redis_pid" 'BEGIN {
        m = b / hz; s = p / hz; c = bu + bs; o = m - s - c; w = w1 - w0
        printf "cross-shard %s: during the bench run (%.1f s wall, connect to close)\n", shape, w
        printf "machine busy  %7.2f CPU-s (%.2f cores)\n", m, m / w
        printf "servers       %7.2f CPU-s (chat-node*, chat-router%s)\n", s, r != "" ? ", redis" : ""
        printf "chat-bench    %7.2f CPU-s\n", c
        printf "everything else %5.2f CPU-s (%.2f cores): other processes on the machine\n", o, o / w
    }' >"$name.machine.txt"
    cat "$name.machine.txt" >&2
    echo "[cross-shard] $shape: wrote $name.{md,json,machine.txt}" >&2
    stop_cluster
    sleep 2
done
