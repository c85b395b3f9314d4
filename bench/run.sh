#!/usr/bin/env bash
# Portcullis benchmark: Portcullis vs nginx vs the bare upstream, on loopback, plus
# Portcullis-only groups: route-table size (routes), authentication cost (auth),
# policy cost (policies: CORS + security headers + a local rate limit, a cache hit)
# and upstream groups (group: three targets with active health checks against one).
#
# Usage (from anywhere; needs root or sudo-less apt for the first run):
#   bench/run.sh                                 # full run, ~9 minutes
#   BENCH_DURATION=5 BENCH_ROUNDS=1 bench/run.sh # quick smoke run
#
# Knobs (environment):
#   BENCH_DURATION=10      seconds per measured wrk run
#   BENCH_WARMUP=2         seconds of warm-up per (contender, scenario) before round 1
#   BENCH_ROUNDS=3         interleaved rounds; the table shows the median per metric
#   BENCH_CONNECTIONS=50   wrk -c
#   BENCH_THREADS=1        wrk -t
#   BENCH_CONTENDERS="direct nginx portcullis routes auth policies group"   subset to run
#   BENCH_WORKERS=1        nginx worker_processes and PORTCULLIS_WORKERS (2 with
#                          BENCH_LAYOUT=shared: both proxies on both cores)
#   BENCH_LAYOUT=isolated  isolated: proxy alone on SUT CPUs, upstream with wrk; shared: proxy+upstream
#   BENCH_SUT_CPUS=0       taskset list for the proxy (and, with shared, the upstream)
#   BENCH_WRK_CPUS=1       taskset list for the load generator (and, with isolated, the upstream)
#   BENCH_PIN=1            set to 0 to disable CPU pinning
#   BENCH_NO_BUILD=1       do not run cargo build (use existing binaries)
#   BENCH_NO_INSTALL=1     do not apt-get install missing tools
#   BENCH_PORTCULLIS_BIN   default: <target>/release/portcullis
#   BENCH_UPSTREAM_BIN     default: <target>/release/portcullis-bench-upstream
#   BENCH_PORTCULLIS_CONFIG default: examples/proxy.yaml
#   BENCH_KEEP_TMP=1       keep the temp dir (configs, logs, raw wrk output)
#
# Output: a markdown report on stdout and in bench/results/latest.md; the per-run
# raw numbers go to bench/results/runs-latest.tsv. Progress goes to stderr.
# See docs/performance.md for the method and the targets.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS_DIR="$ROOT/bench/results"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac

DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
ROUNDS=${BENCH_ROUNDS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-50}
THREADS=${BENCH_THREADS:-1}
CONTENDERS=${BENCH_CONTENDERS:-direct nginx portcullis routes auth policies group}
WORKERS=${BENCH_WORKERS:-1}
SUT_CPUS=${BENCH_SUT_CPUS:-0}
WRK_CPUS=${BENCH_WRK_CPUS:-1}
PIN=${BENCH_PIN:-1}
PORTCULLIS_BIN=${BENCH_PORTCULLIS_BIN:-$TARGET_DIR/release/portcullis}
UPSTREAM_BIN=${BENCH_UPSTREAM_BIN:-$TARGET_DIR/release/portcullis-bench-upstream}
PORTCULLIS_CONFIG=${BENCH_PORTCULLIS_CONFIG:-$ROOT/examples/proxy.yaml}
POST_BYTES=16384
BIG_BYTES=65536

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }
want() { [[ " $CONTENDERS " == *" $1 "* ]]; }
want_gateway() { want portcullis || want routes || want auth || want policies || want group; }

for v in DURATION WARMUP ROUNDS CONNECTIONS THREADS WORKERS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "BENCH_$v must be a non-negative integer (got '${!v}')"
done
((ROUNDS >= 1 && DURATION >= 1)) || die "BENCH_ROUNDS and BENCH_DURATION must be >= 1"
for c in $CONTENDERS; do
    case $c in direct | nginx | portcullis | routes | auth | policies | group) ;; *) die "unknown contender '$c'" ;; esac
done

# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    [[ ${BENCH_NO_INSTALL:-0} == 1 ]] && die "$1 is missing and BENCH_NO_INSTALL=1"
    command -v apt-get >/dev/null || die "$1 is missing and apt-get is not available"
    local sudo=""
    ((EUID == 0)) || sudo="sudo"
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        $sudo apt-get update -qq >&2
        APT_UPDATED=1
    fi
    local pkg
    for pkg in "${@:2}"; do
        log "installing $pkg"
        if DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$pkg" >&2; then
            return 0
        fi
    done
    die "could not install any of: ${*:2}"
}

NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
if want nginx && [[ -z $NGINX ]]; then
    apt_install nginx nginx-light nginx
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi
command -v wrk >/dev/null || apt_install wrk wrk
command -v curl >/dev/null || apt_install curl curl
command -v taskset >/dev/null || apt_install taskset util-linux
if want auth; then # test tokens: python3 standard library + openssl for RS256
    command -v python3 >/dev/null || apt_install python3 python3-minimal python3
    command -v openssl >/dev/null || apt_install openssl openssl
fi
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)

if [[ $PIN == 1 && $NCPU -lt 2 ]]; then
    log "only $NCPU CPU: disabling pinning"
    PIN=0
