#!/usr/bin/env bash
# Scale, simulated: runs `examples/scale.rs` (N model-less nodes in one process, each with the one
# before as its only peer) inside a network namespace of its own, so that its loopback carries the
# overlay's traffic and nothing else, and prints the example's markdown table.
#
#   scripts/scale-sim.sh                 # N = 5 10 25 50 100
#   scripts/scale-sim.sh 10 30           # other sizes
#
# Needs root (ip netns). Builds the example first unless LLMESH_SCALE_BIN names a built one.
# LLMESH_SCALE_IDLE_SECS (default 20) is the idle window the CPU, memory and bytes are taken over.
# The namespace is deleted on any exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
bin=${LLMESH_SCALE_BIN:-}
if [ -z "$bin" ]; then
  (cd "$repo" && cargo build --example scale)
  bin=$target/debug/examples/scale
fi
[ -x "$bin" ] || { echo "no example binary at $bin" >&2; exit 1; }

ns=llmesh-scale-$$
cleanup() { ip netns delete "$ns" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$ns"
ip -n "$ns" link set lo up
# Many sockets per node (HTTP and overlay listeners, one connection per linked pair).
ulimit -n 65536 2>/dev/null || true
ip netns exec "$ns" "$bin" "$@"
