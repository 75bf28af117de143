#!/usr/bin/env bash
# Rolling restart of the local cluster started by cluster.sh: the nodes one at a time, the
# way an upgrade is rolled out (deploy/OPERATIONS.md "Upgrades: rolling restart").
#   deploy/local/rolling-restart.sh
# For each node: SIGTERM (the node leaves the ring, flushes its rooms to the store and closes
# its clients with 1001; they reconnect through the router to the rooms' new owners and
# resume with `since`), wait for it to exit, let cluster.sh's supervisor start it again with
# the same id and port, wait until it is ready and the router's ring holds every node again
# (it takes its rooms back: their clients get 4001 and resume), then the next node.
# Exit status 0 when every node came back, 1 otherwise (with the node's log tail).
#
# Environment: the same CHAT_CLUSTER_DIR, CHAT_ROUTER_PORT and CHAT_NODE_BASE_PORT as the
# cluster.sh it acts on; CHAT_RESTART_PAUSE (seconds to wait between nodes, default 2);
# CHAT_RESTART_TIMEOUT (seconds each step may take, default 60).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${CHAT_CLUSTER_DIR:-$here/.state}
router_port=${CHAT_ROUTER_PORT:-7000}
base_port=${CHAT_NODE_BASE_PORT:-7001}
pause=${CHAT_RESTART_PAUSE:-2}
timeout=${CHAT_RESTART_TIMEOUT:-60}

log() { echo "[rolling-restart] $(date +%T.%3N) $*" >&2; }

fail() {
    log "$1"
    [[ -n ${2:-} && -f $2 ]] && tail -n 40 "$2" >&2
    exit 1
}

ring_size() {
    curl -fsS "http://127.0.0.1:$router_port/readyz" 2>/dev/null |
        grep -o '"ring_size":[0-9]*' | cut -d: -f2
}

shopt -s nullglob
pidfiles=("$state"/chat-node-*.pid)
((${#pidfiles[@]})) || fail "no node pid files in $state: is deploy/local/cluster.sh running (same CHAT_CLUSTER_DIR)?"
nodes=${#pidfiles[@]}
[[ $(ring_size) == "$nodes" ]] ||
    fail "the router on port $router_port does not hold $nodes nodes in its ring; not starting"

started=$SECONDS
for ((i = 1; i <= nodes; i++)); do
    pidfile=$state/chat-node-$i.pid
    nodelog=$state/chat-node-$i.log
    port=$((base_port + i - 1))
    old=$(cat "$pidfile")
    log "node $i (pid $old, port $port): SIGTERM"
    kill -TERM "$old"
    deadline=$((SECONDS + timeout))
    while kill -0 "$old" 2>/dev/null; do
        ((SECONDS > deadline)) && fail "node $i did not exit within ${timeout}s" "$nodelog"
        sleep 0.1
    done
    log "node $i exited; waiting for the supervisor to start it again"
    deadline=$((SECONDS + timeout))
    until [[ -s $pidfile && $(cat "$pidfile") != "$old" ]] &&
        curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 &&
        [[ $(ring_size) == "$nodes" ]]; do
        ((SECONDS > deadline)) && fail "node $i was not back in the ring within ${timeout}s" "$nodelog"
        sleep 0.1
    done
    log "node $i back (pid $(cat "$pidfile")), ring of $nodes"
    ((i == nodes)) || sleep "$pause"
done
log "restarted $nodes nodes in $((SECONDS - started))s"
