#!/usr/bin/env bash
# The dashboard's browser test: installs what is missing (Chromium from apt when root, the
# pinned playwright-core from package-lock.json), then drives a two-node cluster in Chromium.
#
# Needs a built binary (cargo build; LLMESH_BIN overrides /var/tmp/llmesh-target/debug/llmesh)
# and the demo model (scripts/fetch-models.sh; LLMESH_MODELS_DIR overrides models/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "no Chromium at ${CHROMIUM:-/usr/bin/chromium}: install it (apt-get install chromium) or set CHROMIUM" >&2
    exit 1
  fi
fi

if [[ ! -d "$here/node_modules/playwright-core" ]]; then
  echo "installing playwright-core (npm ci)"
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
fi

exec node "$here/dashboard.test.mjs"
