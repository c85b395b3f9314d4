#!/usr/bin/env bash
# Cost of OpenAPI request validation (issue 11): one gateway, the bench upstream, the
# same 1 KiB JSON POST to two routes —
#   /v1/workflows          validated against examples/foldforge/openapi.yaml
#   /plain/v1/workflows    the same proxy with `openapi: false`
# Interleaved rounds, medians of req/s and of the gateway's CPU µs per request; the
# target is validated ≤ 1.15 × plain.
#
# Usage: bench/validate.sh      (cargo build --release first; bench/run.sh installs wrk)
# Knobs: V_ROUNDS=5  V_DURATION=10  V_CONNECTIONS=50  V_PROXY_CPUS=0  V_OTHER_CPUS=1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${V_PORTCULLIS_BIN:-$TARGET_DIR/release/portcullis}
UPSTREAM_BIN=$TARGET_DIR/release/portcullis-bench-upstream
ROUNDS=${V_ROUNDS:-5}
DURATION=${V_DURATION:-10}
CONNECTIONS=${V_CONNECTIONS:-50}
PROXY_CPUS=${V_PROXY_CPUS:-0}
OTHER_CPUS=${V_OTHER_CPUS:-1}
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

read -r UP_PORT GW_PORT ADMIN_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

taskset -c "$OTHER_CPUS" "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)

cat >"$TMP/validate.yaml" <<YAML
listeners: [{address: "127.0.0.1:$GW_PORT"}]
admin: {address: "127.0.0.1:$ADMIN_PORT"}
logging: {access_log: false}
store: {data_dir: "$TMP/data"}
defaults:
  openapi: {document: "$ROOT/examples/foldforge/openapi.yaml"}
routes:
  - {name: validated, path: /v1/workflows, proxy: {upstream: "http://127.0.0.1:$UP_PORT"}}
  - {name: plain, path: /plain/v1/workflows, openapi: false, proxy: {upstream: "http://127.0.0.1:$UP_PORT"}}
YAML
# A typical 1 KiB submission: a name, a few labels, a spec.
BODY=$(python3 -c '
import json
spec = json.dumps({"steps": [{"tool": "fold", "params": {"model": "m%d" % i, "seed": i}} for i in range(12)]})
body = {"name": "fold-2026-12-02-a", "labels": {"team": "bio", "priority": "high", "project": "p-17"}, "spec_json": spec}
s = json.dumps(body)
print(s)')
printf '%s' "$BODY" >"$TMP/body.json"
cat >"$TMP/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$TMP/body.json", "rb")
wrk.body = f:read("*a")
f:close()
LUA
PORTCULLIS_WORKERS=1 taskset -c "$PROXY_CPUS" "$BIN" run -c "$TMP/validate.yaml" >"$TMP/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)
for _ in $(seq 100); do
    curl -fs -o /dev/null -X POST -H 'content-type: application/json' --data-binary @"$TMP/body.json" "http://127.0.0.1:$GW_PORT/v1/workflows" && break
    sleep 0.1
done
for p in /v1/workflows /plain/v1/workflows; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' --data-binary @"$TMP/body.json" "http://127.0.0.1:$GW_PORT$p")
    [[ $code == 200 ]] || { echo "$p answers $code" >&2; tail -5 "$TMP/gateway.log" >&2; exit 1; }
done
echo "body: $(wc -c <"$TMP/body.json") bytes" >&2

HZ=$(getconf CLK_TCK)
for p in plain/v1/workflows v1/workflows; do taskset -c "$OTHER_CPUS" wrk -t1 -c"$CONNECTIONS" -d2s -s "$TMP/post.lua" "http://127.0.0.1:$GW_PORT/$p" >/dev/null; done
printf 'round\troute\treq_s\tcpu_us_per_req\tnon2xx\n'
for r in $(seq "$ROUNDS"); do
    for p in plain validated; do
        path=/v1/workflows
        [[ $p == plain ]] && path=/plain/v1/workflows
        before=$(cpu_ticks "$GW_PID")
        out=$(taskset -c "$OTHER_CPUS" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$TMP/post.lua" "http://127.0.0.1:$GW_PORT$path")
        after=$(cpu_ticks "$GW_PID")
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
        cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
        printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$p" "$rps" "$cpu" "${bad:-0}"
    done
done | tee "$TMP/runs.tsv"
awk -F'\t' '{ rps[$2] = rps[$2] " " $3; cpu[$2] = cpu[$2] " " $4; bad[$2] += $5 }
    function median(list,   a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    END {
        p = median(cpu["plain"]); v = median(cpu["validated"])
        printf "| route | req/s | CPU µs/req | vs plain | non-2xx |\n|---|---|---|---|---|\n"
        printf "| plain proxy, 1 KiB JSON POST | %.0f | %.1f | 1.00 | %d |\n", median(rps["plain"]), p, bad["plain"]
        printf "| validated (openapi) | %.0f | %.1f | %.2f | %d |\n", median(rps["validated"]), v, v / p, bad["validated"]
    }' "$TMP/runs.tsv"
