#!/usr/bin/env bash
# Where a request's cost goes, beside bench/run.sh's CPU time: heap allocations per
# request (a build with the `alloc-count` feature, read from /metrics) and system
# calls per request (strace -c -f on the serving process during a wrk run), for the
# plain-proxy small GET (examples/proxy.yaml, one worker, access log off), with
# nginx's system calls (1 worker, the bench/run.sh config) beside them.
#
# Usage: bench/profile.sh          (builds target/release/portcullis with alloc-count
#                                   into $PROFILE_TARGET, default target/profile)
# Knobs: PROFILE_DURATION=5  PROFILE_CONNECTIONS=50  PROFILE_NO_BUILD=1
# Needs: wrk, strace, nginx (installed with apt-get when missing), curl, python3.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${PROFILE_DURATION:-5}
CONNECTIONS=${PROFILE_CONNECTIONS:-50}
TARGET=${PROFILE_TARGET:-$ROOT/target/profile}
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
log() { echo "[profile] $*" >&2; }

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2"
    local sudo=""
    ((EUID == 0)) || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null ||
        { $sudo apt-get update >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null; }
}
need wrk wrk
need strace strace
need nginx nginx-light

if [[ -z ${PROFILE_NO_BUILD:-} ]]; then
    log "building portcullis (alloc-count) and the bench upstream into $TARGET"
    CARGO_TARGET_DIR=$TARGET cargo build --release --quiet -p portcullis --features alloc-count \
        -p portcullis-bench-upstream
fi
BIN=$TARGET/release/portcullis
UPSTREAM_BIN=$TARGET/release/portcullis-bench-upstream

read -r UP_PORT GW_PORT GW_ADMIN NG_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
wait_up() {
    for _ in $(seq 100); do
        curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.1
    done
    log "nothing answers on port $1"
    exit 1
}

taskset -c 1 "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
wait_up "$UP_PORT"

mkdir -p "$TMP/gw"
(cd "$TMP/gw" && exec env PORTCULLIS_LISTEN="127.0.0.1:$GW_PORT" PORTCULLIS_ADMIN_LISTEN="127.0.0.1:$GW_ADMIN" \
    UPSTREAM_URL="http://127.0.0.1:$UP_PORT" PORTCULLIS_WORKERS=1 PORTCULLIS_ACCESS_LOG=false \
    taskset -c 0 "$BIN" run -c "$ROOT/examples/proxy.yaml" >"$TMP/gw.log" 2>&1) &
GW_PID=$!
PIDS+=("$GW_PID")
wait_up "$GW_PORT"

mkdir -p "$TMP/nginx/logs" "$TMP/nginx/tmp"
user_line=""
((EUID == 0)) && user_line="user root;"
cat >"$TMP/nginx/nginx.conf" <<CONF
$user_line
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/tmp/client_body;
    proxy_temp_path $TMP/nginx/tmp/proxy;
    fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
    uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
    scgi_temp_path $TMP/nginx/tmp/scgi;
    keepalive_requests 1000000;
    upstream backend { server 127.0.0.1:$UP_PORT; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$NG_PORT;
        location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
taskset -c 0 nginx -p "$TMP/nginx" -e "$TMP/nginx/logs/error.log" -c "$TMP/nginx/nginx.conf" >/dev/null 2>&1 &
NG_PID=$!
PIDS+=("$NG_PID")
wait_up "$NG_PORT"
NG_WORKER=$(pgrep -P "$NG_PID" | head -n1)

allocations() {
    curl -fs "http://127.0.0.1:$GW_ADMIN/metrics" | awk '/^portcullis_heap_allocations_total/ {print $2}'
}
run_wrk() { taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:$1/" | awk '/requests in/ {print $1}'; }

# Warm-up: pools, caches and the allocator reach their steady state.
run_wrk "$GW_PORT" >/dev/null
run_wrk "$NG_PORT" >/dev/null

before=$(allocations)
reqs=$(run_wrk "$GW_PORT")
after=$(allocations)
alloc_per_req=$(awk -v a="$before" -v b="$after" -v n="$reqs" 'BEGIN {printf "%.2f", (b - a) / n}')

# syscalls: strace the serving process (every thread) during one wrk run.
syscalls() {
    local pid=$1 port=$2 out=$3
    strace -c -f -q -p "$pid" -o "$out" &
    local spid=$!
    sleep 0.5
    local n
    n=$(run_wrk "$port")
    kill -INT "$spid"
    wait "$spid" 2>/dev/null || true
    awk -v n="$n" '$NF == "total" {printf "%.2f", $4 / n}' "$out"
    echo " $n"
}
read -r gw_sys gw_n < <(syscalls "$GW_PID" "$GW_PORT" "$TMP/gw.strace")
read -r ng_sys ng_n < <(syscalls "$NG_WORKER" "$NG_PORT" "$TMP/ng.strace")

echo "| proxy | heap allocations / request | system calls / request (under strace) |"
echo "|---|---|---|"
echo "| Portcullis (1 worker) | $alloc_per_req | $gw_sys |"
echo "| nginx (1 worker) | — | $ng_sys |"
echo
echo "Portcullis system calls by kind (per request):"
awk -v n="$gw_n" 'NR > 2 && $NF != "total" && $NF !~ /^-/ && NF >= 5 {printf "  %-16s %.2f\n", $NF, $4 / n}' "$TMP/gw.strace" | sort -k2 -nr | head -8
echo "nginx system calls by kind (per request):"
awk -v n="$ng_n" 'NR > 2 && $NF != "total" && $NF !~ /^-/ && NF >= 5 {printf "  %-16s %.2f\n", $NF, $4 / n}' "$TMP/ng.strace" | sort -k2 -nr | head -8
