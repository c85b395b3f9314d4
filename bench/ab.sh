#!/usr/bin/env bash
# A/B two Portcullis builds on the plain-proxy small GET, in one run: the same config
# (examples/proxy.yaml, access log off), the proxy alone on CPU 0, the upstream and
# wrk on CPU 1, interleaved rounds, medians of req/s and CPU µs per request.
# For "no regression" checks of a change to the request path; the full comparison
# with nginx is bench/run.sh.
#
# Usage: bench/ab.sh A_BIN B_BIN       (build both with `cargo build --release` first)
# Knobs: AB_ROUNDS=5  AB_DURATION=10  AB_CONNECTIONS=50
#        AB_A_ENV / AB_B_ENV  extra environment of A / B ("PORTCULLIS_WORKERS=2
#                             PORTCULLIS_RUNTIME=work_stealing"), so one binary can be
#                             compared with itself in two settings
#        AB_PATH=/  request path ("/64k": the 64 KiB response)
#        AB_PROXY_CPUS=0  AB_OTHER_CPUS=1  taskset lists of the proxies and of
#                             upstream + wrk ("0-1" and "0-1": a shared layout)
# Needs: wrk, taskset, target/release/portcullis-bench-upstream (bench/run.sh installs
# and builds them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
A_BIN=$(realpath "${1:?usage: bench/ab.sh A_BIN B_BIN}")
B_BIN=$(realpath "${2:?usage: bench/ab.sh A_BIN B_BIN}")
ROUNDS=${AB_ROUNDS:-5}
DURATION=${AB_DURATION:-10}
CONNECTIONS=${AB_CONNECTIONS:-50}
AB_PATH=${AB_PATH:-/}
PROXY_CPUS=${AB_PROXY_CPUS:-0}
OTHER_CPUS=${AB_OTHER_CPUS:-1}
UPSTREAM_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis-bench-upstream
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# Five distinct free ports (upstream, then listen and admin of A and B).
read -r UP_PORT A_PORT A_ADMIN B_PORT B_ADMIN < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
wait_up() {
    for _ in $(seq 100); do
        curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.1
    done
    echo "nothing answers on port $1" >&2
    for f in "$TMP"/*.log; do echo "== $f" >&2; tail -n 5 "$f" >&2; done
    exit 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

taskset -c "$OTHER_CPUS" "$UPSTREAM_BIN" --listen "127.0.0.1:$UP_PORT" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
wait_up "$UP_PORT"

declare -A PORT PID ADMIN
PORT[A]=$A_PORT PORT[B]=$B_PORT ADMIN[A]=$A_ADMIN ADMIN[B]=$B_ADMIN
for side in A B; do
    bin=A_BIN extra=${AB_A_ENV:-}
    [[ $side == B ]] && bin=B_BIN extra=${AB_B_ENV:-}
    mkdir -p "$TMP/$side"
    (cd "$TMP/$side" && PORTCULLIS_LISTEN="127.0.0.1:${PORT[$side]}" PORTCULLIS_ADMIN_LISTEN="127.0.0.1:${ADMIN[$side]}" \
        UPSTREAM_URL="http://127.0.0.1:$UP_PORT" PORTCULLIS_WORKERS=1 PORTCULLIS_ACCESS_LOG=false \
        env $extra taskset -c "$PROXY_CPUS" "${!bin}" run -c "$ROOT/examples/proxy.yaml" >"$TMP/$side.log" 2>&1) &
    PID[$side]=$!
    PIDS+=("${PID[$side]}")
    wait_up "${PORT[$side]}"
done
# The gateway process is the subshell's child.
for side in A B; do
    PID[$side]=$(pgrep -P "${PID[$side]}" || echo "${PID[$side]}")
    PIDS+=("${PID[$side]}") # killing the subshell alone would leave it running
done

HZ=$(getconf CLK_TCK)
printf 'round\tside\treq_s\tcpu_us_per_req\n'
for side in A B; do taskset -c "$OTHER_CPUS" wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:${PORT[$side]}$AB_PATH" >/dev/null; done
for r in $(seq "$ROUNDS"); do
    for side in A B; do
        before=$(cpu_ticks "${PID[$side]}")
        out=$(taskset -c "$OTHER_CPUS" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:${PORT[$side]}$AB_PATH")
        after=$(cpu_ticks "${PID[$side]}")
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
        printf '%s\t%s\t%s\t%s\n' "$r" "$side" "$rps" "$cpu"
    done
done | tee "$TMP/runs.tsv"
awk -F'\t' '{ rps[$2] = rps[$2] " " $3; cpu[$2] = cpu[$2] " " $4 }
    function median(list,   a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    END {
        ra = median(rps["A"]); rb = median(rps["B"]); ca = median(cpu["A"]); cb = median(cpu["B"])
        printf "median req/s: A %.0f, B %.0f (B/A %.2f); CPU us/req: A %.2f, B %.2f (B/A %.2f)\n", ra, rb, rb / ra, ca, cb, cb / ca
    }' "$TMP/runs.tsv"