fi
# CPU layout (2 cores), BENCH_LAYOUT:
#   isolated (default): the proxy alone on CPU $SUT_CPUS; the upstream and wrk share
#     CPU $WRK_CPUS. The proxy is never preempted by a neighbour on every loopback
#     wake-up, so CPU us/req measures the proxy's own work; the flags say when the
#     load core saturates (then req/s understates the proxy).
#   shared: the proxy and the upstream share CPU $SUT_CPUS, wrk alone on the other.
# The same layout applies to every contender. Command prefixes are arrays, not
# functions, so that `$!` is the real process id.
LAYOUT=${BENCH_LAYOUT:-isolated}
PIN_SUT=()
PIN_WRK=()
PIN_UP=()
if [[ $PIN == 1 ]]; then
    PIN_SUT=(taskset -c "$SUT_CPUS")
    PIN_WRK=(taskset -c "$WRK_CPUS")
    case $LAYOUT in
    isolated) PIN_UP=(taskset -c "$WRK_CPUS") ;;
    shared) PIN_UP=(taskset -c "$SUT_CPUS") ;;
    *) die "BENCH_LAYOUT must be isolated or shared" ;;
    esac
fi

# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------
if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    pkgs=(-p portcullis-bench-upstream)
    if want_gateway; then pkgs+=(-p portcullis); fi
    log "cargo build --release ${pkgs[*]}"
    (cd "$ROOT" && cargo build --release "${pkgs[@]}" >&2)
fi
[[ -x $UPSTREAM_BIN ]] || die "upstream binary not found: $UPSTREAM_BIN"
if want_gateway; then
    [[ -x $PORTCULLIS_BIN ]] || die "portcullis binary not found: $PORTCULLIS_BIN (set BENCH_CONTENDERS=\"direct nginx\" to skip it)"
fi

# ---------------------------------------------------------------------------
# Temp dir, process bookkeeping, cleanup
# ---------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${BENCH_KEEP_TMP:-0} == 1 ]]; then
        log "kept temp dir $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A USED_PORTS=()
