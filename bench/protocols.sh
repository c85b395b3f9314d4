#!/usr/bin/env bash
# TLS and HTTP/2 against nginx: the same self-signed certificate (P-256) on both
# proxies, the same plain-HTTP/1.1 upstream (bench/upstream) behind them.
#
# Scenarios (small GET /, 12 B response):
#   tls-keepalive   wrk over HTTPS/1.1, 50 keep-alive connections
#   tls-handshake   wrk over HTTPS/1.1 with "Connection: close": a full TLS handshake
#                   per request (no session resumption)
#   h2-tls          h2load, HTTP/2 over TLS, 16 connections x 10 concurrent streams
#
# Layout: proxy alone on BENCH_SUT_CPUS (default 0), upstream and load generator on
# BENCH_WRK_CPUS (default 1); nginx 1 worker process, Portcullis PORTCULLIS_WORKERS=1.
# Rounds are interleaved (each round runs every contender once per scenario); the
# report shows medians. CPU µs/req = utime+stime of the proxy (nginx: master +
# workers) during the run / requests completed.
#
# Usage: bench/protocols.sh
# Knobs: BENCH_DURATION=10 BENCH_ROUNDS=3 BENCH_NO_BUILD=1 BENCH_SUT_CPUS BENCH_WRK_CPUS
#        BENCH_SCENARIOS="tls-keepalive tls-handshake h2-tls"
# Needs: wrk, h2load (nghttp2-client), nginx, openssl, curl, python3 (installed with
# apt-get when missing). Output: markdown on stdout and bench/results/protocols-latest.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-3}
SUT_CPUS=${BENCH_SUT_CPUS:-0}
WRK_CPUS=${BENCH_WRK_CPUS:-1}
SCENARIOS=${BENCH_SCENARIOS:-tls-keepalive tls-handshake h2-tls}
BIN=$TARGET_DIR/release/portcullis
UPSTREAM_BIN=$TARGET_DIR/release/portcullis-bench-upstream

log() { printf '[protocols] %s\n' "$*" >&2; }
die() { printf '[protocols] error: %s\n' "$*" >&2; exit 1; }

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    local sudo=""
    ((EUID == 0)) || sudo=sudo
    log "installing $2"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 ||
        { $sudo apt-get update -qq >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
    command -v "$1" >/dev/null 2>&1 || die "$1 is missing"
}
need wrk wrk
need h2load nghttp2-client
need openssl openssl
need curl curl
need python3 python3
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || { need nginx nginx-light; NGINX=$(command -v nginx || echo /usr/sbin/nginx); }

if [[ -z ${BENCH_NO_BUILD:-} ]]; then
    log "building portcullis and the bench upstream (release)"
    (cd "$ROOT" && cargo build --release -q -p portcullis -p portcullis-bench-upstream)
