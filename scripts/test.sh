#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the demo models, lint, run the Rust tests (the
# network-namespace cluster test included, where `ip netns` works), the official openai Python
# client through a real two-node cluster, and the dashboard in headless Chromium.
#
#   scripts/test.sh
#
# Caches live outside the repo (CARGO_TARGET_DIR, the Python venv, pip's cache) so reruns are fast;
# override them with the same variables.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/llmesh-target}
export LLMESH_MODELS_DIR=${LLMESH_MODELS_DIR:-$PWD/models}
venv=${LLMESH_VENV:-/var/tmp/llmesh-venv}

LLMESH_FETCH_GEMMA=1 scripts/fetch-models.sh "$LLMESH_MODELS_DIR"

# scripts/netns-holepunch.sh builds its NAT routers with iptables (Debian's package, when root).
if ! command -v iptables >/dev/null && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null; } ||
    echo "warning: could not install iptables; scripts/netns-holepunch.sh will be skipped" >&2
fi

# tests/service.rs checks the systemd units it writes with `systemd-analyze verify`.
if ! command -v systemd-analyze >/dev/null && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; } ||
    echo "warning: could not install systemd; tests/service.rs will not verify its units" >&2
fi

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo build --locked
cargo test --locked

if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
fi
# Quick when the cached venv already has them; adds what a newer requirements.txt names.
"$venv/bin/pip" install --quiet -r tests/python/requirements.txt
LLMESH_BIN="$CARGO_TARGET_DIR/debug/llmesh" "$venv/bin/pytest" -q tests/python

# The dashboard in headless Chromium (installs chromium and playwright-core when missing).
LLMESH_BIN="$CARGO_TARGET_DIR/debug/llmesh" tests/browser/run.sh
