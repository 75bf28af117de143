#!/usr/bin/env bash
# The main job: a local cluster on this machine with the real servers.
#   deploy/local/cluster.sh
# It starts Redis and Cassandra (servers.sh), builds chat-node and chat-router (release),
# starts three nodes (ids 1-3) that register in Redis, and one router in front of them;
# waits until the router's ring holds every node; prints where to connect; and runs until
# Ctrl-C or SIGTERM. Then it stops the router and the nodes gracefully, and the servers it
# started (CHAT_KEEP_SERVERS=1 leaves those up).
#
# Environment (optional): CHAT_NODES (3), CHAT_ROUTER_PORT (7000), CHAT_NODE_BASE_PORT
# (7001: nodes listen on 7001, 7002, ...); CHAT_JWT_SECRET (HS256 auth; without it nodes run
# in insecure dev auth: ?user=NAME). Other CHAT_* flags are read by the binaries themselves
# (deploy/OPERATIONS.md); servers.sh settings apply.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
servers=$here/servers.sh
state=${CHAT_STATE_DIR:-$here/.state}
nodes=${CHAT_NODES:-3}
router_port=${CHAT_ROUTER_PORT:-7000}
base_port=${CHAT_NODE_BASE_PORT:-7001}
mkdir -p "$state"

started=$(mktemp "${TMPDIR:-/tmp}/chat-cluster-started.XXXXXX")
pids=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#pids[@]})); then
        echo "[cluster] stopping router and nodes (SIGTERM, graceful)" >&2
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    if [[ ${CHAT_KEEP_SERVERS:-0} != 1 && -s $started ]]; then
        # shellcheck disable=SC2046
        "$servers" stop $(sort -u "$started") || true
    fi
    rm -f "$started"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

CHAT_SERVERS_STARTED_FILE=$started "$servers" start
eval "$("$servers" env)"

echo "[cluster] building chat-node and chat-router (release)" >&2
(cd "$repo" && cargo build --release -q -p chat-node -p chat-router)
bin=$repo/target/release

auth=(--insecure-dev-auth)
[[ -n ${CHAT_JWT_SECRET:-} ]] && auth=()

# wait_ready NAME URL PID LOG: poll URL until it answers 200, for at most 60 s.
wait_ready() {
    local name=$1 url=$2 pid=$3 log=$4 deadline=$((SECONDS + 60))
    until curl -fsS "$url" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "[cluster] $name exited; last lines of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
        if ((SECONDS > deadline)); then
            echo "[cluster] $name not ready within 60 s; last lines of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

for ((i = 1; i <= nodes; i++)); do
    port=$((base_port + i - 1))
    log=$state/chat-node-$i.log
    "$bin/chat-node" --listen "127.0.0.1:$port" --node-id "$i" --store scylla \
        --cql-nodes "$CHAT_CQL_NODES" --redis-url "$CHAT_REDIS_URL" "${auth[@]}" >"$log" 2>&1 &
    pids+=($!)
    wait_ready "chat-node $i" "http://127.0.0.1:$port/readyz" "$!" "$log"
done
log=$state/chat-router.log
"$bin/chat-router" --listen "127.0.0.1:$router_port" --redis-url "$CHAT_REDIS_URL" >"$log" 2>&1 &
pids+=($!)
router_pid=$!
wait_ready "chat-router" "http://127.0.0.1:$router_port/readyz" "$router_pid" "$log"
deadline=$((SECONDS + 30))
until [[ $(curl -fsS "http://127.0.0.1:$router_port/readyz" | grep -o '"ring_size":[0-9]*' | cut -d: -f2) == "$nodes" ]]; do
    ((SECONDS > deadline)) && { echo "[cluster] the router's ring never reached $nodes nodes" >&2; exit 1; }
    sleep 0.2
done

user_hint="&user=alice"
[[ ${#auth[@]} -eq 0 ]] && user_hint="&token=<JWT signed with CHAT_JWT_SECRET>"
cat <<INFO
[cluster] ready: 1 router, $nodes nodes, Redis $CHAT_REDIS_URL, CQL $CHAT_CQL_NODES (keyspace chat)
  WebSocket : ws://127.0.0.1:$router_port/ws?room=lobby$user_hint
  HTTP API  : http://127.0.0.1:$router_port/v1/rooms/lobby/messages
  owner     : http://127.0.0.1:$router_port/v1/rooms/lobby/owner
  health    : http://127.0.0.1:$router_port/healthz  /readyz
  metrics   : router http://127.0.0.1:$router_port/metrics, nodes http://127.0.0.1:$base_port/metrics ...
  logs      : $state/chat-router.log, $state/chat-node-*.log
Ctrl-C stops the cluster and the servers this run started.
INFO
wait "${pids[@]}"
