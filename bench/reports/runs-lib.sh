# Sourced by the *-runs.sh scripts: stopping the processes a run started (the caller's
# `started` array of pids: TERM, up to 30 s, then KILL) and waiting for a URL to answer 200.
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
