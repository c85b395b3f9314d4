#!/usr/bin/env bash
# Memory per client connection: each proxy (Portcullis with one worker, nginx with one
# worker, HAProxy with one thread) gets N keep-alive connections held open (default
# 5,000), then one small GET on each, then they all close. The process's RSS (nginx:
# master + worker) is read before, with the connections accepted, after the request
# on each, right after they close and PROFILE_SETTLE seconds later.
#
# Usage: bench/connections.sh      (uses target/release/portcullis; build it first or
#                                   let bench/run.sh build it)
# Knobs: CONN_COUNT=5000  CONN_SETTLE=60  CONN_PROXIES="portcullis nginx haproxy"
# Needs: python3, curl, nginx and haproxy (installed with apt-get when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COUNT=${CONN_COUNT:-5000}
SETTLE=${CONN_SETTLE:-60}
PROXIES=${CONN_PROXIES:-portcullis nginx haproxy}
BIN=${BENCH_PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}
UPSTREAM_BIN=${BENCH_UPSTREAM_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis-bench-upstream}
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
log() { echo "[connections] $*" >&2; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2"
    local sudo=""
    ((EUID == 0)) || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null ||
        { $sudo apt-get update >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null; }
}
[[ $PROXIES == *nginx* ]] && need nginx nginx-light
[[ $PROXIES == *haproxy* ]] && need haproxy haproxy

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() {
    for _ in $(seq 100); do
        curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.1
    done
    log "nothing answers on port $1"
    for f in "$TMP"/*.log; do log "== $f"; tail -n 5 "$f" >&2; done
    exit 1
}
# RSS in KiB of a process and its children (nginx: master + worker).
rss() {
    local total=0 p
    for p in "$@" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

UP_PORT=$(free_port)
"$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
wait_up "$UP_PORT"

start_portcullis() {
    local port admin
    port=$(free_port) admin=$(free_port)
    mkdir -p "$TMP/gw"
    (cd "$TMP/gw" && exec env PORTCULLIS_LISTEN="127.0.0.1:$port" PORTCULLIS_ADMIN_LISTEN="127.0.0.1:$admin" \
        UPSTREAM_URL="http://127.0.0.1:$UP_PORT" PORTCULLIS_WORKERS=1 PORTCULLIS_ACCESS_LOG=false \
        "$BIN" run -c "$ROOT/examples/proxy.yaml" >"$TMP/gw.log" 2>&1) &
    echo "$! $port"
}
start_nginx() {
    local port user_line=""
    port=$(free_port)
    mkdir -p "$TMP/nginx/logs" "$TMP/nginx/tmp"
    ((EUID == 0)) && user_line="user root;"
    cat >"$TMP/nginx/nginx.conf" <<CONF
$user_line
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/tmp/client_body;
    proxy_temp_path $TMP/nginx/tmp/proxy;
    fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
    uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
    scgi_temp_path $TMP/nginx/tmp/scgi;
    keepalive_timeout 300;
    upstream backend { server 127.0.0.1:$UP_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$port;
        location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
    nginx -p "$TMP/nginx" -e "$TMP/nginx/logs/error.log" -c "$TMP/nginx/nginx.conf" >/dev/null 2>&1 &
    echo "$! $port"
}
start_haproxy() {
    local port
    port=$(free_port)
    cat >"$TMP/haproxy.cfg" <<CONF
global
    maxconn 9000
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    option http-keep-alive
frontend f
    bind 127.0.0.1:$port
    default_backend b
backend b
    http-reuse always
    server s 127.0.0.1:$UP_PORT
CONF
    haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
    echo "$! $port"
}

# The client: holds COUNT connections, sends one GET on each at a signal, closes.
cat >"$TMP/client.py" <<'PY'
import resource, socket, sys, time
port, count, fifo = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
socks = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    socks.append(s)
def step(name):
    print(name, flush=True)
    with open(fifo) as f:
        f.read()
step("connected")
req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
for s in socks:
    s.sendall(req)
for s in socks:
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
step("requested")
for s in socks:
    s.close()
print("closed", flush=True)
PY

printf '| proxy | RSS idle (MiB) | per accepted connection (KiB) | per connection after one request (KiB) | RSS just after closing (MiB) | RSS %ss later (MiB) |\n' "$SETTLE"
printf '|---|---|---|---|---|---|\n'
for proxy in $PROXIES; do
    read -r pid port < <("start_$proxy")
    PIDS+=("$pid")
    wait_up "$port"
    curl -fs -o /dev/null "http://127.0.0.1:$port/"
    sleep 1
    idle=$(rss "$pid")
    fifo="$TMP/$proxy.fifo"
    mkfifo "$fifo"
    coproc CLIENT { python3 "$TMP/client.py" "$port" "$COUNT" "$fifo"; }
    read -r _ <&"${CLIENT[0]}"   # connected
    sleep 2
    accepted=$(rss "$pid")
    echo go >"$fifo"
    read -r _ <&"${CLIENT[0]}"   # requested
    sleep 1
    requested=$(rss "$pid")
    echo go >"$fifo"
    read -r _ <&"${CLIENT[0]}"   # closed
    wait "$CLIENT_PID" 2>/dev/null || true
    sleep 2
    closed=$(rss "$pid")
    sleep "$SETTLE"
    settled=$(rss "$pid")
    awk -v p="$proxy" -v i="$idle" -v a="$accepted" -v r="$requested" -v c="$closed" -v s="$settled" -v n="$COUNT" \
        'BEGIN {printf "| %s | %.1f | %.2f | %.2f | %.1f | %.1f |\n", p, i / 1024, (a - i) / n, (r - i) / n, c / 1024, s / 1024}'
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
