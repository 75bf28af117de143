#!/usr/bin/env bash
# Start, stop and inspect the real servers the chat cluster needs locally and in CI:
#   * Redis        (Debian's redis-server, installed with apt-get if missing)
#   * a CQL server (Apache Cassandra 5.0.x from Maven Central, one low-memory node)
#
# Usage: deploy/local/servers.sh {start|stop|status|env|clean} [redis|cql]...
#   start   start both (in parallel) unless already running or named by the environment;
#           waits (bounded) until each answers; on failure prints the server log's tail
#   stop    stop only what this script started (pid files): SIGTERM, deadline, SIGKILL
#   status  one line per server; exit 0 if all answer, 3 otherwise
#   env     print `export CHAT_REDIS_URL=...` / `export CHAT_CQL_NODES=...` for eval, plus
#           CHAT_REDIS_PID / CHAT_CQL_PID when the server is ours and running (else `unset`)
#   clean   stop, then delete the state directory (data, logs)
# With component names (redis, cql) after start/stop/status, only those are handled.
#
# Environment (all optional):
#   CHAT_REDIS_URL        use this Redis instead of starting one (must answer PING)
#   CHAT_CQL_NODES        comma-separated host:port list; use these instead of starting Cassandra
#                         (a value equal to our own address, e.g. left over from `eval env`,
#                         means our own server)
#   CHAT_REDIS_PORT       port of our Redis (6390)
#   CHAT_CQL_PORT         CQL port of our Cassandra (9042); CHAT_CQL_STORAGE_PORT (17000: 7000 is the router's)
#   CHAT_CQL_HEAP         max heap of our Cassandra (1g)
#   CHAT_CASSANDRA_VERSION  cassandra-all version fetched from Maven Central (5.0.8)
#   CHAT_CACHE_DIR        downloaded jars ($HOME/.cache/chat-cluster)
#   CHAT_STATE_DIR        data, logs, pid files (deploy/local/.state)
#   CHAT_JAVA             java binary for Cassandra (default: the first JDK 17 or 11 found)
#   CHAT_REDIS_TIMEOUT, CHAT_CQL_TIMEOUT, CHAT_FETCH_TIMEOUT, CHAT_APT_TIMEOUT,
#   CHAT_STOP_TIMEOUT     deadlines in seconds (30, 180, 900, 600, 60)
#   CHAT_SERVERS_STARTED_FILE  if set, `start` appends the name of each server it actually
#                         started (redis, cql) to this file (test.sh uses it)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE_DIR=${CHAT_STATE_DIR:-$SCRIPT_DIR/.state}
CACHE_DIR=${CHAT_CACHE_DIR:-${HOME:-/root}/.cache/chat-cluster}

REDIS_PORT=${CHAT_REDIS_PORT:-6390}
CQL_PORT=${CHAT_CQL_PORT:-9042}
CQL_STORAGE_PORT=${CHAT_CQL_STORAGE_PORT:-17000}
CQL_HEAP=${CHAT_CQL_HEAP:-1g}
CASSANDRA_VERSION=${CHAT_CASSANDRA_VERSION:-5.0.8}
DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1

REDIS_TIMEOUT=${CHAT_REDIS_TIMEOUT:-30}
CQL_TIMEOUT=${CHAT_CQL_TIMEOUT:-180}
FETCH_TIMEOUT=${CHAT_FETCH_TIMEOUT:-900}
APT_TIMEOUT=${CHAT_APT_TIMEOUT:-600}
STOP_TIMEOUT=${CHAT_STOP_TIMEOUT:-60}

OUR_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}"
OUR_CQL_NODES="127.0.0.1:${CQL_PORT}"

