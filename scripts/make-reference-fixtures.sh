#!/usr/bin/env bash
# Write llama.cpp's answers on the demo models as test fixtures: for a few fixed prompts, the
# prompt's token ids, greedy tokens and the top 5 logits of every step, in
# tests/fixtures/reference/: MODEL.json on the file as it is (64 tokens, an f16 KV cache as both
# engines keep by default), and MODEL.dequantized.json on the same weights dequantized to f32 by
# llama-quantize (16 tokens, an f32 KV cache: the exact computation, where the two engines must
# agree closely and a few steps show it; see
# src/engine/models/reference_tests.rs, which `cargo test` runs).
#
# Builds llama.cpp with scripts/build-llamacpp.sh (cached under /var/tmp) plus its llama-quantize,
# compiles scripts/reference/greedy_reference.cpp against its libllama and runs it on every model
# of MODELS_DIR (default models/) that is present: about ten minutes on 2 busy cores once
# llama.cpp is built, and the same fixtures byte for byte. Rerun it after changing the prompts or the llama.cpp version, and commit the fixtures.
#
# It also writes the tiny one-family models of tests/fixtures/tiny/ (scripts/make-tiny-models.sh,
# random f32 weights) and llama.cpp's answers on them, tiny-FAMILY.json (16 tokens): these
# fixtures need no download. TINY_ONLY=1 does only that (seconds).
#
#   [TINY_ONLY=1] scripts/make-reference-fixtures.sh [MODELS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

models=${1:-models}
out=tests/fixtures/reference
bin=$(scripts/build-llamacpp.sh)
build=$(dirname "$bin")
cache=$(dirname "$build")
src="$cache/src/vendor/llama.cpp"
"$cache/venv/bin/cmake" --build "$build" --target llama-quantize >&2

program="$build/greedy_reference"
"${CXX:-c++}" -std=c++17 -O2 -Wall -Wextra -I"$src/include" -I"$src/ggml/include" \
  scripts/reference/greedy_reference.cpp -L"$bin" -lllama -lggml -lggml-base -Wl,-rpath,"$bin" \
  -o "$program"

package=$(sed -n 's/^Version: //p' "$cache/src/PKG-INFO" | head -n1)
commit=$(sed -n 's/^char const \* LLAMA_COMMIT = "\(.*\)";/\1/p' "$build/common/build-info.cpp")
version="llama.cpp $commit (llama-cpp-python $package)"

# Plain text (prose, code, digits and accents), and a chat turn: the model's own template where
# it has one, else written out in its turn format (gemma-3-270m is a base model without one).
plain=(
  "The capital of France is"
  "Once upon a time, in a small village by the sea, there lived"
  $'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
  "Zürich, 1848: the café's 12 tables were full, and"
)
question="What are three tips for staying healthy?"

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() { # MODEL_FILE CHAT_PROMPT
  local file="$models/$1" name=${1%.gguf}
  if [ ! -f "$file" ]; then
    echo "skipping $1: not in $models" >&2
    return
  fi
  echo "llama.cpp on $1, as stored and dequantized" >&2
  "$program" --model "$file" --version "$version" --steps 64 --top 5 --kv-cache f16 "${plain[@]}" "$2" \
    >"$out/$name.json"
  "$bin/llama-quantize" --allow-requantize "$file" "$work/f32.gguf" F32 >"$work/quantize.log" 2>&1 ||
    { cat "$work/quantize.log" >&2; exit 1; }
  "$program" --model "$work/f32.gguf" --dequantized-from "$1" --version "$version" --steps 16 --top 5 \
    "${plain[@]}" "$2" >"$out/$name.dequantized.json"
  rm "$work/f32.gguf"
  echo "wrote $out/$name.json and $out/$name.dequantized.json" >&2
}
scripts/make-tiny-models.sh tests/fixtures/tiny
for family in qwen2 qwen3 phi3 phi3-longrope llama3 gemma2; do
  "$program" --model "tests/fixtures/tiny/tiny-$family.gguf" --version "$version" --steps 16 --top 5 \
    "${plain[@]}" "chat:$question" >"$out/tiny-$family.json"
  echo "wrote $out/tiny-$family.json" >&2
done
[ "${TINY_ONLY:-0}" = 1 ] && exit 0

run SmolLM2-135M-Instruct.Q4_1.gguf "chat:$question"
run gemma-3-270m-q4_k_m.gguf $'<start_of_turn>user\n'"$question"$'<end_of_turn>\n<start_of_turn>model\n'
