# shellcheck shell=bash
# Sourced by scripts/services for `--cluster`: a three-node Kafka and a six-node Redis Cluster on
# loopback, for the multi-broker tests (issue 14). It reuses the helpers of scripts/services (pid_of,
# alive, stop_pid, port_open, kafka_probe, kafka_fetch_jars, need_cmd, tail_log, say/warn/die); its
# usage is in the header of scripts/services.
#
# Layout under $ORCHESTRATOR_KAFKA_HOME/run/cluster:
#   cluster.id                                      the Kafka cluster id every node is formatted with
#   kafka-<port>/{data,logs,kafka.pid,server.properties,log4j2.yaml}
#   redis-<port>/{data,logs,redis.pid,redis.conf}   data/nodes.conf is the node's cluster state

CLUSTER_RUN="$RUN_DIR/cluster"
KAFKA_CLUSTER_PORT="${KAFKA_CLUSTER_PORT:-19092}"
KAFKA_CLUSTER_CONTROLLER_PORT="${KAFKA_CLUSTER_CONTROLLER_PORT:-19192}"
KAFKA_CLUSTER_HEAP_OPTS="${KAFKA_CLUSTER_HEAP_OPTS:--Xmx384m -Xms128m}"
REDIS_CLUSTER_PORT="${REDIS_CLUSTER_PORT:-7000}"
# Redis Cluster's failure detection: a primary silent this long is replaced by its replica. The
# default (15 s) would make every fault test wait that long.
REDIS_CLUSTER_NODE_TIMEOUT="${REDIS_CLUSTER_NODE_TIMEOUT:-3000}"
CLUSTER_START_TIMEOUT="${CLUSTER_START_TIMEOUT:-180}"

# Fixed sizes: three brokers (so a topic gets replication factor 3 and survives one down), three
# primaries each with one replica.
KAFKA_CLUSTER_PORTS=()
REDIS_CLUSTER_PORTS=()
for ((i = 0; i < 3; i++)); do KAFKA_CLUSTER_PORTS+=($((KAFKA_CLUSTER_PORT + i))); done
for ((i = 0; i < 6; i++)); do REDIS_CLUSTER_PORTS+=($((REDIS_CLUSTER_PORT + i))); done

# ---------------------------------------------------------------------------------------------
# Kafka: node i (0..2) has node.id i+1, broker port KAFKA_CLUSTER_PORT+i, controller port
# KAFKA_CLUSTER_CONTROLLER_PORT+i.

ck_index() { echo $(($1 - KAFKA_CLUSTER_PORT)); }
ck_run() { echo "$CLUSTER_RUN/kafka-$1"; }
ck_pid() { pid_of "$(ck_run "$1")/kafka.pid" "kafka.Kafka $(ck_run "$1")/server.properties"; }

