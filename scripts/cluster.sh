#!/usr/bin/env bash
# Runs N `zimage serve` replicas behind HAProxy on this machine, in the background.
#
#   scripts/cluster.sh start --replicas N --port P [--host H] [--replica-port B] [--zimage BIN]
#                            [--ready-timeout S] -- <zimage serve arguments>
#   scripts/cluster.sh stop [--grace S]
#
# start: replica K (1..N) listens on 127.0.0.1:B+2(K-1) with its agent check on the next port (B: P+1
# unless given); with GPUs (nvidia-smi) replica K gets CUDA_VISIBLE_DEVICES=K-1, one GPU each; without,
# each gets ZIMAGE_THREADS and OPENBLAS_NUM_THREADS = cores/N (at least 1) unless those are set. Waits
# until every replica's /ready answers 200, then starts HAProxy on H:P (H: 127.0.0.1) with
# deploy/haproxy.cfg (written out as .cluster/haproxy.cfg, checked with `haproxy -c`), and returns.
# Pids go to .cluster/replica-K.pid and .cluster/haproxy.pid, logs beside them, HAProxy's admin socket
# is .cluster/haproxy.sock. Installs HAProxy from Debian when it is missing.
# stop: SIGTERM to every replica (each finishes the work it accepted and exits), SIGKILL to those still
# running after --grace seconds (default 660: above serve's default --request-timeout), then HAProxy.
#
# CLUSTER_DIR overrides .cluster (relative to the repository, or absolute). --host/--port/--agent-port in the serve
# arguments are overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(realpath -m "${CLUSTER_DIR:-.cluster}")

die() {
  echo "cluster: $*" >&2
  exit 1
}

# The status code of GET http://HOST:PORT/PATH, or 000 when nothing answers (bash's /dev/tcp: no curl needed).
http_status() {
  local status=000 line
  if { exec 3<>"/dev/tcp/$1/$2"; } 2>/dev/null; then
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" "$1" >&3
    read -r -t 5 line <&3 && status=$(echo "$line" | cut -d' ' -f2)
    exec 3<&- 3>&-
  fi
  echo "$status"
}

