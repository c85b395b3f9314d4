#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests.
# Installs what it needs when missing: rustfmt and clippy (a Rust toolchain is assumed),
# redis-server, node and npm, chromium (with apt-get, through sudo unless root) and
# the test IdP's and browser driver's npm packages (npm ci).
set -euo pipefail
cd "$(dirname "$0")/.."

need_component() {
    if ! cargo "$1" --version >/dev/null 2>&1; then
        echo "[test] installing rustup component $2"
        rustup component add "$2"
    fi
}
need_component fmt rustfmt
need_component clippy clippy

# The store and gateway tests start real redis-server processes (never the machine's
# own Redis); the tests themselves install nothing.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "[test] installing redis-server"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
fi

# The session tests run a real OpenID Connect provider (npm: oidc-provider) with
# node >= 20; its packages are pinned by tests/node/package-lock.json.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "[test] installing nodejs and npm"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    echo "[test] node >= 20 is needed for the test IdP (found $(node --version))" >&2
    exit 1
fi
# The end-to-end session test drives Debian's Chromium headless (playwright-core).
if [ ! -x /usr/lib/chromium/chromium ] && [ ! -x /usr/bin/chromium ]; then
    echo "[test] installing chromium"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
node_dir=crates/portcullis/tests/node
if [ ! -d "$node_dir/node_modules" ] || [ "$node_dir/package-lock.json" -nt "$node_dir/node_modules" ]; then
    echo "[test] npm ci in $node_dir"
    npm ci --no-audit --no-fund --prefix "$node_dir"
    touch "$node_dir/node_modules"
fi

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary, the last
# of which is often an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