ck_voters() {
  local i out=""
  for ((i = 0; i < ${#KAFKA_CLUSTER_PORTS[@]}; i++)); do
    out+="${out:+,}$((i + 1))@127.0.0.1:$((KAFKA_CLUSTER_CONTROLLER_PORT + i))"
  done
  echo "$out"
}

# ck_cluster_id: the id all three nodes are formatted with (they must agree), made once
ck_cluster_id() {
  local file="$CLUSTER_RUN/cluster.id"
  if [ ! -s "$file" ]; then
    python3 -c 'import base64,uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"): print(s); break' >"$file"
  fi
  cat "$file"
}

# ck_start PORT: format the node's storage if new and start its JVM in the background (no wait)
ck_start() {
  local port="$1" run idx controller jvm heap pid
  run="$(ck_run "$port")"
  idx="$(ck_index "$port")"
  controller=$((KAFKA_CLUSTER_CONTROLLER_PORT + idx))
  if pid="$(ck_pid "$port")"; then
    say "kafka-$port: already running (pid $pid)"
    return 0
  fi
  port_open "$port" && die "kafka-$port: port $port is taken by another program (a private test broker?): free it"
  port_open "$controller" && die "kafka-$port: controller port $controller is taken by another program: free it"
  mkdir -p "$run/data" "$run/logs"
  sed -e "s|@NODE_ID@|$((idx + 1))|g" \
    -e "s|@VOTERS@|$(ck_voters)|g" \
    -e "s|@KAFKA_PORT@|$port|g" \
    -e "s|@CONTROLLER_PORT@|$controller|g" \
    -e "s|@DATA_DIR@|$run/data|g" \
    -e "s|@NUM_PARTITIONS@|$KAFKA_NUM_PARTITIONS|g" \
    -e "s|@OFFSETS_PARTITIONS@|$KAFKA_INTERNAL_PARTITIONS|g" \
    "$DEPLOY/kafka/cluster.properties" >"$run/server.properties"
  cp "$DEPLOY/kafka/log4j2.yaml" "$run/log4j2.yaml"
  read -r -a heap <<<"$KAFKA_CLUSTER_HEAP_OPTS"
  # the single node's options with a smaller heap, and fewer GC and JIT threads: three JVMs on 2 cores
  jvm=("${heap[@]}" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:ParallelGCThreads=1
    -XX:ConcGCThreads=1 -XX:CICompilerCount=2 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$run/log4j2.yaml" "-Dkafka.logs.dir=$run/logs")
  if [ ! -f "$run/data/meta.properties" ]; then
    if ! java "${jvm[@]}" -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format \
        --cluster-id "$(ck_cluster_id)" --config "$run/server.properties" --ignore-formatted \
        >"$run/logs/format.out" 2>&1; then
      tail_log "$run/logs/format.out"
      die "kafka-$port: formatting the storage failed"
    fi
  fi
  say "kafka-$port: starting (node $((idx + 1)), controller 127.0.0.1:$controller)"
  (
    cd "$run" || exit 1
    exec setsid nohup java "${jvm[@]}" -cp "$KAFKA_LIBS/*" kafka.Kafka "$run/server.properties"
  ) >"$run/logs/kafka.out" 2>&1 </dev/null 8>&- 9>&- &
  printf '%s\n' "$!" >"$run/kafka.pid"
}

# ck_ready: every node runs and answers a Metadata request that lists all three brokers
ck_ready() {
  local port
  for port in "${KAFKA_CLUSTER_PORTS[@]}"; do
    ck_pid "$port" >/dev/null && kafka_probe "$port" "${#KAFKA_CLUSTER_PORTS[@]}" 2>/dev/null || return 1
  done
}

ck_wait() {
  local start=$SECONDS port run
  until ck_ready; do
    for port in "${KAFKA_CLUSTER_PORTS[@]}"; do
      if ! ck_pid "$port" >/dev/null; then
        run="$(ck_run "$port")"
        tail_log "$run/logs/server.log" "$run/logs/kafka.out"
        die "kafka-$port exited during start-up; logs in $run/logs"
      fi
    done
    if ((SECONDS - start >= CLUSTER_START_TIMEOUT)); then
      for port in "${KAFKA_CLUSTER_PORTS[@]}"; do kafka_probe "$port" 3 || true; done
      die "kafka cluster: not every broker in the metadata after ${CLUSTER_START_TIMEOUT}s"
    fi
    sleep 0.5
  done
  say "kafka cluster: ready, 3 brokers on 127.0.0.1:${KAFKA_CLUSTER_PORTS[0]}-${KAFKA_CLUSTER_PORTS[2]} ($((SECONDS - start))s)"
}

ck_status() {
  local port pid rc=0
  for port in "${KAFKA_CLUSTER_PORTS[@]}"; do
    if pid="$(ck_pid "$port")"; then
      if kafka_probe "$port" 3 2>/dev/null; then
        say "kafka-$port: up      pid $pid  (metadata lists all 3 brokers)"
      else
        say "kafka-$port: running but not ready  pid $pid  (log $(ck_run "$port")/logs/server.log)"
        rc=1
      fi
    else
      say "kafka-$port: down"
      rc=1
    fi
  done
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Redis Cluster: six nodes, three primaries with one replica each, as `redis-cli --cluster create`
# lays them out (on first start; afterwards each node rejoins from its nodes.conf).

cr_run() { echo "$CLUSTER_RUN/redis-$1"; }
cr_pid() { pid_of "$(cr_run "$1")/redis.pid" "redis-server 127.0.0.1:$1"; }
cr_cli() { local port="$1"; shift; redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null | tr -d '\r'; }
cr_info() { cr_cli "$1" cluster info | sed -n "s/^$2://p"; }

cr_start() {
  local port="$1" run pid
  run="$(cr_run "$port")"
  if pid="$(cr_pid "$port")"; then
    say "redis-$port: already running (pid $pid)"
    return 0
  fi
  port_open "$port" && die "redis-$port: port $port is taken by another program: free it"
  mkdir -p "$run/data" "$run/logs"
  rm -f "$run/redis.pid"
  # the single node's redis.conf (AOF, noeviction) and cluster.conf (cluster mode) as one file: a
  # redis-server reads one; nodes.conf lives in --dir
  cat "$DEPLOY/redis/redis.conf" "$DEPLOY/redis/cluster.conf" >"$run/redis.conf"
  say "redis-$port: starting"
  if ! redis-server "$run/redis.conf" --port "$port" --dir "$run/data" \
      --pidfile "$run/redis.pid" --logfile "$run/logs/redis.log" --daemonize yes \
      --cluster-node-timeout "$REDIS_CLUSTER_NODE_TIMEOUT" \
      >"$run/logs/redis.out" 2>&1 </dev/null 8>&- 9>&-; then
    tail_log "$run/logs/redis.out" "$run/logs/redis.log"
    die "redis-$port: redis-server failed to start"
  fi
}

# cr_create: make the cluster when no node has ever been part of one (all six know only themselves)
cr_create() {
  local port nodes=()
  for port in "${REDIS_CLUSTER_PORTS[@]}"; do
    [ "$(cr_info "$port" cluster_known_nodes)" = 1 ] || return 0
    nodes+=("127.0.0.1:$port")
  done
  say "redis cluster: creating (3 primaries, 3 replicas)"
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
      >"$CLUSTER_RUN/redis-create.out" 2>&1; then
    tail_log "$CLUSTER_RUN/redis-create.out"
    die "redis cluster: redis-cli --cluster create failed"
  fi
}

# cr_ready: every node runs, says cluster_state:ok and knows all six, and every replica's link to
# its primary is up (so a WAIT right after `up` counts it)
cr_ready() {
  local port
  for port in "${REDIS_CLUSTER_PORTS[@]}"; do
    cr_pid "$port" >/dev/null || return 1
    [ "$(cr_info "$port" cluster_state)" = ok ] || return 1
    [ "$(cr_info "$port" cluster_known_nodes)" = 6 ] || return 1
    case "$(cr_cli "$port" info replication)" in
      *role:slave*master_link_status:up*) ;;
      *role:master*connected_slaves:[1-9]*) ;;
      *) return 1 ;;
    esac
  done
}

cr_wait() {
  local start=$SECONDS port
  until cr_ready; do
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
      cr_pid "$port" >/dev/null && continue
      tail_log "$(cr_run "$port")/logs/redis.out" "$(cr_run "$port")/logs/redis.log"
      die "redis-$port is not running; logs in $(cr_run "$port")/logs"
    done
    if ((SECONDS - start >= CLUSTER_START_TIMEOUT)); then
      for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        warn "redis-$port: cluster_state $(cr_info "$port" cluster_state)," \
          "known nodes $(cr_info "$port" cluster_known_nodes)"
      done
      die "redis cluster: not ok after ${CLUSTER_START_TIMEOUT}s (a half-made cluster: scripts/services clean --cluster redis)"
    fi
    sleep 0.2
  done
  say "redis cluster: ready, 6 nodes on 127.0.0.1:${REDIS_CLUSTER_PORTS[0]}-${REDIS_CLUSTER_PORTS[5]} ($((SECONDS - start))s)"
}

cr_status() {
  local port pid rc=0 role
  for port in "${REDIS_CLUSTER_PORTS[@]}"; do
    if pid="$(cr_pid "$port")"; then
      role="$(cr_cli "$port" info replication | sed -n 's/^role://p')"
      say "redis-$port: up      pid $pid  ${role:-?}  cluster_state $(cr_info "$port" cluster_state)"
    else
      say "redis-$port: down"
      rc=1
    fi
  done
  cr_ready || rc=1
  return "$rc"
}

# ---------------------------------------------------------------------------------------------

node_run() { case "$1" in kafka-*) ck_run "${1#kafka-}" ;; redis-*) cr_run "${1#redis-}" ;; esac; }
node_pid() { case "$1" in kafka-*) ck_pid "${1#kafka-}" ;; redis-*) cr_pid "${1#redis-}" ;; esac; }

