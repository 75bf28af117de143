#!/usr/bin/env bash
# The main job: a local cluster on this machine with the real servers.
#   deploy/local/cluster.sh
# It starts Redis and Cassandra (servers.sh), builds chat-node and chat-router (release),
# starts three nodes (ids 1-3) that register in Redis, and one router in front of them;
# waits until the router's ring holds every node; prints where to connect; and runs until
# Ctrl-C or SIGTERM, starting again any node or router that exits (as a supervisor would;
# deploy/local/rolling-restart.sh relies on it). Then it stops the router and the nodes
# gracefully, and the servers it started (CHAT_KEEP_SERVERS=1 leaves those up).
#
# Environment (optional): CHAT_NODES (3), CHAT_ROUTER_PORT (7000), CHAT_NODE_BASE_PORT
# (7001: nodes listen on 7001, 7002, ...); CHAT_CLUSTER_DIR (deploy/local/.state: logs, pids);
# CHAT_BUILD_PROFILE (release; `dev` reuses the test build); CHAT_JWT_SECRET (HS256 auth; without it nodes run
# in insecure dev auth: ?user=NAME). Other CHAT_* flags are read by the binaries themselves
# (deploy/OPERATIONS.md); servers.sh settings apply.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
servers=$here/servers.sh
state=${CHAT_CLUSTER_DIR:-$here/.state}
nodes=${CHAT_NODES:-3}
router_port=${CHAT_ROUTER_PORT:-7000}
base_port=${CHAT_NODE_BASE_PORT:-7001}
mkdir -p "$state"

started=$(mktemp "${TMPDIR:-/tmp}/chat-cluster-started.XXXXXX")
# Supervisors (one per process, see `supervise`); each process's current pid is in
# $state/<name>.pid.
pids=()
rm -f "$state/stopping" "$state"/chat-*.pid
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#pids[@]})); then
        echo "[cluster] stopping router and nodes (SIGTERM, graceful)" >&2
        touch "$state/stopping"
        local f
        for f in "$state"/chat-router.pid "$state"/chat-node-*.pid; do
            [[ -s $f ]] && kill -TERM "$(cat "$f")" 2>/dev/null
        done
        wait "${pids[@]}" 2>/dev/null || true
        rm -f "$state"/chat-*.pid
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

profile=${CHAT_BUILD_PROFILE:-release}
echo "[cluster] building chat-node and chat-router ($profile)" >&2
(cd "$repo" && cargo build --profile "$profile" -q -p chat-node -p chat-router)
echo "[cluster] building the TypeScript client and the demo page (npm ci from the lockfile)" >&2
(cd "$repo/common/client-ts" && npm ci --no-audit --no-fund --silent && npm run --silent build)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
case $profile in
dev | test) bin=$target_dir/debug ;;
*) bin=$target_dir/$profile ;;
esac

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

# supervise NAME LOG CMD...: runs CMD in the background and starts it again whenever it
# exits, as a process supervisor (systemd, Kubernetes) would, until the cluster stops. The
# current pid is kept in $state/NAME.pid: a SIGTERM to it is a graceful restart (what
# rolling-restart.sh does), a SIGKILL a crash. A process that exits non-zero is restarted
# after a second, so a crash loop does not spin.
supervise() {
    local name=$1 log=$2 child rc
    shift 2
    while :; do
        "$@" >>"$log" 2>&1 &
        child=$!
        echo "$child" >"$state/$name.pid"
        rc=0
        wait "$child" || rc=$?
        [[ -e $state/stopping ]] && break
        echo "[cluster] $name (pid $child) exited with status $rc; starting it again" >&2
        ((rc == 0)) || sleep 1
    done
}

# pid_of NAME: the current pid of a supervised process (waits for the file).
pid_of() {
    local f=$state/$1.pid deadline=$((SECONDS + 10))
    until [[ -s $f ]]; do
        ((SECONDS > deadline)) && { echo "[cluster] no pid file $f" >&2; exit 1; }
        sleep 0.05
    done
    cat "$f"
}

for ((i = 1; i <= nodes; i++)); do
    port=$((base_port + i - 1))
    log=$state/chat-node-$i.log
    : >"$log"
    supervise "chat-node-$i" "$log" "$bin/chat-node" --listen "127.0.0.1:$port" --node-id "$i" \
        --store scylla --cql-nodes "$CHAT_CQL_NODES" --redis-url "$CHAT_REDIS_URL" "${auth[@]}" &
    pids+=($!)
    wait_ready "chat-node $i" "http://127.0.0.1:$port/readyz" "$(pid_of "chat-node-$i")" "$log"
done
log=$state/chat-router.log
: >"$log"
supervise chat-router "$log" "$bin/chat-router" --listen "127.0.0.1:$router_port" \
    --redis-url "$CHAT_REDIS_URL" --serve-demo "$repo/common/client-ts/demo" &
pids+=($!)
wait_ready "chat-router" "http://127.0.0.1:$router_port/readyz" "$(pid_of chat-router)" "$log"
deadline=$((SECONDS + 30))
until [[ $(curl -fsS "http://127.0.0.1:$router_port/readyz" | grep -o '"ring_size":[0-9]*' | cut -d: -f2) == "$nodes" ]]; do
    ((SECONDS > deadline)) && { echo "[cluster] the router's ring never reached $nodes nodes" >&2; exit 1; }
    sleep 0.2
done

user_hint="&user=alice"
demo="http://127.0.0.1:$router_port/demo/ (open it twice, pick a room and a name)"
if [[ ${#auth[@]} -eq 0 ]]; then
    user_hint="&token=<JWT signed with CHAT_JWT_SECRET>"
    demo="off: the demo page uses dev auth (start without CHAT_JWT_SECRET)"
fi
cat <<INFO
[cluster] ready: 1 router, $nodes nodes, Redis $CHAT_REDIS_URL, CQL $CHAT_CQL_NODES (keyspace ${CHAT_CQL_KEYSPACE:-chat})
  demo page : $demo
  WebSocket : ws://127.0.0.1:$router_port/ws?room=lobby$user_hint
  HTTP API  : http://127.0.0.1:$router_port/v1/rooms/lobby/messages
  owner     : http://127.0.0.1:$router_port/v1/rooms/lobby/owner
  health    : http://127.0.0.1:$router_port/healthz  /readyz
  metrics   : router http://127.0.0.1:$router_port/metrics, nodes http://127.0.0.1:$base_port/metrics ...
  logs      : $state/chat-router.log, $state/chat-node-*.log (pids: $state/chat-*.pid)
  restart   : deploy/local/rolling-restart.sh restarts the nodes one at a time
Processes that exit are started again. Ctrl-C stops the cluster and the servers this run started.
INFO
wait "${pids[@]}"
