#!/usr/bin/env bash
# The main job: a local cluster on this machine with the real servers.
#   deploy/local/cluster.sh            # Redis + Cassandra + one chat-node, in the foreground
# It starts the servers (servers.sh), builds chat-node (release), starts the node against the
# CQL store, waits until /readyz answers 200, prints where to connect, and runs until Ctrl-C
# or SIGTERM. Then it stops the node gracefully and the servers it started (set
# CHAT_KEEP_SERVERS=1 to leave them up).
#
# One node for now: without the router (next issue) nothing assigns rooms to nodes, and two
# nodes accepting the same room would each order it separately.
#
# Environment (optional): CHAT_NODE_PORT (7001); CHAT_JWT_SECRET (HS256 auth; without it
# the node runs in insecure dev auth: ?user=NAME); any other CHAT_* node flag (see
# deploy/OPERATIONS.md) is passed through by chat-node itself; servers.sh settings apply.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
servers=$here/servers.sh
state=${CHAT_STATE_DIR:-$here/.state}
port=${CHAT_NODE_PORT:-7001}
mkdir -p "$state"

started=$(mktemp "${TMPDIR:-/tmp}/chat-cluster-started.XXXXXX")
node_pid=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $node_pid ]] && kill -0 "$node_pid" 2>/dev/null; then
        echo "[cluster] stopping chat-node (SIGTERM, graceful)" >&2
        kill -TERM "$node_pid" 2>/dev/null || true
        wait "$node_pid" 2>/dev/null || true
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

echo "[cluster] building chat-node (release)" >&2
(cd "$repo" && cargo build --release -q -p chat-node)

auth=(--insecure-dev-auth)
if [[ -n ${CHAT_JWT_SECRET:-} ]]; then
    auth=()
fi
log=$state/chat-node-0.log
"$repo/target/release/chat-node" --listen "127.0.0.1:$port" --node-id 0 \
    --store scylla --cql-nodes "$CHAT_CQL_NODES" "${auth[@]}" >"$log" 2>&1 &
node_pid=$!

deadline=$((SECONDS + 60))
until curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$node_pid" 2>/dev/null; then
        echo "[cluster] chat-node exited; last lines of $log:" >&2
        tail -n 40 "$log" >&2
        node_pid=
        exit 1
    fi
    if ((SECONDS > deadline)); then
        echo "[cluster] chat-node not ready within 60 s; last lines of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    sleep 0.2
done

user_hint="&user=alice"
[[ ${#auth[@]} -eq 0 ]] && user_hint="&token=<JWT signed with CHAT_JWT_SECRET>"
cat <<INFO
[cluster] ready
  WebSocket : ws://127.0.0.1:$port/ws?room=lobby$user_hint
  HTTP API  : http://127.0.0.1:$port/v1/rooms/lobby/messages
  health    : http://127.0.0.1:$port/healthz  /readyz
  metrics   : http://127.0.0.1:$port/metrics
  store     : CQL at $CHAT_CQL_NODES (keyspace chat)   Redis: $CHAT_REDIS_URL (used from the cross-shard issue on)
  node log  : $log
Ctrl-C stops the node and the servers this run started.
INFO
wait "$node_pid"