REDIS_DIR=$STATE_DIR/redis
REDIS_PID=$STATE_DIR/redis.pid
REDIS_LOG=$STATE_DIR/redis.log
CQL_DIR=$STATE_DIR/cassandra
CQL_PID=$STATE_DIR/cassandra.pid
CQL_LOG=$STATE_DIR/cassandra.log
CQL_YAML=$STATE_DIR/cassandra.yaml
CQL_LOGBACK=$STATE_DIR/cassandra-logback.xml
CQL_HOME=$CACHE_DIR/cassandra-$CASSANDRA_VERSION
CQL_LIB=$CQL_HOME/lib
CQL_MARKER=$CQL_HOME/.complete
# Part of our Cassandra's command line: identifies the process as ours (see pid_of).
CQL_MARK="-Dchat.state.dir=$STATE_DIR"

log() { printf '[%s] %s\n' "$1" "${*:2}" >&2; }
die() { log "$1" "ERROR: ${*:2}"; exit 1; }
now() { date +%s; }

# Print the last lines of a log file, for failures.
tail_log() {
    local name=$1 file=$2
    if [[ -s $file ]]; then
        log "$name" "---- last 40 lines of $file ----"
        tail -n 40 "$file" | sed "s/^/[$name]   /" >&2
        log "$name" "---- end of $file ----"
    else
        log "$name" "(log $file is empty or missing)"
    fi
}

# tcp_open HOST PORT: true if a TCP connection succeeds within 2 s.
tcp_open() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# pid_of PIDFILE PATTERN: print the pid if the file names a live process whose command line
# contains PATTERN (guards against pid reuse); otherwise remove a stale file and fail.
pid_of() {
    local file=$1 pattern=$2 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"; then
        echo "$pid"
        return 0
    fi
    rm -f "$file"
    return 1
}

