# Sourced by the *-runs.sh scripts: starting a local 3-node cluster, stopping the processes
# a run started (the caller's `started` array of pids: TERM, up to 30 s, then KILL) and
# waiting for a URL to answer 200.
stop_started() {
    local p
    for p in "${started[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${started[@]}"; do
        for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    started=()
}
ready() { # URL: waits up to 30 s for a 200
    for _ in $(seq 300); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "not ready: $1" >&2
    exit 1
}
# start_cluster BIN PREFIX KEYSPACE LOGNAME [NODE_FLAG...]: three chat-nodes (7201-7203) and a
# chat-router (7200) from BIN on the servers servers.sh exported, each waited for; sets
# `pids` to chat-bench's --server-pids value.
start_cluster() {
    local bin=$1 prefix=$2 keyspace=$3 log=$4 i
    shift 4
    pids=
    for i in 1 2 3; do
        "$bin/chat-node" --listen "127.0.0.1:$((7200 + i))" --node-id "$i" --insecure-dev-auth \
            --cql-nodes "$CHAT_CQL_NODES" --cql-keyspace "$keyspace" \
            --redis-url "$CHAT_REDIS_URL" --redis-prefix "$prefix" "$@" \
            >"/tmp/$log-node-$i.log" 2>&1 &
        started+=($!)
        pids+="node$i=$!,"
        ready "http://127.0.0.1:$((7200 + i))/readyz"
    done
    "$bin/chat-router" --listen 127.0.0.1:7200 --redis-url "$CHAT_REDIS_URL" --redis-prefix "$prefix" \
        >"/tmp/$log-router.log" 2>&1 &
    started+=($!)
    pids+="router=$!"
    ready http://127.0.0.1:7200/readyz
    sleep 2
}