fi
[[ -x $BIN && -x $UPSTREAM_BIN ]] || die "release binaries missing in $TARGET_DIR/release"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_https() { # wait_https URL PID LOG
    for _ in $(seq 100); do
        curl -sfk --max-time 1 -o /dev/null "$1" && return 0
        kill -0 "$2" 2>/dev/null || die "process exited: $(tail -5 "$3")"
        sleep 0.1
    done
    die "$1 did not answer: $(tail -5 "$3")"
}
ticks() { # ticks "PID..." -> utime+stime summed, including nginx's workers
    local sum=0 p
    for p in $1 $(pgrep -P "${1%% *}" 2>/dev/null || true); do
        [[ -r /proc/$p/stat ]] || continue
        sum=$((sum + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat")))
    done
    echo "$sum"
}

# One certificate for both proxies.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" >/dev/null 2>&1

UPORT=$(free_port)
taskset -c "$WRK_CPUS" "$UPSTREAM_BIN" --listen "127.0.0.1:$UPORT" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)

NPORT=$(free_port)
mkdir -p "$TMP/nginx/logs" "$TMP/nginx/tmp"
user_line=""
((EUID == 0)) && user_line="user root;"
cat >"$TMP/nginx/nginx.conf" <<EOF
$user_line
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 4096; multi_accept on; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/tmp/body;
    proxy_temp_path $TMP/nginx/tmp/proxy;
    fastcgi_temp_path $TMP/nginx/tmp/fastcgi;
    uwsgi_temp_path $TMP/nginx/tmp/uwsgi;
    scgi_temp_path $TMP/nginx/tmp/scgi;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    tcp_nodelay on;
    upstream backend { server 127.0.0.1:$UPORT; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$NPORT ssl http2;
        ssl_certificate $TMP/cert.pem;
        ssl_certificate_key $TMP/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
taskset -c "$SUT_CPUS" "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx/logs/out.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")

PPORT=$(free_port)
APORT=$(free_port)
cat >"$TMP/portcullis.yaml" <<EOF
listeners:
  - address: "127.0.0.1:$PPORT"
    tls:
      certificates: [{cert_file: "$TMP/cert.pem", key_file: "$TMP/key.pem"}]
admin: {address: "127.0.0.1:$APORT"}
logging: {access_log: false}
store: {data_dir: "$TMP/data"}
routes:
  - path_prefix: /
    public: true
    proxy: {upstream: "http://127.0.0.1:$UPORT"}
EOF
PORTCULLIS_WORKERS=1 taskset -c "$SUT_CPUS" "$BIN" run -c "$TMP/portcullis.yaml" >"$TMP/portcullis.log" 2>&1 &
P_PID=$!
PIDS+=("$P_PID")

declare -A URL=([nginx]="https://127.0.0.1:$NPORT/" [portcullis]="https://127.0.0.1:$PPORT/")
declare -A PID=([nginx]=$NGINX_PID [portcullis]=$P_PID)
wait_https "${URL[nginx]}" "$NGINX_PID" "$TMP/nginx/logs/error.log"
wait_https "${URL[portcullis]}" "$P_PID" "$TMP/portcullis.log"
for c in nginx portcullis; do
    v=$(curl -sk --http2 -o /dev/null -w '%{http_version}' "${URL[$c]}")
    [[ $v == 2 ]] || die "$c did not negotiate HTTP/2 (got $v)"
done
log "nginx pid $NGINX_PID, portcullis pid $P_PID, upstream on $UPORT"

# run SCENARIO CONTENDER -> "req/s cpu_us_per_req latency_ms errors"
run() {
    local s=$1 c=$2 url=${URL[$2]} out t0 t1 hz requests rps lat errors
    hz=$(getconf CLK_TCK)
    t0=$(ticks "${PID[$c]}")
    case $s in
    tls-keepalive)
        out=$(taskset -c "$WRK_CPUS" wrk -t1 -c50 -d"${DURATION}s" --latency "$url")
        ;;
    tls-handshake)
        out=$(taskset -c "$WRK_CPUS" wrk -t1 -c50 -d"${DURATION}s" --latency -H 'Connection: close' "$url")
        ;;
    h2-tls)
        out=$(taskset -c "$WRK_CPUS" h2load -c16 -m10 -D "$DURATION" "$url" 2>&1)
        ;;
    esac
    t1=$(ticks "${PID[$c]}")
    if [[ $s == h2-tls ]]; then
        requests=$(echo "$out" | awk '/^requests:/ {print $8}')   # succeeded
        errors=$(echo "$out" | awk '/^requests:/ {print $10 + $12}')
        rps=$(echo "$out" | awk '/^finished in/ {print $4}')
        lat=$(echo "$out" | awk '/^time for request:/ {print $6}') # mean
    else
        requests=$(echo "$out" | awk '/requests in/ {print $1}')
        errors=$(echo "$out" | awk '/Non-2xx/ {n+=$NF} /Socket errors/ {gsub(/[^0-9 ]/," "); n+=$1+$2+$3+$4} END {print n+0}')
        rps=$(echo "$out" | awk '/^Requests\/sec/ {print $2}')
        lat=$(echo "$out" | awk '$1 == "99%" {print $2}')
    fi
    python3 - "$t0" "$t1" "$hz" "$requests" "$rps" "$lat" "$errors" <<'PY'
