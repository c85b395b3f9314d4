#!/usr/bin/env bash
# Composition cost (issue 10): one gateway, the bench upstream, three routes —
#   /direct   a plain proxied GET of the upstream's JSON answer
#   /seq      a 2-step sequential pipeline (GET /json, then POST of its answer)
#   /agg      a 3-part parallel aggregation (three GET /json, merged)
# Interleaved rounds, medians of req/s and of the gateway's CPU µs per request; the
# pipeline and the aggregation are compared with the sum of their direct calls
# (2 × and 3 × /direct's CPU per request).
#
# Usage: bench/compose.sh        (cargo build --release first; bench/run.sh installs wrk)
# Knobs: C_ROUNDS=5  C_DURATION=10  C_CONNECTIONS=50  C_PROXY_CPUS=0  C_OTHER_CPUS=1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${C_PORTCULLIS_BIN:-$TARGET_DIR/release/portcullis}
UPSTREAM_BIN=$TARGET_DIR/release/portcullis-bench-upstream
ROUNDS=${C_ROUNDS:-5}
DURATION=${C_DURATION:-10}
CONNECTIONS=${C_CONNECTIONS:-50}
PROXY_CPUS=${C_PROXY_CPUS:-0}
OTHER_CPUS=${C_OTHER_CPUS:-1}
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
wait_up() {
    for _ in $(seq 100); do
        curl -fs -o /dev/null "http://127.0.0.1:$1$2" && return 0
        sleep 0.1
    done
    echo "nothing answers on port $1" >&2
    for f in "$TMP"/*.log; do echo "== $f" >&2; tail -n 5 "$f" >&2; done
    exit 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

taskset -c "$OTHER_CPUS" "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
wait_up "$UP_PORT" /json

UP="http://127.0.0.1:$UP_PORT"
cat >"$TMP/compose.yaml" <<YAML
listeners: [{address: "127.0.0.1:$GW_PORT"}]
admin: {address: "127.0.0.1:$ADMIN_PORT"}
logging: {access_log: false}
store: {data_dir: "$TMP/data"}
pipelines:
  two:
    mode: sequential
    steps:
      - {name: first, upstream: "$UP", path: /json}
      - {name: second, upstream: "$UP", path: /json}
routes:
  - {name: direct, path: /direct, proxy: {upstream: "$UP", rewrite: /json}}
  - {name: seq, path: /seq, pipeline: {name: two}}
  - name: agg
    path: /agg
    aggregate:
      parts:
        - {name: a, upstream: "$UP", path: /json}
        - {name: b, upstream: "$UP", path: /json}
        - {name: c, upstream: "$UP", path: /json}
YAML
PORTCULLIS_WORKERS=1 taskset -c "$PROXY_CPUS" "$BIN" run -c "$TMP/compose.yaml" >"$TMP/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)
wait_up "$GW_PORT" /direct
for p in /seq /agg; do
    curl -fs "http://127.0.0.1:$GW_PORT$p" >/dev/null || { echo "$p fails" >&2; curl -s "http://127.0.0.1:$GW_PORT$p" >&2; exit 1; }
done

HZ=$(getconf CLK_TCK)
for p in direct seq agg; do taskset -c "$OTHER_CPUS" wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$GW_PORT/$p" >/dev/null; done
printf 'round\tpath\treq_s\tcpu_us_per_req\tnon2xx\n'
for r in $(seq "$ROUNDS"); do
    for p in direct seq agg; do
        before=$(cpu_ticks "$GW_PID")
        out=$(taskset -c "$OTHER_CPUS" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:$GW_PORT/$p")
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
        d = median(cpu["direct"]); s = median(cpu["seq"]); g = median(cpu["agg"])
        printf "| route | req/s | CPU µs/req | vs the sum of its direct calls | non-2xx |\n|---|---|---|---|---|\n"
        printf "| /direct (1 proxied call) | %.0f | %.1f | 1.00 | %d |\n", median(rps["direct"]), d, bad["direct"]
        printf "| /seq (2-step pipeline) | %.0f | %.1f | %.2f (2 × %.1f) | %d |\n", median(rps["seq"]), s, s / (2 * d), d, bad["seq"]
        printf "| /agg (3-part aggregation) | %.0f | %.1f | %.2f (3 × %.1f) | %d |\n", median(rps["agg"]), g, g / (3 * d), d, bad["agg"]
    }' "$TMP/runs.tsv"
