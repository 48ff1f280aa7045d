#!/usr/bin/env bash
# Build the reference engine, llama.cpp, from the sources vendored in the `llama-cpp-python`
# source package on PyPI, and print the folder holding its binaries.
#
# The build is cached under $LLAMACPP_CACHE (default /var/tmp/llmesh-llamacpp): a second run costs
# nothing. About 12 minutes on 2 cores the first time. Used by scripts/bench-vs-llamacpp.sh and
# scripts/make-reference-fixtures.sh.
#
#   scripts/build-llamacpp.sh        -> /var/tmp/llmesh-llamacpp/build/bin
set -euo pipefail

version=0.3.36
cache=${LLAMACPP_CACHE:-/var/tmp/llmesh-llamacpp}
bin="$cache/build/bin"
targets=(llama-bench llama-server llama-cli)

built() {
  for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done
}
if built; then echo "$bin"; exit 0; fi

mkdir -p "$cache"
venv="$cache/venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet cmake ninja scikit-build-core >&2

src="$cache/src"
if [ ! -d "$src/vendor/llama.cpp" ]; then
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  "$venv/bin/pip" download --quiet --no-deps --no-build-isolation --no-binary llama-cpp-python \
    --dest "$dl" "llama-cpp-python==$version" >&2
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$dl"/llama_cpp_python-*.tar.gz -C "$src" --strip-components=1
fi

echo "building llama.cpp (llama-cpp-python $version) into $cache/build" >&2
"$venv/bin/cmake" -S "$src/vendor/llama.cpp" -B "$cache/build" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
"$venv/bin/cmake" --build "$cache/build" --target "${targets[@]}" -j "$(nproc)" >&2
built || { echo "llama.cpp build did not produce ${targets[*]}" >&2; exit 1; }
echo "$bin"
