#!/usr/bin/env bash
# Write the tiny per-family GGUFs of tests/fixtures/tiny/ (scripts/make-tiny-models.py) with the
# gguf package of the llama.cpp that scripts/build-llamacpp.sh fetched, and its venv's numpy.
#
#   scripts/make-tiny-models.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/build-llamacpp.sh)
cache=$(dirname "$(dirname "$bin")")
PYTHONPATH="$cache/src/vendor/llama.cpp/gguf-py" "$cache/venv/bin/python" scripts/make-tiny-models.py "$@"