import re, sys
t0, t1, hz, n, rps, lat, err = sys.argv[1:]
def ms(v):
    m = re.match(r"([0-9.]+)(us|ms|s)$", v)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
cpu = (int(t1) - int(t0)) / int(hz) / max(int(n), 1) * 1e6
print(f"{float(rps):.0f} {cpu:.2f} {ms(lat):.3f} {err}")
PY
}

RAW="$TMP/raw.tsv"
for s in $SCENARIOS; do
    for c in nginx portcullis; do # warm-up
        case $s in h2-tls) taskset -c "$WRK_CPUS" h2load -c16 -m10 -D 2 "${URL[$c]}" >/dev/null 2>&1 ;;
        *) taskset -c "$WRK_CPUS" wrk -t1 -c50 -d2s "${URL[$c]}" >/dev/null ;; esac
    done
done
for r in $(seq "$ROUNDS"); do
    for s in $SCENARIOS; do
        for c in nginx portcullis; do
            log "round $r/$ROUNDS: $s $c"
            printf '%s\t%s\t%s\n' "$s" "$c" "$(run "$s" "$c" | tr ' ' '\t')" >>"$RAW"
        done
    done
done

REPORT=$(python3 - "$RAW" "$ROUNDS" "$DURATION" <<'PY'
import statistics, sys
from collections import defaultdict
raw, rounds, duration = sys.argv[1], sys.argv[2], sys.argv[3]
rows = defaultdict(list)
for line in open(raw):
    s, c, rps, cpu, lat, err = line.split()
    rows[(s, c)].append((float(rps), float(cpu), float(lat), int(err)))
titles = {"tls-keepalive": "HTTPS/1.1 keep-alive, 50 connections (wrk)",
          "tls-handshake": "HTTPS/1.1, new TLS connection per request (wrk)",
          "h2-tls": "HTTP/2 over TLS, 16 connections x 10 streams (h2load)"}
med = lambda xs: statistics.median(xs)
print(f"Medians of {rounds} interleaved round(s) of {duration} s; latency = p99 (wrk) or mean (h2load).")
print()
print("| scenario | contender | req/s | CPU µs/req | latency ms | errors |")
print("|---|---|---:|---:|---:|---:|")
order = [s for s in titles if any(k[0] == s for k in rows)]
for s in order:
    for c in ("nginx", "portcullis"):
        v = rows[(s, c)]
        print(f"| {titles[s]} | {c} | {med([x[0] for x in v]):.0f} | {med([x[1] for x in v]):.2f} | "
              f"{med([x[2] for x in v]):.3f} | {sum(x[3] for x in v)} |")
print()
print("| scenario | req/s ratio (Portcullis / nginx) | CPU/req ratio | target |")
print("|---|---:|---:|---|")
for s in order:
    n, p = rows[(s, "nginx")], rows[(s, "portcullis")]
    rr = med([x[0] for x in p]) / med([x[0] for x in n])
    cr = med([x[1] for x in p]) / med([x[1] for x in n])
    ok = "PASS" if rr >= 1.0 and cr <= 1.0 else "FAIL"
    print(f"| {titles[s]} | {rr:.2f} | {cr:.2f} | {ok} (req/s >= 1.0, CPU <= 1.0) |")
PY
)
mkdir -p "$ROOT/bench/results"
{
    echo "# TLS and HTTP/2: Portcullis vs nginx"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- $("$NGINX" -v 2>&1); h2load $(h2load --version 2>/dev/null | awk '{print $2}'); $(nproc) CPUs"
    echo "- layout: proxy alone on CPU $SUT_CPUS; upstream and load generator on CPU $WRK_CPUS; one worker each"
    echo
    echo "$REPORT"
} | tee "$ROOT/bench/results/protocols-latest.md"