# stop_pid NAME PIDFILE PATTERN: SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL.
stop_pid() {
    local name=$1 file=$2 pattern=$3 pid deadline
    if ! pid=$(pid_of "$file" "$pattern"); then
        log "$name" "not running (no live pid file)"
        return 0
    fi
    log "$name" "stopping pid $pid (SIGTERM)"
    kill -TERM "$pid" 2>/dev/null || true
    # A test may have left it frozen with SIGSTOP; a stopped process never handles SIGTERM.
    kill -CONT "$pid" 2>/dev/null || true
    deadline=$(($(now) + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if (($(now) >= deadline)); then
            log "$name" "still alive after ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.5
    done
    rm -f "$file"
    log "$name" "stopped"
}

# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------

redis_external() { [[ -n ${CHAT_REDIS_URL:-} && ${CHAT_REDIS_URL} != "$OUR_REDIS_URL" ]]; }

# redis_ping URL: true if the server answers PONG.
redis_ping() {
    local url=$1
    if command -v redis-cli >/dev/null 2>&1; then
        [[ $(timeout 5 redis-cli -u "$url" ping 2>/dev/null) == PONG ]]
    else
        # No redis-cli (external Redis, nothing installed): speak RESP by hand. No AUTH support.
        local hostport=${url#*://}
        hostport=${hostport##*@}
        hostport=${hostport%%/*}
        local host=${hostport%:*} port=${hostport##*:}
        [[ $host == "$hostport" ]] && port=6379
        timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "PING\r\n" >&3 &&
            IFS= read -r line <&3 && [[ $line == "+PONG"* ]]' _ "$host" "$port" 2>/dev/null
    fi
}

# apt_install NAME PACKAGE...: installs Debian packages, every apt-get call bounded in time.
apt_install() {
    local name=$1
    shift
    command -v apt-get >/dev/null 2>&1 || die "$name" "apt-get not available; install $* yourself"
    local apt_opts=(-o DPkg::Lock::Timeout=120 -o Acquire::Retries=3)
    export DEBIAN_FRONTEND=noninteractive
    timeout "$APT_TIMEOUT" apt-get "${apt_opts[@]}" -qq update >&2 </dev/null 8>&- ||
        die "$name" "apt-get update failed or took longer than ${APT_TIMEOUT}s"
    timeout "$APT_TIMEOUT" apt-get "${apt_opts[@]}" -qq install -y --no-install-recommends \
        "$@" >&2 </dev/null 8>&- ||
        die "$name" "apt-get install $* failed or took longer than ${APT_TIMEOUT}s"
}

install_redis() {
    command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
    log redis "redis-server not found: installing Debian's redis-server with apt-get"
    apt_install redis redis-server
    command -v redis-server >/dev/null 2>&1 || die redis "redis-server still missing after apt-get"
    log redis "installed $(redis-server --version | head -n1)"
}

# Tools the cluster scripts and tests call next to the servers: curl (readiness waits in
# cluster.sh and rolling-restart.sh) and ss from iproute2 (a test reads a listener's accept
# queue).
install_tools() {
    local missing=()
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v ss >/dev/null 2>&1 || missing+=(iproute2)
    ((${#missing[@]})) || return 0
    log tools "installing ${missing[*]} with apt-get"
    apt_install tools "${missing[@]}"
}

start_redis() {
    if redis_external; then
        redis_ping "$CHAT_REDIS_URL" || die redis "CHAT_REDIS_URL=$CHAT_REDIS_URL does not answer PING"
        log redis "using external Redis $CHAT_REDIS_URL (answers PING)"
        return 0
    fi
    mkdir -p "$REDIS_DIR"
    exec 8>"$STATE_DIR/redis.lock"
    flock -w $((APT_TIMEOUT * 2 + REDIS_TIMEOUT)) 8 || die redis "could not take $STATE_DIR/redis.lock"

    local pid
    if pid=$(pid_of "$REDIS_PID" redis-server); then
        if redis_ping "$OUR_REDIS_URL"; then
            log redis "already running (pid $pid) on $OUR_REDIS_URL"
            return 0
        fi
        log redis "pid $pid is alive but does not answer PING yet; waiting"
    else
        install_redis
        if tcp_open 127.0.0.1 "$REDIS_PORT"; then
            # Asked for by name (say, what another checkout's `servers.sh env` printed)
            # and answering: use it as it is, and leave it running on `stop`.
            if [[ -n ${CHAT_REDIS_URL:-} ]] && redis_ping "$CHAT_REDIS_URL"; then
                log redis "using $CHAT_REDIS_URL (answers PING; started elsewhere, not stopped here)"
                return 0
            fi
            die redis "port $REDIS_PORT is in use by a process this script did not start" \
                "(set CHAT_REDIS_PORT, or CHAT_REDIS_URL to use that server)"
        fi
        local t0
        t0=$(now)
        [[ -f $REDIS_LOG ]] && mv -f "$REDIS_LOG" "$REDIS_LOG.1"
        # fd 8 (the lock) must not leak into the daemon.
        redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DIR" \
            --daemonize yes --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" \
            --save '' --appendonly no 8>&- </dev/null ||
            { tail_log redis "$REDIS_LOG"; die redis "redis-server failed to start"; }
        log redis "started on port $REDIS_PORT ($(($(now) - t0))s to fork)"
    fi

    local deadline=$(($(now) + REDIS_TIMEOUT))
    until redis_ping "$OUR_REDIS_URL"; do
        if (($(now) >= deadline)); then
            tail_log redis "$REDIS_LOG"
            die redis "no PONG from $OUR_REDIS_URL within ${REDIS_TIMEOUT}s"
        fi
        sleep 0.2
    done
    pid=$(pid_of "$REDIS_PID" redis-server) ||
        { tail_log redis "$REDIS_LOG"; die redis "port $REDIS_PORT answers but $REDIS_PID names no live redis-server"; }
    log redis "ready: $OUR_REDIS_URL answers PONG (pid $pid)"
    [[ -n ${CHAT_SERVERS_STARTED_FILE:-} ]] && echo redis >>"$CHAT_SERVERS_STARTED_FILE"
    return 0
}

status_redis() {
    local pid
    if redis_external; then
        if redis_ping "$CHAT_REDIS_URL"; then
            echo "redis: external $CHAT_REDIS_URL (answers PING)"
        else
            echo "redis: external $CHAT_REDIS_URL (NOT answering)"
            return 3
        fi
    elif pid=$(pid_of "$REDIS_PID" redis-server); then
        if redis_ping "$OUR_REDIS_URL"; then
            echo "redis: running pid $pid $OUR_REDIS_URL (answers PING) log $REDIS_LOG"
        else
            echo "redis: running pid $pid $OUR_REDIS_URL (NOT answering) log $REDIS_LOG"
            return 3
        fi
    else
        echo "redis: stopped"
        return 3
    fi
}

# ---------------------------------------------------------------------------------------------
# Cassandra (CQL)
# ---------------------------------------------------------------------------------------------

cql_external() { [[ -n ${CHAT_CQL_NODES:-} && ${CHAT_CQL_NODES} != "$OUR_CQL_NODES" ]]; }

# cql_nodes_open NODES: true if at least one host:port of the list accepts TCP.
cql_nodes_open() {
    local node host port ok=1
    IFS=',' read -r -a nodes <<<"$1"
    for node in "${nodes[@]}"; do
        node=${node// /}
        [[ -z $node ]] && continue
        host=${node%:*} port=${node##*:}
        [[ $host == "$node" ]] && port=9042
        host=${host#[} host=${host%]}
        if tcp_open "$host" "$port"; then ok=0; else log cql "$node does not accept connections"; fi
    done
    return $ok
}

# A JDK that Cassandra 5.0 supports (11 or 17); JDK 21+ lacks what 5.0.x needs by default.
find_java() {
    local c v
    for c in ${CHAT_JAVA:-} ${JAVA_HOME:+$JAVA_HOME/bin/java} "$(command -v java 2>/dev/null || true)" \
        /usr/lib/jvm/java-17-openjdk-*/bin/java /usr/lib/jvm/*17*/bin/java \
        /usr/lib/jvm/java-11-openjdk-*/bin/java /usr/lib/jvm/*11*/bin/java; do
        [[ -n $c && -x $c ]] || continue
        v=$("$c" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
        if [[ $v == 17 || $v == 11 ]]; then
            echo "$c"
            return 0
        fi
        [[ -n ${CHAT_JAVA:-} && $c == "$CHAT_JAVA" ]] && log cql "CHAT_JAVA=$c is Java $v, not 11/17"
    done
    return 1
}

# Fetch cassandra-all and its runtime dependencies into $CQL_LIB (once; marker file).
fetch_cassandra() {
    [[ -f $CQL_MARKER ]] && return 0
    mkdir -p "$CQL_HOME"
    exec 7>"$CQL_HOME.lock"
    flock -w "$FETCH_TIMEOUT" 7 || die cql "could not take $CQL_HOME.lock"
    if [[ -f $CQL_MARKER ]]; then exec 7>&-; return 0; fi
    command -v mvn >/dev/null 2>&1 || die cql "mvn (Maven) not found; it is needed to fetch Cassandra"
    local t0
    t0=$(now)
    log cql "fetching org.apache.cassandra:cassandra-all:$CASSANDRA_VERSION and dependencies" \
        "with Maven into $CQL_LIB (first time only)"
    rm -rf "$CQL_LIB" "$CQL_HOME/pom.xml"
    cat >"$CQL_HOME/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.chat-cluster</groupId>
  <artifactId>fetch-cassandra</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$CASSANDRA_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
    if ! (cd "$CQL_HOME" && timeout "$FETCH_TIMEOUT" mvn -q -B -f pom.xml \
        "$DEPENDENCY_PLUGIN:copy-dependencies" -DincludeScope=runtime \
        -DoutputDirectory=lib >"$CQL_HOME/fetch.log" 2>&1 </dev/null); then
        tail_log cql "$CQL_HOME/fetch.log"
        die cql "Maven fetch failed or took longer than ${FETCH_TIMEOUT}s"
    fi
    compgen -G "$CQL_LIB/cassandra-all-$CASSANDRA_VERSION.jar" >/dev/null ||
        die cql "Maven finished but $CQL_LIB has no cassandra-all-$CASSANDRA_VERSION.jar"
    compgen -G "$CQL_LIB/jamm-*.jar" >/dev/null || die cql "Maven finished but $CQL_LIB has no jamm jar"
    touch "$CQL_MARKER"
    log cql "fetched $(find "$CQL_LIB" -name '*.jar' | wc -l) jars ($(du -sh "$CQL_LIB" | cut -f1))" \
        "in $(($(now) - t0))s"
    exec 7>&-
}

write_cassandra_config() {
    mkdir -p "$CQL_DIR"/{data,commitlog,saved_caches,hints,cdc_raw,tmp}
    # Minimal cassandra.yaml for 5.0 (unknown keys are rejected; 5.0 unit syntax).
    cat >"$CQL_YAML" <<EOF
# Generated by deploy/local/servers.sh; rewritten on every start.
cluster_name: chat-local
num_tokens: 16
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$CQL_STORAGE_PORT"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $CQL_STORAGE_PORT
native_transport_port: $CQL_PORT
start_native_transport: true
data_file_directories:
  - $CQL_DIR/data
commitlog_directory: $CQL_DIR/commitlog
saved_caches_directory: $CQL_DIR/saved_caches
hints_directory: $CQL_DIR/hints
cdc_raw_directory: $CQL_DIR/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_total_space: 1024MiB
memtable_heap_space: 128MiB
concurrent_compactors: 1
auto_snapshot: false
# ScyllaDB's defaults, so that batches sized for production are not rejected here.
batch_size_warn_threshold: 128KiB
batch_size_fail_threshold: 1024KiB
EOF
    cat >"$CQL_LOGBACK" <<'EOF'
<configuration scan="false">
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %logger{0}:%line - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="STDOUT"/></root>
</configuration>
EOF
}

cql_log_ready() { [[ -f $CQL_LOG ]] && grep -q 'Starting listening for CQL clients' "$CQL_LOG"; }

start_cql() {
    if cql_external; then
        cql_nodes_open "$CHAT_CQL_NODES" || die cql "no node of CHAT_CQL_NODES=$CHAT_CQL_NODES accepts connections"
        log cql "using external CQL nodes $CHAT_CQL_NODES (port open)"
        return 0
    fi
    mkdir -p "$CQL_DIR"
    exec 9>"$STATE_DIR/cassandra.lock"
    flock -w $((FETCH_TIMEOUT + CQL_TIMEOUT + 30)) 9 || die cql "could not take $STATE_DIR/cassandra.lock"

    local pid t0 spawned=0
    t0=$(now)
    if pid=$(pid_of "$CQL_PID" "$CQL_MARK"); then
        if cql_log_ready && tcp_open 127.0.0.1 "$CQL_PORT"; then
            log cql "already running (pid $pid) on $OUR_CQL_NODES"
            return 0
        fi
        log cql "pid $pid is alive but not listening for CQL yet; waiting"
    else
        if tcp_open 127.0.0.1 "$CQL_PORT"; then
            if [[ -n ${CHAT_CQL_NODES:-} ]] && cql_nodes_open "$CHAT_CQL_NODES"; then
                log cql "using $CHAT_CQL_NODES (accepts connections; started elsewhere, not stopped here)"
                return 0
            fi
            die cql "port $CQL_PORT is in use by a process this script did not start" \
                "(set CHAT_CQL_PORT, or CHAT_CQL_NODES to use that server)"
        fi
        local java
        java=$(find_java) || die cql "no JDK 17 or 11 found (set CHAT_JAVA)"
        fetch_cassandra
        write_cassandra_config
        local jamm
        jamm=$(compgen -G "$CQL_LIB/jamm-*.jar" | head -n1)
        [[ -f $CQL_LOG ]] && mv -f "$CQL_LOG" "$CQL_LOG.1"
        local jvm=(
            -Xms256m "-Xmx$CQL_HEAP" -Xss512k
            -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
            -XX:G1HeapRegionSize=16m -XX:MaxGCPauseMillis=300
            -XX:+ExitOnOutOfMemoryError -XX:+PerfDisableSharedMem
            "-javaagent:$jamm"
            # --add-exports/--add-opens: Cassandra's conf/jvm17-server.options (cassandra-5.0)
            -Djdk.attach.allowAttachSelf=true
            --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
            --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
            --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
            --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
            --add-exports java.sql/java.sql=ALL-UNNAMED
            --add-exports java.base/java.lang.ref=ALL-UNNAMED
            --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
            --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
            --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
            --add-opens java.base/java.lang.module=ALL-UNNAMED
            --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
            --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
            --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
            --add-opens java.base/jdk.internal.math=ALL-UNNAMED
            --add-opens java.base/jdk.internal.module=ALL-UNNAMED
            --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
            --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
            --add-opens java.base/sun.nio.ch=ALL-UNNAMED
            --add-opens java.base/java.io=ALL-UNNAMED
            --add-opens java.base/java.lang.reflect=ALL-UNNAMED
            --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
            --add-opens java.base/java.lang=ALL-UNNAMED
            --add-opens java.base/java.util=ALL-UNNAMED
            -Dio.netty.tryReflectionSetAccessible=true
            -Dio.netty.allocator.useCacheForAllThreads=true
            -Dio.netty.allocator.maxOrder=11
            -Djava.net.preferIPv4Stack=true
            "-Djava.io.tmpdir=$CQL_DIR/tmp"
            -Dcassandra-foreground=yes
            "-Dcassandra.config=file://$CQL_YAML"
            "-Dcassandra.storagedir=$CQL_DIR"
            "-Dcassandra.logdir=$STATE_DIR"
            "-Dlogback.configurationFile=file://$CQL_LOGBACK"
            -Dcassandra.skip_wait_for_gossip_to_settle=0
            "$CQL_MARK"
            -cp "$CQL_LIB/*"
            org.apache.cassandra.service.CassandraDaemon
        )
        log cql "starting Cassandra $CASSANDRA_VERSION ($java, heap $CQL_HEAP) on $OUR_CQL_NODES," \
            "log $CQL_LOG"
        # New session so it outlives this shell; the lock fds must not leak into the JVM.
        setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$CQL_PID" "$java" "${jvm[@]}" \
            >"$CQL_LOG" 2>&1 </dev/null 7>&- 8>&- 9>&- &
        disown $! 2>/dev/null || true
        local spawn_deadline=$(($(now) + 10))
        until [[ -s $CQL_PID ]]; do
            (($(now) >= spawn_deadline)) && { tail_log cql "$CQL_LOG"; die cql "Cassandra did not spawn"; }
            sleep 0.1
        done
        t0=$(now) spawned=1
    fi

    local deadline=$(($(now) + CQL_TIMEOUT))
    until cql_log_ready && tcp_open 127.0.0.1 "$CQL_PORT"; do
        if ! pid=$(pid_of "$CQL_PID" "$CQL_MARK"); then
            tail_log cql "$CQL_LOG"
            die cql "Cassandra exited during start-up"
        fi
        if (($(now) >= deadline)); then
            tail_log cql "$CQL_LOG"
            if ((spawned)); then
                log cql "stopping the Cassandra this run started (pid $pid)"
                stop_pid cql "$CQL_PID" "$CQL_MARK"
                die cql "not listening for CQL on $OUR_CQL_NODES within ${CQL_TIMEOUT}s (CHAT_CQL_TIMEOUT)"
            fi
            die cql "not listening for CQL on $OUR_CQL_NODES within ${CQL_TIMEOUT}s" \
                "(pid $pid was already running before this call; stop it with: $0 stop cql)"
        fi
        sleep 1
    done
    pid=$(pid_of "$CQL_PID" "$CQL_MARK") || die cql "pid file vanished"
    log cql "ready: $OUR_CQL_NODES accepts CQL clients (pid $pid, start-up took $(($(now) - t0))s)"
    [[ -n ${CHAT_SERVERS_STARTED_FILE:-} ]] && echo cql >>"$CHAT_SERVERS_STARTED_FILE"
    return 0
}

status_cql() {
    local pid
    if cql_external; then
        if cql_nodes_open "$CHAT_CQL_NODES" 2>/dev/null; then
            echo "cql: external $CHAT_CQL_NODES (port open)"
        else
            echo "cql: external $CHAT_CQL_NODES (NOT accepting connections)"
            return 3
        fi
    elif pid=$(pid_of "$CQL_PID" "$CQL_MARK"); then
        if cql_log_ready && tcp_open 127.0.0.1 "$CQL_PORT"; then
            echo "cql: running pid $pid Cassandra $CASSANDRA_VERSION $OUR_CQL_NODES (listening for CQL) log $CQL_LOG"
        else
            echo "cql: running pid $pid Cassandra $CASSANDRA_VERSION $OUR_CQL_NODES (starting, NOT listening yet) log $CQL_LOG"
            return 3
        fi
    else
        echo "cql: stopped"
        return 3
    fi
}

# ---------------------------------------------------------------------------------------------

print_env() {
    local pid
    printf 'export CHAT_REDIS_URL=%q\n' "${CHAT_REDIS_URL:-$OUR_REDIS_URL}"
    printf 'export CHAT_CQL_NODES=%q\n' "${CHAT_CQL_NODES:-$OUR_CQL_NODES}"
    # Pids of the servers this script runs (outage tests SIGSTOP/SIGCONT them); unset when the
    # server is external or not running.
    if ! redis_external && pid=$(pid_of "$REDIS_PID" redis-server); then
        printf 'export CHAT_REDIS_PID=%q\n' "$pid"
    else
        echo 'unset CHAT_REDIS_PID'
    fi
    if ! cql_external && pid=$(pid_of "$CQL_PID" "$CQL_MARK"); then
        printf 'export CHAT_CQL_PID=%q\n' "$pid"
    else
        echo 'unset CHAT_CQL_PID'
    fi
}

components() {
    local c out=()
    (($# == 0)) && set -- redis cql
    for c in "$@"; do
        case $c in
        redis) out+=(redis) ;;
        cql | cassandra) out+=(cql) ;;
        *) echo "unknown server '$c' (expected: redis, cql)" >&2; exit 2 ;;
        esac
    done
    echo "${out[@]}"
}

cmd=${1:-}
shift || true
case $cmd in start | stop | status) comps=$(components "$@") || exit 2 ;; esac
case $cmd in
start)
    mkdir -p "$STATE_DIR"
    t_start=$(now)
    install_tools
    pids=() names=()
    for c in $comps; do
        start_"$c" &
        pids+=($!) names+=("$c")
    done
    failed=()
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || failed+=("${names[$i]}")
    done
    if ((${#failed[@]})); then
        log servers "FAILED to start: ${failed[*]} (after $(($(now) - t_start))s)"
        exit 1
    fi
    log servers "all up in $(($(now) - t_start))s; for clients: eval \"\$($0 env)\""
    ;;
stop)
    pids=()
    for c in $comps; do
        case $c in
        redis) stop_pid redis "$REDIS_PID" redis-server & ;;
        cql) stop_pid cql "$CQL_PID" "$CQL_MARK" & ;;
        esac
        pids+=($!)
    done
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    exit $rc
    ;;
status)
    rc=0
    for c in $comps; do status_"$c" || rc=3; done
    exit $rc
    ;;
env)
    print_env
    ;;
clean)
    "$0" stop
    log servers "removing $STATE_DIR"
    rm -rf "$STATE_DIR"
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