# free_port VAR: a loopback port nobody listens on, below the ephemeral range
# (32768+) so that wrk's client sockets can never collide with it.
free_port() {
    local p
    for _ in $(seq 1 500); do
        p=$((20000 + RANDOM % 12000))
        [[ -n ${USED_PORTS[$p]:-} ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS[$p]=1
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free loopback port found"
}

# wait_http NAME PID URL TIMEOUT_S LOG [HEADER]: wait until URL answers 200
# (with HEADER, e.g. "Authorization: Bearer ...", sent on every try).
wait_http() {
    local name=$1 pid=$2 url=$3 tries=$(($4 * 10)) logf=$5 hdr=()
    [[ -n ${6:-} ]] && hdr=(-H "$6")
    for _ in $(seq 1 "$tries"); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -20 "$logf" >&2 || true
            die "$name exited during start-up (log above, from $logf)"
        fi
        if curl -fsS -o /dev/null --max-time 1 "${hdr[@]}" "$url" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    tail -20 "$logf" >&2 || true
    die "$name did not answer 200 on $url within $4 s (log above, from $logf)"
}

children_of() {
    if command -v pgrep >/dev/null; then pgrep -P "$1" || true; else
        cat "/proc/$1/task/$1/children" 2>/dev/null || true
    fi
}

# ---------------------------------------------------------------------------
# Upstream
# ---------------------------------------------------------------------------
free_port UPORT
UPSTREAM_URL="http://127.0.0.1:$UPORT"
"${PIN_UP[@]}" "$UPSTREAM_BIN" --listen "127.0.0.1:$UPORT" >"$TMP/upstream.log" 2>&1 &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
wait_http upstream "$UPSTREAM_PID" "$UPSTREAM_URL/" 10 "$TMP/upstream.log"
grep -q "listening on" "$TMP/upstream.log" || die "upstream did not print 'listening on'"
log "upstream pid $UPSTREAM_PID on $UPSTREAM_URL"

declare -A PORT=() PROC_PIDS=()
# Per-contender request header (auth group: "Authorization: Bearer ..."), sent by
# the sanity check and by wrk.
declare -A C_HEADER=()
PORT[direct]=$UPORT
PROC_PIDS[direct]=$UPSTREAM_PID

# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------
if want nginx; then
    free_port NPORT
    ND="$TMP/nginx"
    mkdir -p "$ND/logs" "$ND/tmp"
    user_line=""
    ((EUID == 0)) && user_line="user root;" # workers must reach the 0700 temp dir
    cat >"$ND/nginx.conf" <<EOF
$user_line
worker_processes $WORKERS;
daemon off;
master_process on;
pid $ND/nginx.pid;
error_log $ND/logs/error.log warn;
worker_rlimit_nofile 65536;
events {
    worker_connections 4096;
    multi_accept on;
}
http {
    access_log off;
    client_body_temp_path $ND/tmp/client_body;
    proxy_temp_path       $ND/tmp/proxy;
    fastcgi_temp_path     $ND/tmp/fastcgi;
    uwsgi_temp_path       $ND/tmp/uwsgi;
    scgi_temp_path        $ND/tmp/scgi;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    tcp_nodelay on;
    # Keep 16 KiB request bodies and 64 KiB responses in memory (the x86-64
    # defaults would spill them to temp files, which is unfair to nginx).
    client_body_buffer_size 64k;
    client_max_body_size 1m;
    proxy_buffer_size 16k;
    proxy_buffers 8 16k;
    proxy_busy_buffers_size 32k;
    proxy_max_temp_file_size 0;
    upstream backend {
        server 127.0.0.1:$UPORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NPORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    "$NGINX" -t -q -p "$ND" -e "$ND/logs/error.log" -c "$ND/nginx.conf" 2>"$ND/logs/check.log" ||
        die "nginx config test failed: $(cat "$ND/logs/check.log")"
    "${PIN_SUT[@]}" "$NGINX" -p "$ND" -e "$ND/logs/error.log" -c "$ND/nginx.conf" >"$ND/logs/stdout.log" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    wait_http nginx "$NGINX_PID" "http://127.0.0.1:$NPORT/" 10 "$ND/logs/error.log"
    PORT[nginx]=$NPORT
    PROC_PIDS[nginx]=$NGINX_PID
    log "nginx master pid $NGINX_PID on 127.0.0.1:$NPORT (workers: $(children_of "$NGINX_PID" | tr '\n' ' '))"
fi

# ---------------------------------------------------------------------------
# Portcullis
# ---------------------------------------------------------------------------
# assign_port NAME CONFIG: pick NAME's port and write it into CONFIG. Generated
# configs carry a __PORT__ placeholder; examples/proxy.yaml reads PORTCULLIS_LISTEN.
assign_port() {
    local port
    free_port port
    sed -i "s/__PORT__/$port/g" "$2" 2>/dev/null || true
    PORT[$1]=$port
}

# start_portcullis NAME CONFIG TIMEOUT: start it and wait until it answers 200 on
# / (with C_HEADER[NAME] if set). Access logging is off, as for nginx.
start_portcullis() {
    local name=$1 config=$2 timeout=$3 port aport pid
    [[ -n ${PORT[$name]:-} ]] || assign_port "$name" "$config"
    port=${PORT[$name]}
    free_port aport
    PORTCULLIS_LISTEN="127.0.0.1:$port" UPSTREAM_URL="$UPSTREAM_URL" \
        PORTCULLIS_ADMIN_LISTEN="127.0.0.1:$aport" PORTCULLIS_WORKERS=$WORKERS PORTCULLIS_ACCESS_LOG=false \
        "${PIN_SUT[@]}" "$PORTCULLIS_BIN" run -c "$config" >"$TMP/$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_http "$name" "$pid" "http://127.0.0.1:$port/" "$timeout" "$TMP/$name.log" "${C_HEADER[$name]:-}"
    PROC_PIDS[$name]=$pid
    log "$name pid $pid on 127.0.0.1:$port (admin $aport, config $config)"
}

# gen_routes N FILE: N routes = (N-1) parameterised routes + a catch-all prefix.
gen_routes() {
    local n=$1 file=$2
    {
        printf 'listeners:\n  - name: main\n    address: "127.0.0.1:__PORT__"\n'
        printf 'logging:\n  access_log: false\nroutes:\n'
        awk -v n="$n" -v up="$UPSTREAM_URL" 'BEGIN {
            for (i = 0; i < n - 1; i++)
                printf "  - name: r%d\n    path: /svc%d/items/{id}\n    proxy:\n      upstream: \"%s\"\n", i, i, up
        }'
        printf '  - name: fallback\n    path_prefix: /\n    proxy:\n      upstream: "%s"\n' "$UPSTREAM_URL"
    } >"$file"
}

if want portcullis; then
    [[ -f $PORTCULLIS_CONFIG ]] || die "Portcullis config not found: $PORTCULLIS_CONFIG"
    cp "$PORTCULLIS_CONFIG" "$TMP/portcullis.yaml"
    start_portcullis portcullis "$TMP/portcullis.yaml" 20
fi
if want routes; then
    gen_routes 10 "$TMP/routes-10.yaml"
    gen_routes 10000 "$TMP/routes-10000.yaml"
    start_portcullis routes-10 "$TMP/routes-10.yaml" 20
    start_portcullis routes-10000 "$TMP/routes-10000.yaml" 60
fi

# Auth group: the small GET through four gateways that differ only in the route's
# `auth` (none, JWT HS256, JWT RS256, API key). Each has its own embedded store.
AUTH_FIXTURES="$ROOT/crates/portcullis-auth/tests/fixtures"
AUTH_HS_SECRET="bench-secret-0123456789abcdef0123"
# gen_auth NAME AUTHENTICATOR FILE (AUTHENTICATOR empty: a `public` route; a route with
# no auth beside configured authenticators is a config error)
gen_auth() {
    local name=$1 authn=$2 file=$3 auth_line="    public: true"
    [[ -z $authn ]] || auth_line="    auth: {authenticators: [$authn]}"
    cat >"$file" <<EOF
listeners: [{address: "127.0.0.1:__PORT__"}]
logging: {access_log: false}
store: {data_dir: "$TMP/data-$name"}
authenticators:
  hs: {jwt: {algorithms: [HS256], secret: "$AUTH_HS_SECRET"}}
  rs: {jwt: {algorithms: [RS256], public_keys: ["$AUTH_FIXTURES/rsa1.pub.pem"]}}
  keys: {api_key: {cache_ttl: 60s}}
routes:
  - path_prefix: /
$auth_line
    proxy: {upstream: "$UPSTREAM_URL"}
EOF
}
# make_jwt ALG: a compact JWT {"sub":"bench","exp":now+1 day}; HS256 with
# $AUTH_HS_SECRET, RS256 with rsa1.key.pem (signed by openssl).
make_jwt() {
    local alg=$1 input sig
    input=$(python3 -c '
import base64, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
enc = lambda o: b64(json.dumps(o, separators=(",", ":")).encode())
print(enc({"alg": sys.argv[1], "typ": "JWT"}) + "." + enc({"sub": "bench", "exp": int(time.time()) + 86400}))
' "$alg") || die "python3 failed to build the $alg token"
    case $alg in
    HS256)
        sig=$(python3 -c '
import base64, hashlib, hmac, sys
mac = hmac.new(sys.argv[1].encode(), sys.argv[2].encode(), hashlib.sha256).digest()
print(base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
' "$AUTH_HS_SECRET" "$input") || die "python3 failed to sign the HS256 token"
        ;;
    RS256)
        sig=$(printf '%s' "$input" | openssl dgst -sha256 -sign "$AUTH_FIXTURES/rsa1.key.pem" -binary |
            python3 -c 'import base64, sys; print(base64.urlsafe_b64encode(sys.stdin.buffer.read()).rstrip(b"=").decode())') ||
            die "openssl failed to sign the RS256 token"
        ;;
    esac
    [[ -n $sig ]] || die "empty $alg signature"
    echo "$input.$sig"
}

if want auth; then
    for f in rsa1.pub.pem rsa1.key.pem; do
        [[ -f $AUTH_FIXTURES/$f ]] || die "auth fixture not found: $AUTH_FIXTURES/$f"
    done
    gen_auth auth-plain "" "$TMP/auth-plain.yaml"
    gen_auth auth-hs256 hs "$TMP/auth-hs256.yaml"
    gen_auth auth-rs256 rs "$TMP/auth-rs256.yaml"
    gen_auth auth-apikey keys "$TMP/auth-apikey.yaml"
    C_HEADER[auth-hs256]="Authorization: Bearer $(make_jwt HS256)"
    C_HEADER[auth-rs256]="Authorization: Bearer $(make_jwt RS256)"
    # The key goes into the embedded store before that gateway opens it.
    assign_port auth-apikey "$TMP/auth-apikey.yaml"
    "$PORTCULLIS_BIN" apikey create bench -c "$TMP/auth-apikey.yaml" >"$TMP/apikey.out" 2>"$TMP/apikey.err" ||
        die "portcullis apikey create failed: $(cat "$TMP/apikey.err")"
    api_key=$(tail -1 "$TMP/apikey.out")
    [[ -n $api_key && $api_key != *" "* ]] || die "unexpected 'apikey create' output: $(cat "$TMP/apikey.out")"
    C_HEADER[auth-apikey]="Authorization: Bearer $api_key"
    for c in auth-plain auth-hs256 auth-rs256 auth-apikey; do
        start_portcullis "$c" "$TMP/$c.yaml" 20
    done
fi

# Policies group: the small GET through three gateways that differ only in the
# route's policies: none; CORS + helmet-style security headers + a local per-IP rate
# limit far above the load (requests carry an allowed Origin, so the CORS response
# headers are built too); a response cache whose every request after the first is
# a hit (no upstream round trip).
gen_policies() {
    local name=$1 policies=$2 file=$3
    cat >"$file" <<EOF
listeners: [{address: "127.0.0.1:__PORT__"}]
logging: {access_log: false}
store: {data_dir: "$TMP/data-$name"}
routes:
  - path_prefix: /
    public: true
$policies
    proxy: {upstream: "$UPSTREAM_URL"}
EOF
}
if want policies; then
    gen_policies pol-plain "" "$TMP/pol-plain.yaml"
    gen_policies pol-edge '    cors: {allowed_origins: ["https://app.example.com"], allow_credentials: true}
    security_headers: true
    rate_limits: [{requests: 1000000000, per: 1s, by: ip}]' "$TMP/pol-edge.yaml"
    gen_policies pol-cache "    cache: {ttl: 1h}" "$TMP/pol-cache.yaml"
    C_HEADER[pol-edge]="Origin: https://app.example.com"
    for c in pol-plain pol-edge pol-cache; do
        start_portcullis "$c" "$TMP/$c.yaml" 20
    done
fi

# Upstream-group group: the small GET through one target, and through a group of
# three (round-robin, active health checks every second on each target). The two
# extra targets are upstream processes of their own beside the first.
if want group; then
    GROUP_URLS=("$UPSTREAM_URL")
    for i in 2 3; do
        free_port gport
        "${PIN_UP[@]}" "$UPSTREAM_BIN" --listen "127.0.0.1:$gport" >"$TMP/upstream$i.log" 2>&1 &
        gpid=$!
        PIDS+=("$gpid")
        wait_http "upstream$i" "$gpid" "http://127.0.0.1:$gport/" 10 "$TMP/upstream$i.log"
        GROUP_URLS+=("http://127.0.0.1:$gport")
    done
    gen_policies group-single "" "$TMP/group-single.yaml"
    cat >"$TMP/group-three.yaml" <<EOF
listeners: [{address: "127.0.0.1:__PORT__"}]
logging: {access_log: false}
store: {data_dir: "$TMP/data-group-three"}
upstreams:
  three:
    targets:
      - {url: "${GROUP_URLS[0]}"}
      - {url: "${GROUP_URLS[1]}"}
      - {url: "${GROUP_URLS[2]}"}
    health:
      active: {path: /, interval: 1s, timeout: 1s}
routes:
  - path_prefix: /
    public: true
    proxy: {upstream: three}
EOF
    for c in group-single group-three; do
        start_portcullis "$c" "$TMP/$c.yaml" 20
    done
fi

# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------
cat >"$TMP/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
EOF
{
    printf 'wrk.method = "POST"\nwrk.body = string.rep("a", %d)\n' "$POST_BYTES"
    printf 'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    cat "$TMP/report.lua"
} >"$TMP/post.lua"

SCENARIOS=(small big post routes auth policies group)
declare -A S_PATH=([small]=/ [big]=/64k [post]=/upload [routes]=/svc5/items/42 [auth]=/ [policies]=/ [group]=/)
declare -A S_SCRIPT=([small]=report.lua [big]=report.lua [post]=post.lua [routes]=report.lua [auth]=report.lua
    [policies]=report.lua [group]=report.lua)
declare -A S_TITLE=([small]="small GET /" [big]="64 KiB GET /64k" [post]="16 KiB POST" [routes]="routes GET /svc5/items/42"
    [auth]="auth small GET /" [policies]="policies small GET /" [group]="group small GET /")

contenders_for() {
    local c out=()
    if [[ $1 == routes ]]; then
        for c in routes-10 routes-10000; do [[ -n ${PORT[$c]:-} ]] && out+=("$c"); done
    elif [[ $1 == auth ]]; then
        for c in auth-plain auth-hs256 auth-rs256 auth-apikey; do [[ -n ${PROC_PIDS[$c]:-} ]] && out+=("$c"); done
    elif [[ $1 == policies ]]; then
        for c in pol-plain pol-edge pol-cache; do [[ -n ${PROC_PIDS[$c]:-} ]] && out+=("$c"); done
    elif [[ $1 == group ]]; then
        for c in group-single group-three; do [[ -n ${PROC_PIDS[$c]:-} ]] && out+=("$c"); done
    else
        for c in direct nginx portcullis; do [[ -n ${PORT[$c]:-} ]] && out+=("$c"); done
    fi
    echo "${out[@]}"
}

# Sanity: every contender answers every scenario correctly before we measure;
# contenders that need a credential answer 200 with it and 401 without.
head -c "$POST_BYTES" /dev/zero | tr '\0' 'a' >"$TMP/post.body"
for s in "${SCENARIOS[@]}"; do
    for c in $(contenders_for "$s"); do
        url="http://127.0.0.1:${PORT[$c]}${S_PATH[$s]}"
        hdr=()
        [[ -n ${C_HEADER[$c]:-} ]] && hdr=(-H "${C_HEADER[$c]}")
        if [[ $s == post ]]; then
            out=$(curl -sS -o /dev/null -w '%{http_code} %{size_download}' --max-time 5 "${hdr[@]}" \
                -H 'Content-Type: application/octet-stream' --data-binary "@$TMP/post.body" "$url") || true
        else
            out=$(curl -sS -o /dev/null -w '%{http_code} %{size_download}' --max-time 5 "${hdr[@]}" "$url") || true
        fi
        [[ ${out%% *} == 200 ]] || die "$c: ${S_TITLE[$s]} answered '$out' (want 200)"
        [[ $s != big || ${out##* } == "$BIG_BYTES" ]] || die "$c: /64k returned ${out##* } bytes"
        if ((${#hdr[@]} > 0)) && [[ $s == auth ]]; then
            out=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "$url") || true
            [[ $out == 401 ]] || die "$c: ${S_TITLE[$s]} without credential answered '$out' (want 401)"
        fi
    done
done
# The policies group measures what it says: CORS headers built, cache hits.
if [[ -n ${PROC_PIDS[pol-edge]:-} ]]; then
    curl -sS -D - -o /dev/null --max-time 5 -H "${C_HEADER[pol-edge]}" "http://127.0.0.1:${PORT[pol-edge]}/" |
        grep -qi '^access-control-allow-origin: https://app.example.com' || die "pol-edge: no CORS headers"
fi
if [[ -n ${PROC_PIDS[pol-cache]:-} ]]; then
    curl -sS -D - -o /dev/null --max-time 5 "http://127.0.0.1:${PORT[pol-cache]}/" |
        grep -qi '^x-cache: HIT' || die "pol-cache: not answered from the cache"
fi
log "sanity checks passed"

# proc_ticks "PID..." : utime+stime (clock ticks) summed over the processes.
proc_ticks() {
    local pid sum=0 t
    for pid in $1; do
        # Fields after "comm)": state is $1, utime $12, stime $13.
        t=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
        sum=$((sum + t))
    done
    echo "$sum"
}
proc_rss_kb() {
    local pid sum=0 r
    for pid in $1; do
        r=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
        sum=$((sum + ${r:-0}))
    done
    echo "$sum"
}
# The processes whose CPU and memory we charge to a contender.
measured_pids() {
    local pid=${PROC_PIDS[$1]}
    kill -0 "$pid" 2>/dev/null || die "$1 (pid $pid) is no longer running"
    if [[ $1 == nginx ]]; then echo "$pid $(children_of "$pid" | tr '\n' ' ')"; else echo "$pid"; fi
}
# "busy total" ticks of the first CPU of a taskset list, from /proc/stat: used
# to show that the SUT core was saturated and the wrk core was not.
first_cpu() { echo "$1" | sed 's/[,-].*//'; }
SUT_CPU0=$(first_cpu "$SUT_CPUS")
WRK_CPU0=$(first_cpu "$WRK_CPUS")
core_ticks() {
    awk -v c="cpu$1" '$1 == c { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat
}

RAW="$TMP/raw"
mkdir -p "$RAW"
RUNS="$TMP/runs.tsv"
printf 'round\tscenario\tcontender\treq_s\tp50_ms\tp99_ms\tnon2xx\tsocket_err\tcpu_us_per_req\tproxy_cpu_pct\tsut_core_pct\twrk_core_pct\trss_mib\trequests\n' >"$RUNS"

# run_wrk ROUND SCENARIO CONTENDER DURATION  (ROUND=warmup: not recorded)
run_wrk() {
    local round=$1 s=$2 c=$3 d=$4 pids t0 t1 w0 w1 a0 at0 a1 at1 b0 bt0 b1 bt1 out line hdr=()
    local url="http://127.0.0.1:${PORT[$c]}${S_PATH[$s]}"
    [[ -n ${C_HEADER[$c]:-} ]] && hdr=(-H "${C_HEADER[$c]}")
    pids=$(measured_pids "$c")
    t0=$(proc_ticks "$pids")
    read -r a0 at0 < <(core_ticks "$SUT_CPU0")
    read -r b0 bt0 < <(core_ticks "$WRK_CPU0")
    w0=$(date +%s%N)
    out="$RAW/$round-$s-$c.txt"
    "${PIN_WRK[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${d}s" --timeout 5s --latency "${hdr[@]}" \
        -s "$TMP/${S_SCRIPT[$s]}" "$url" >"$out" 2>&1 || die "wrk failed for $c/$s: $(tail -3 "$out")"
    w1=$(date +%s%N)
    read -r a1 at1 < <(core_ticks "$SUT_CPU0")
    read -r b1 bt1 < <(core_ticks "$WRK_CPU0")
    pids=$(measured_pids "$c") # nginx may have respawned a worker
    t1=$(proc_ticks "$pids")
    [[ $round == warmup ]] && return 0
    line=$(grep '^BENCH ' "$out") || die "no summary in wrk output for $c/$s"
    # shellcheck disable=SC2086
    awk -v round="$round" -v s="$s" -v c="$c" -v dt=$((t1 - t0)) -v hz="$CLK_TCK" \
        -v wall_ns=$((w1 - w0)) -v sb=$((a1 - a0)) -v st=$((at1 - at0)) -v wb=$((b1 - b0)) -v wt=$((bt1 - bt0)) -v rss="$(proc_rss_kb "$pids")" '
        {
            for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            req = v["requests"]
            rps = req / (v["duration_us"] / 1e6)
            sock = v["connect"] + v["read"] + v["write"] + v["timeout"]
            cpu = req > 0 ? dt / hz * 1e6 / req : 0
            pct = dt / hz / (wall_ns / 1e9) * 100
            spct = st > 0 ? sb / st * 100 : 0
            wpct = wt > 0 ? wb / wt * 100 : 0
            printf "%s\t%s\t%s\t%.0f\t%.3f\t%.3f\t%d\t%d\t%.2f\t%.0f\t%.0f\t%.0f\t%.1f\t%d\n",
                round, s, c, rps, v["p50_us"] / 1000, v["p99_us"] / 1000, v["non2xx"], sock,
                cpu, pct, spct, wpct, rss / 1024, req
        }' <<<"$line" >>"$RUNS"
    log "round $round  $(printf '%-8s %-13s' "$s" "$c") $(tail -1 "$RUNS" | cut -f4- | awk -F'\t' '{printf "%s req/s  p50 %s ms  p99 %s ms  err %s/%s  cpu %s us/req", $1, $2, $3, $4, $5, $6}')"
}

if ((WARMUP > 0)); then
    log "warm-up: ${WARMUP}s per contender and scenario"
    for s in "${SCENARIOS[@]}"; do
        for c in $(contenders_for "$s"); do run_wrk warmup "$s" "$c" "$WARMUP"; done
    done
fi

for r in $(seq 1 "$ROUNDS"); do
    log "round $r/$ROUNDS"
    for s in "${SCENARIOS[@]}"; do
        for c in $(contenders_for "$s"); do
            run_wrk "$r" "$s" "$c" "$DURATION"
            sleep 1
        done
    done
done

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
# Per (scenario, contender): median of every metric over the rounds; errors are summed.
MED="$TMP/medians.tsv"
for s in "${SCENARIOS[@]}"; do
    for c in $(contenders_for "$s"); do
        awk -F'\t' -v s="$s" -v c="$c" '
            function median(col,   n, i, j, t, a) {
                n = 0
                for (i = 1; i <= rows; i++) a[++n] = val[i, col]
                for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
                return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
            }
            NR > 1 && $2 == s && $3 == c { rows++; for (k = 4; k <= NF; k++) val[rows, k] = $k + 0; n2 += $7; se += $8 }
            END {
                printf "%s\t%s\t%.0f\t%.3f\t%.3f\t%d\t%d\t%.2f\t%.0f\t%.0f\t%.0f\t%.1f\t%d\n", s, c,
                    median(4), median(5), median(6), n2, se, median(9), median(10), median(11), median(12),
                    median(13), rows
            }' "$RUNS"
    done
done >"$MED"

label() {
    case $1 in
    direct) echo "direct (upstream)" ;;
    nginx) echo "nginx" ;;
    portcullis) echo "Portcullis" ;;
    routes-10) echo "Portcullis, 10 routes" ;;
    routes-10000) echo "Portcullis, 10,000 routes" ;;
    auth-plain) echo "Portcullis, plain proxy (no auth)" ;;
    auth-hs256) echo "Portcullis, JWT HS256" ;;
    auth-rs256) echo "Portcullis, JWT RS256 (cached token)" ;;
    auth-apikey) echo "Portcullis, API key" ;;
    pol-plain) echo "Portcullis, plain proxy (no policies)" ;;
    pol-edge) echo "Portcullis, CORS + security headers + local rate limit" ;;
    pol-cache) echo "Portcullis, cache hit" ;;
    group-single) echo "Portcullis, one target" ;;
    group-three) echo "Portcullis, group of 3 targets, active health checks" ;;
    esac
}
get() { awk -F'\t' -v s="$1" -v c="$2" -v col="$3" '$1 == s && $2 == c { print $col }' "$MED"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }
# had_errors SCENARIO CONTENDER...: true if any of them saw non-2xx or socket errors.
had_errors() {
    local s=$1 c
    shift
    for c in "$@"; do
        [[ $(awk -F'\t' -v s="$s" -v c="$c" '$1 == s && $2 == c { print $6 + $7 }' "$MED") == 0 ]] || return 0
    done
    return 1
}
INVALID=0
verdict() { # verdict RATIO OP LIMIT  (INVALID=1: the compared rows had errors)
    awk -v r="$1" -v op="$2" -v l="$3" -v bad="$INVALID" 'BEGIN {
        if (bad) { print "INVALID (errors)"; exit }
        if (r == "n/a") { print "n/a"; exit }
        ok = (op == ">=") ? (r + 0 >= l) : (r + 0 <= l)
        print (ok ? "PASS" : "FAIL") " (" op " " l ")"
    }'
}