# cluster_stop TERM|KILL NODE...: signal every node first, then wait for each (SIGKILL after
# SERVICES_STOP_TIMEOUT s). One at a time, the second Kafka node to stop would wait for a quorum that
# the first took away; all at once they stop together, in seconds.
cluster_stop() {
  local signal="$1" node pid names=() pids=() i
  shift
  for node in "$@"; do
    if pid="$(node_pid "$node")"; then
      say "$node: SIG$signal pid $pid"
      kill "-$signal" "$pid" 2>/dev/null || true
      names+=("$node")
      pids+=("$pid")
    else
      say "$node: already down"
    fi
    rm -f "$(node_run "$node")"/*.pid
  done
  for ((i = 0; i < ${#pids[@]}; i++)); do
    if [ "$signal" = KILL ]; then
      STOP_TIMEOUT=5 stop_pid "${names[i]}" "${pids[i]}"
    else
      stop_pid "${names[i]}" "${pids[i]}"
    fi
  done
}

# cluster_nodes TARGET: the nodes TARGET names (all, kafka, redis, kafka-<port>, redis-<port>)
cluster_nodes() {
  local p all=()
  for p in "${KAFKA_CLUSTER_PORTS[@]}"; do all+=("kafka-$p"); done
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do all+=("redis-$p"); done
  case "$1" in
    all) printf '%s\n' "${all[@]}" ;;
    kafka | redis) printf '%s\n' "${all[@]}" | grep "^$1-" ;;
    *)
      printf '%s\n' "${all[@]}" | grep -qx -- "$1" ||
        die "unknown cluster node '$1' (kafka-${KAFKA_CLUSTER_PORTS[0]}..${KAFKA_CLUSTER_PORTS[2]}, redis-${REDIS_CLUSTER_PORTS[0]}..${REDIS_CLUSTER_PORTS[5]})"
      printf '%s\n' "$1"
      ;;
  esac
}

cluster_print_env() {
  local p kafka="" redis=""
  for p in "${KAFKA_CLUSTER_PORTS[@]}"; do kafka+="${kafka:+,}127.0.0.1:$p"; done
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do redis+="${redis:+,}127.0.0.1:$p"; done
  printf 'export KAFKA_BOOTSTRAP_SERVERS=%s\n' "$kafka"
  printf 'export REDIS_URL=redis://127.0.0.1:%s\n' "${REDIS_CLUSTER_PORTS[0]}"
  printf 'export REDIS_CLUSTER_NODES=%s\n' "$redis"
}

# The lock is fd 8; every daemon started below closes it (8>&-), or it would hold the lock for ever.
cluster_lock() {
  mkdir -p "$CLUSTER_RUN"
  exec 8>"$CLUSTER_RUN/.lock"
  flock -w 600 8 || die "another scripts/services --cluster run holds $CLUSTER_RUN/.lock"
}

cluster_main() {
  local cmd="${1:-}" target="${2:-all}" nodes node kafka=0 redis=0 rc=0 start=$SECONDS
  mapfile -t nodes < <(cluster_nodes "$target")
  [ "${#nodes[@]}" -gt 0 ] || exit 1
  for node in "${nodes[@]}"; do
    case "$node" in kafka-*) kafka=1 ;; redis-*) redis=1 ;; esac
  done
  case "$cmd" in
    up)
      cluster_lock
      if ((kafka)); then
        need_cmd java openjdk-17-jre-headless
        need_cmd python3 python3
        kafka_fetch_jars
      fi
      if ((redis)); then
        need_cmd redis-server redis-server
        need_cmd redis-cli redis-tools
      fi
      # start every named node first, then wait: the Kafka quorum forms only once two voters run
      for node in "${nodes[@]}"; do
        case "$node" in kafka-*) ck_start "${node#kafka-}" ;; redis-*) cr_start "${node#redis-}" ;; esac
      done
      if ((redis)); then
        # a node just started answers PING before it has loaded its nodes.conf and data
        for node in "${REDIS_CLUSTER_PORTS[@]}"; do
          until [ "$(cr_cli "$node" ping)" = PONG ]; do
            cr_pid "$node" >/dev/null || die "redis-$node is not running"
            sleep 0.1
          done
        done
        cr_create
        cr_wait
      fi
      ((kafka)) && ck_wait
      say "cluster: up after $((SECONDS - start))s"
      if [ "$target" = all ]; then cluster_print_env; fi
      ;;
    down | kill)
      cluster_lock
      if [ "$cmd" = kill ]; then cluster_stop KILL "${nodes[@]}"; else cluster_stop TERM "${nodes[@]}"; fi
      ;;
    restart)
      cluster_main down "$target"
      cluster_main up "$target"
      ;;
    status)
      if ((kafka)); then ck_status || rc=1; fi
      if ((redis)); then cr_status || rc=1; fi
      return "$rc"
      ;;
    clean)
      [ "$target" = all ] || [ "$target" = kafka ] || [ "$target" = redis ] ||
        die "clean --cluster takes all, kafka or redis (a single node cannot rejoin wiped)"
      cluster_main down "$target"
      for node in "${nodes[@]}"; do rm -rf "$(node_run "$node")"; done
      if [ "$target" != redis ]; then rm -f "$CLUSTER_RUN/cluster.id"; fi
      if [ "$target" != kafka ]; then rm -f "$CLUSTER_RUN/redis-create.out"; fi
      say "cluster: wiped ${target} under $CLUSTER_RUN"
      ;;
    env) cluster_print_env ;;
    logs)
      for node in "${nodes[@]}"; do say "$node logs: $CLUSTER_RUN/$node/logs"; done
      ;;
    *) usage >&2; exit 2 ;;
  esac
}