# Whether PID, from a pid file, still runs the program named NAME (a recycled pid runs something else).
alive() {
  [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q "$2"
}

# Whether PID, a child this script started, still runs. Not by name: until it has exec'd, the child is
# a copy of this shell; and its pid is not reused before it is reaped.
running() {
  [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]
}

# Whether PID still holds the process that ran NAME, exiting included: while the kernel tears a process
# down its cmdline is already empty, before it becomes a zombie, and `alive` would call it gone.
lingers() {
  running "$1" || return 1
  local cmd
  cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [ -z "$cmd" ] || grep -q "$2" <<<"$cmd"
}

# Sends SIGNAL to the process of pid file FILE if it still runs NAME.
signal_pidfile() {
  local file=$1 name=$2 sig=$3 pid
  pid=$(cat "$file" 2>/dev/null) || return 0
  if alive "$pid" "$name"; then kill "-$sig" "$pid" 2>/dev/null || true; fi
}

ensure_haproxy() {
  command -v haproxy >/dev/null && return
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "cluster: installing haproxy" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq haproxy >/dev/null
}

stop() {
  local grace=660
  while (($#)); do
    case $1 in
      --grace) grace=$2; shift 2 ;;
      *) die "stop: unknown argument '$1'" ;;
    esac
  done
  [ -d "$DIR" ] || return 0
  local f pid left end
  for f in "$DIR"/replica-*.pid; do [ -e "$f" ] && signal_pidfile "$f" zimage TERM; done
  end=$((SECONDS + grace))
  while :; do
    left=0
    for f in "$DIR"/replica-*.pid; do
      [ -e "$f" ] || continue
      pid=$(cat "$f")
      if lingers "$pid" zimage; then left=$((left + 1)); else rm -f "$f"; fi
    done
    ((left == 0)) && break
    if ((SECONDS >= end)); then
      echo "cluster: $left replica(s) still running after ${grace} s: SIGKILL" >&2
      for f in "$DIR"/replica-*.pid; do [ -e "$f" ] && signal_pidfile "$f" zimage KILL; done
    fi
    sleep 0.1
  done
  if [ -e "$DIR/haproxy.pid" ]; then
    signal_pidfile "$DIR/haproxy.pid" haproxy TERM
    pid=$(cat "$DIR/haproxy.pid")
    end=$((SECONDS + 10))
    while lingers "$pid" haproxy; do
      ((SECONDS < end)) || signal_pidfile "$DIR/haproxy.pid" haproxy KILL
      sleep 0.1
    done
    rm -f "$DIR/haproxy.pid"
  fi
  echo "cluster: stopped"
}

start() {
  local replicas="" port="" host=127.0.0.1 base="" zimage=${ZIMAGE:-build/zimage} ready_timeout=1800
  while (($#)); do
    case $1 in
      --replicas) replicas=$2; shift 2 ;;
      --port) port=$2; shift 2 ;;
      --host) host=$2; shift 2 ;;
      --replica-port) base=$2; shift 2 ;;
      --zimage) zimage=$2; shift 2 ;;
      --ready-timeout) ready_timeout=$2; shift 2 ;;
      --) shift; break ;;
      *) die "start: unknown argument '$1' (the serve arguments go after --)" ;;
    esac
  done
  local serve_args=("$@")
  [[ $replicas =~ ^[1-9][0-9]*$ ]] || die "start: --replicas must be a positive number, got '$replicas'"
  [[ $port =~ ^[1-9][0-9]*$ ]] || die "start: --port must be a port number, got '$port'"
  base=${base:-$((port + 1))}
  ((base + 2 * replicas - 1 <= 65535)) || die "start: ports $base..$((base + 2 * replicas - 1)) do not all exist"
  [ -x "$zimage" ] || die "start: no zimage binary at '$zimage' (build it, or pass --zimage or ZIMAGE)"
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] && alive "$(cat "$f")" "zimage\|haproxy" && die "start: a cluster runs already ($f); scripts/cluster.sh stop first"
  done
  ensure_haproxy
  mkdir -p "$DIR"
  rm -f "$DIR"/*.pid

  # HAProxy sends a replica at most its queue's worth of requests: the last --max-queue given, or serve's default.
  local max_queue=64 i
  for ((i = 0; i < ${#serve_args[@]}; i++)); do
    case ${serve_args[i]} in
      --max-queue) max_queue=${serve_args[i + 1]:-64} ;;
      --max-queue=*) max_queue=${serve_args[i]#--max-queue=} ;;
    esac
  done

  local gpus=0 threads
  command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  ((gpus == 0 || replicas <= gpus)) || die "start: $replicas replicas but $gpus GPUs (one replica per GPU)"
  threads=$(($(nproc) / replicas))
  ((threads >= 1)) || threads=1

  # A replica that cannot start takes the others down with it: no half cluster is left running.
  abort() {
    echo "cluster: start: $*; stopping what was started" >&2
    stop --grace 30 >&2
    exit 1
  }
  local k http agent servers=""
  for ((k = 1; k <= replicas; k++)); do
    http=$((base + 2 * (k - 1)))
    agent=$((http + 1))
    if ((gpus > 0)); then
      env CUDA_VISIBLE_DEVICES=$((k - 1)) "$zimage" serve "${serve_args[@]}" --host 127.0.0.1 --port "$http" \
        --agent-port "$agent" </dev/null >"$DIR/replica-$k.log" 2>&1 &
    else
      env ZIMAGE_THREADS="${ZIMAGE_THREADS:-$threads}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$threads}" \
        "$zimage" serve "${serve_args[@]}" --host 127.0.0.1 --port "$http" --agent-port "$agent" \
        </dev/null >"$DIR/replica-$k.log" 2>&1 &
    fi
    echo $! >"$DIR/replica-$k.pid"
    servers+="    server replica-$k 127.0.0.1:$http agent-port $agent"$'\n'
  done

  local end=$((SECONDS + ready_timeout)) pending pid
  while :; do
    pending=0
    for ((k = 1; k <= replicas; k++)); do
      pid=$(cat "$DIR/replica-$k.pid")
      if ! running "$pid"; then
        tail -n 5 "$DIR/replica-$k.log" >&2
        abort "replica $k exited (log: $DIR/replica-$k.log)"
      fi
      [ "$(http_status 127.0.0.1 $((base + 2 * (k - 1))) /ready)" = 200 ] || pending=$((pending + 1))
    done
    ((pending == 0)) && break
    ((SECONDS < end)) || abort "$pending replica(s) not ready after $ready_timeout s (logs: $DIR/replica-*.log)"
    sleep 0.2
  done

  # deploy/haproxy.cfg with this cluster's address, socket, maxconn and servers (the backend is its last section).
  awk -v bind="    bind $host:$port" -v sock="    stats socket $DIR/haproxy.sock mode 600 level admin" \
    -v maxconn="maxconn $max_queue" -v servers="$servers" '
    /^[ \t]*bind /         { print bind; next }
    /^[ \t]*stats socket / { print sock; next }
    /^[ \t]*server /       { next }
    /^[ \t]*default-server / { sub(/maxconn [0-9]+/, maxconn) }
    { print }
    END { printf "%s", servers }' deploy/haproxy.cfg >"$DIR/haproxy.cfg"
  haproxy -c -q -f "$DIR/haproxy.cfg" || abort "$DIR/haproxy.cfg is not valid"
  haproxy -db -f "$DIR/haproxy.cfg" </dev/null >"$DIR/haproxy.log" 2>&1 &
  echo $! >"$DIR/haproxy.pid"
  # Through the balancer to a replica: HAProxy listens and counts its servers up.
  local probe=$host
  [ "$host" = 0.0.0.0 ] && probe=127.0.0.1
  end=$((SECONDS + 30))
  until [ "$(http_status "$probe" "$port" /ready)" = 200 ]; do
    if ! running "$(cat "$DIR/haproxy.pid")" || ((SECONDS >= end)); then
      tail -n 5 "$DIR/haproxy.log" >&2
      abort "HAProxy does not answer on $host:$port (log: $DIR/haproxy.log)"
    fi
    sleep 0.1
  done
  echo "cluster: $replicas replica(s) behind http://$host:$port (replica ports $base..$((base + 2 * replicas - 1)), logs in $DIR/)"
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) die "usage: scripts/cluster.sh start --replicas N --port P [--host H] [--replica-port B] [--zimage BIN] [--ready-timeout S] -- <serve args> | stop [--grace S]" ;;
esac