if [[ $PIN == 1 ]]; then
    if [[ $LAYOUT == isolated ]]; then
        layout="proxy alone on CPU $SUT_CPUS, upstream and wrk on CPU $WRK_CPUS"
    else
        layout="proxy and upstream on CPU $SUT_CPUS, wrk alone on CPU $WRK_CPUS"
    fi
else
    layout="no CPU pinning"
fi
git_rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "no commit")
if [[ -n $(cd "$ROOT" && git status --porcelain 2>/dev/null | head -1) ]]; then git_rev="$git_rev (dirty)"; fi
nginx_v=$({ [[ -n $NGINX ]] && "$NGINX" -v 2>&1; } || echo "not used")
wrk_v=$(wrk -v 2>&1 | head -1 | sed 's/ Copyright.*//' || true)
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
any_errors=$(awk -F'\t' '$6 + $7 > 0' "$MED" | wc -l)

REPORT="$TMP/report.md"
{
    echo "# Portcullis benchmark results"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- machine: $NCPU CPUs (${cpu_model:-unknown}), kernel $(uname -r), $(uname -m)"
    echo "- versions: git $git_rev; ${nginx_v}; ${wrk_v}; $(rustc --version 2>/dev/null || echo 'rustc ?')"
    echo "- load: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency, ${WARMUP}s warm-up, $ROUNDS interleaved round(s), median per metric"
    echo "- layout: $layout; nginx $WORKERS worker process(es), Portcullis PORTCULLIS_WORKERS=$WORKERS"
    echo "- bodies: small = 12 B response; 64k = 65,536 B response; POST = $POST_BYTES B request body, 3 B response"
    echo
    echo "## Results ($layout)"
    echo
    echo "| scenario | contender | req/s | p50 ms | p99 ms | non-2xx | socket errors | CPU µs/req | proxy CPU % | SUT core % | wrk core % | RSS after load MiB | flags |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    while IFS=$'\t' read -r s c rps p50 p99 n2 se cpu pct spct wpct rss _; do
        flags=()
        ((n2 + se > 0)) && flags+=("**ERRORS**")
        if [[ $PIN == 1 ]]; then
            if awk -v p="$wpct" 'BEGIN { exit !(p >= 95) }'; then flags+=("wrk-bound"); fi
            if awk -v p="$spct" 'BEGIN { exit !(p < 90) }'; then flags+=("SUT core idle"); fi
        fi
        if [[ $c == direct ]]; then cpu="$cpu (upstream)"; pct="$pct (upstream)"; fi
        fl="${flags[*]:-}"
        echo "| ${S_TITLE[$s]} | $(label "$c") | $rps | $p50 | $p99 | $n2 | $se | $cpu | $pct | $spct | $wpct | $rss | ${fl:-ok} |"
    done <"$MED"
    echo
    echo "CPU µs/req = utime+stime of the proxy process (nginx: master + worker) during the run / requests completed;"
    echo "proxy CPU % = the same CPU time / wall time. SUT core % and wrk core % = busy share of CPU $SUT_CPU0 and CPU $WRK_CPU0"
    echo "(from /proc/stat). For the direct row the CPU and RSS columns are the upstream's own. \"wrk-bound\" = the load"
    echo "generator's core was saturated, so req/s understates the contender; \"SUT core idle\" = the proxy+upstream core"
    echo "was not saturated. Medians over $ROUNDS round(s); error counts are summed over rounds."
    echo
    if want nginx && want portcullis; then
        echo "## Portcullis / nginx"
        echo
        echo "| scenario | req/s ratio | CPU/req ratio | p99 ratio | RSS ratio | req/s target | CPU target | p99 target | RSS target |"
        echo "|---|---:|---:|---:|---:|---|---|---|---|"
        for s in small big post; do
            rr=$(ratio "$(get "$s" portcullis 3)" "$(get "$s" nginx 3)")
            cr=$(ratio "$(get "$s" portcullis 8)" "$(get "$s" nginx 8)")
            pr=$(ratio "$(get "$s" portcullis 5)" "$(get "$s" nginx 5)")
            mr=$(ratio "$(get "$s" portcullis 12)" "$(get "$s" nginx 12)")
            INVALID=0
            had_errors "$s" portcullis nginx && INVALID=1
            if [[ $s == small ]]; then
                echo "| ${S_TITLE[$s]} | $rr | $cr | $pr | $mr | $(verdict "$rr" '>=' 1.2) | $(verdict "$cr" '<=' 0.8) | $(verdict "$pr" '<=' 1.0) | $(verdict "$mr" '<=' 1.0) |"
            else
                echo "| ${S_TITLE[$s]} | $rr | $cr | $pr | $mr | $(verdict "$rr" '>=' 1.0) | - | - | $(verdict "$mr" '<=' 1.0) |"
            fi
        done
        echo
    fi
    if want routes; then
        rr=$(ratio "$(get routes routes-10000 3)" "$(get routes routes-10 3)")
        cr=$(ratio "$(get routes routes-10000 8)" "$(get routes routes-10 8)")
        pr=$(ratio "$(get routes routes-10000 5)" "$(get routes routes-10 5)")
        INVALID=0
        had_errors routes routes-10 routes-10000 && INVALID=1
        echo "## 10,000 routes / 10 routes"
        echo
        echo "| metric | ratio | target |"
        echo "|---|---:|---|"
        echo "| req/s | $rr | $(verdict "$rr" '>=' 0.95) |"
        echo "| CPU µs/req | $cr | $(verdict "$cr" '<=' 1.05) |"
        echo "| p99 | $pr | - |"
        echo
    fi
    if want auth; then
        echo "## auth / plain proxy CPU per request"
        echo
        echo "Target: each within 1.1× the plain proxy's CPU per request."
        echo
        echo "| config | CPU/req ratio | req/s ratio | p99 ratio | CPU target |"
        echo "|---|---:|---:|---:|---|"
        for c in auth-hs256 auth-rs256 auth-apikey; do
            cr=$(ratio "$(get auth "$c" 8)" "$(get auth auth-plain 8)")
            rr=$(ratio "$(get auth "$c" 3)" "$(get auth auth-plain 3)")
            pr=$(ratio "$(get auth "$c" 5)" "$(get auth auth-plain 5)")
            INVALID=0
            had_errors auth auth-plain "$c" && INVALID=1
            echo "| $(label "$c") | $cr | $rr | $pr | $(verdict "$cr" '<=' 1.1) |"
        done
        echo
    fi
    if want policies; then
        echo "## policies / plain proxy CPU per request"
        echo
        echo "Targets: CORS + security headers + a local rate limit within 1.1× the plain proxy's CPU per request;"
        echo "a cache hit at most 0.6× (no upstream round trip)."
        echo
        echo "| config | CPU/req ratio | req/s ratio | p99 ratio | CPU target |"
        echo "|---|---:|---:|---:|---|"
        for c in pol-edge pol-cache; do
            cr=$(ratio "$(get policies "$c" 8)" "$(get policies pol-plain 8)")
            rr=$(ratio "$(get policies "$c" 3)" "$(get policies pol-plain 3)")
            pr=$(ratio "$(get policies "$c" 5)" "$(get policies pol-plain 5)")
            INVALID=0
            had_errors policies pol-plain "$c" && INVALID=1
            limit=1.1
            [[ $c == pol-cache ]] && limit=0.6
            echo "| $(label "$c") | $cr | $rr | $pr | $(verdict "$cr" '<=' "$limit") |"
        done
        echo
    fi
    if want group; then
        cr=$(ratio "$(get group group-three 8)" "$(get group group-single 8)")
        rr=$(ratio "$(get group group-three 3)" "$(get group group-single 3)")
        pr=$(ratio "$(get group group-three 5)" "$(get group group-single 5)")
        INVALID=0
        had_errors group group-single group-three && INVALID=1
        echo "## upstream group / one target CPU per request"
        echo
        echo "Target: a 3-target group with active health checks within 1.05× the CPU per request of one target."
        echo
        echo "| config | CPU/req ratio | req/s ratio | p99 ratio | CPU target |"
        echo "|---|---:|---:|---:|---|"
        echo "| $(label group-three) | $cr | $rr | $pr | $(verdict "$cr" '<=' 1.05) |"
        echo
    fi
    if ((any_errors > 0)); then
        echo "**WARNING: $any_errors row(s) had non-2xx responses or socket errors; their numbers are not comparable.**"
        echo
    fi
} >"$REPORT"

mkdir -p "$RESULTS_DIR"
cp "$REPORT" "$RESULTS_DIR/latest.md"
cp "$RUNS" "$RESULTS_DIR/runs-latest.tsv"
cat "$REPORT"
log "report written to $RESULTS_DIR/latest.md (per-run numbers: $RESULTS_DIR/runs-latest.tsv)"
((any_errors == 0)) || exit 3
