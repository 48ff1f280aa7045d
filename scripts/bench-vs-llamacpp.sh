#!/usr/bin/env bash
# llmesh beside llama.cpp on this machine: the same GGUF file, the same threads, the same load
# (numbers for humans; asserts nothing; not part of CI):
#   1. the engines alone: `llmesh bench --json` against `llama-bench -p 128 -n 128`;
#   2. the servers: `llmesh serve` against `llama-server -np 4`, one after the other, under the same
#      HTTP load from scripts/chat-load.py (4 streaming clients on /v1/chat/completions, every
#      request a prompt of its own of about 100 tokens, 128 tokens each, temperature 0, ignore_eos),
#      and the peak resident memory (VmHWM) of each server process.
# Prints one table per model: figure | llmesh | llama.cpp | ratio (llmesh / llama.cpp).
# llama.cpp comes from scripts/build-llamacpp.sh (cached; minutes the first time). Servers listen
# on 127.0.0.1 only; every process started here is stopped on exit, also on failure.
#
#   scripts/bench-vs-llamacpp.sh [MODEL.gguf ...]
#     default: models/SmolLM2-135M-Instruct.Q4_1.gguf, and models/gemma-3-270m-q4_k_m.gguf if present
#
# LLMESH_BIN (default: `cargo build --release`, then $CARGO_TARGET_DIR/release/llmesh),
# LLAMACPP_BIN (a folder holding llama-bench and llama-server), THREADS (2), PROMPT (128),
# DECODE (128), CLIENTS (4), REQUESTS (1 per client), RUNS (3; medians). Other work on the machine
# skews every figure: the table's heading shows the load average at the start.
set -euo pipefail
cd "$(dirname "$0")/.."

threads=${THREADS:-2}
prompt=${PROMPT:-128}
decode=${DECODE:-128}
clients=${CLIENTS:-4}
requests=${REQUESTS:-1}
runs=${RUNS:-3}
models_dir=${LLMESH_MODELS_DIR:-models}
if [ $# -eq 0 ]; then
  set -- "$models_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$models_dir/gemma-3-270m-q4_k_m.gguf" ] && set -- "$@" "$models_dir/gemma-3-270m-q4_k_m.gguf"
fi
for model in "$@"; do
  [ -f "$model" ] || { echo "no model at $model (scripts/fetch-models.sh fetches the demo models)" >&2; exit 1; }
done

llamacpp=${LLAMACPP_BIN:-$(scripts/build-llamacpp.sh)}
for tool in llama-bench llama-server; do
  [ -x "$llamacpp/$tool" ] || { echo "no $tool in $llamacpp" >&2; exit 1; }
done
if [ -z "${LLMESH_BIN:-}" ]; then
  cargo build --release --bin llmesh >&2
  LLMESH_BIN=${CARGO_TARGET_DIR:-target}/release/llmesh
fi
bin=$LLMESH_BIN
[ -x "$bin" ] || { echo "no llmesh binary at $bin" >&2; exit 1; }

work=$(mktemp -d)
server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
cleanup() {
  stop_server
  # Anything else still running (a llama-bench or llmesh bench cut short by Ctrl-C).
  for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The same threads for both: llama.cpp through -t, llmesh through candle's pool.
export RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=$threads NO_COLOR=1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Start a server in the background (its pid in $server_pid) and wait until /health says 200
# (llama-server says 503 while it loads; llmesh listens only once its model is loaded).
start_server() { # PORT LOG COMMAND...
  local port=$1 log=$2
  shift 2
  "$@" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$port/health")" = 200 ] && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "FAIL: $1 did not start; the end of its log:" >&2
  tail -20 "$log" >&2
  return 1
}

# Drive the server on PORT with scripts/chat-load.py, then add its peak memory to the figures.
load_server() { # PORT OUT.json
  python3 scripts/chat-load.py --port "$1" --clients "$clients" --requests "$requests" \
    --max-tokens "$decode" --turns "$runs" >"$2.load" || return 1
  local peak
  peak=$(awk '/^VmHWM:/ { print $2 / 1024 }' "/proc/$server_pid/status")
  python3 -c 'import json, sys; f = json.load(open(sys.argv[1])); f["peak_rss_mib"] = float(sys.argv[2]); print(json.dumps(f))' \
    "$2.load" "$peak" >"$2"
}

bench_model() { # MODEL
  local model=$1 port load
  load=$(cut -d' ' -f1-3 /proc/loadavg)

  # 1. The engines. (llama-bench decodes from an empty context, llmesh bench after its prompt.)
  if /usr/bin/time -f '%M' -o "$work/lb.rss" "$llamacpp/llama-bench" -m "$model" -t "$threads" \
    -r "$runs" -p "$prompt" -n "$decode" -o json >"$work/lb.json" 2>"$work/lb.log"; then
    python3 - "$work/lb.json" "$work/lb.rss" >"$work/llamacpp-engine.json" <<'PY'
import json, sys
tests = json.load(open(sys.argv[1]))
prompt = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
decode = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
rss = open(sys.argv[2]).read().split()[-1]
print(json.dumps({"prompt_tokens_per_second": prompt["avg_ts"], "decode_tokens_per_second": decode["avg_ts"],
                  "peak_rss_mib": int(rss) / 1024, "build": f"{decode.get('build_number')} ({decode.get('build_commit')})"}))
PY
  else
    echo "llama-bench failed on $model:" >&2
    tail -5 "$work/lb.log" >&2
  fi
  "$bin" bench --json --model "$model" --prompt-tokens "$prompt" --decode-tokens "$decode" \
    --concurrency "$clients" --runs "$runs" >"$work/llmesh-engine.json" 2>"$work/lm.log" ||
    { echo "llmesh bench failed on $model:" >&2; tail -5 "$work/lm.log" >&2; }

  # 2. The servers, one after the other. llama-server: CLIENTS slots of 512 tokens each (the
  # default context, the model's whole window per slot, would only inflate its memory).
  port=$(free_port)
  if start_server "$port" "$work/llama-server.log" "$llamacpp/llama-server" -m "$model" -t "$threads" \
    -np "$clients" -c $((clients * 512)) --host 127.0.0.1 --port "$port" --no-webui; then
    load_server "$port" "$work/llamacpp-server.json" || echo "the load on llama-server failed" >&2
  fi
  stop_server

  port=$(free_port)
  if start_server "$port" "$work/llmesh-server.log" "$bin" serve --listen "127.0.0.1:$port" \
    --p2p-listen /ip4/127.0.0.1/tcp/0 --no-mdns --no-relay --data-dir "$work/llmesh-data" \
    --name bench --model "chat=$model"; then
    load_server "$port" "$work/llmesh-server.json" || echo "the load on llmesh serve failed" >&2
  fi
  stop_server

  python3 - "$model" "$work" "$threads" "$clients" "$requests" "$prompt" "$decode" "$load" <<'PY'
import json, os, sys
model, work, threads, clients, requests, prompt, decode, load = sys.argv[1:]

def figures(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except (OSError, ValueError):
        return {}

ours_engine, theirs_engine = figures("llmesh-engine.json"), figures("llamacpp-engine.json")
ours_server, theirs_server = figures("llmesh-server.json"), figures("llamacpp-server.json")
print(f"\n{os.path.basename(model)}: {threads} threads; llama.cpp build {theirs_engine.get('build', '?')}; "
      f"load average at the start {load}")
rows = [
    # figure, llmesh, llama.cpp, higher is better
    ("engine", None, None, None),
    (f"prompt tokens/s ({prompt}-token prompt)", ours_engine.get("prompt_tokens_per_second"),
     theirs_engine.get("prompt_tokens_per_second"), True),
    (f"decode tokens/s ({decode} tokens)", ours_engine.get("decode_tokens_per_second"),
     theirs_engine.get("decode_tokens_per_second"), True),
    ("time to first token, cold, ms", ours_engine.get("ttft_cold_ms"), None, False),
    ("time to first token, second chat turn, ms", ours_engine.get("second_turn_ttft_ms"), None, False),
    ("  same turn with nothing cached, ms", ours_engine.get("second_turn_uncached_ttft_ms"), None, False),
    (f"{clients} requests at once, tokens/s", ours_engine.get("concurrent_tokens_per_second"), None, True),
    ("load, s", ours_engine.get("load_seconds"), None, False),
    ("peak memory, one request at a time, MiB", ours_engine.get("one_stream_peak_rss_mib"),
     theirs_engine.get("peak_rss_mib"), False),
    ("  of it, earlier runs kept by the prompt cache, MiB", ours_engine.get("one_stream_prompt_cache_mib"),
     None, None),
    (f"  the whole bench ({clients} at once, prompt cache), MiB", ours_engine.get("peak_rss_mib"), None, False),
    (f"server: {clients} streaming clients x {requests} requests, /v1/chat/completions", None, None, None),
    ("prompt tokens per request (median)", ours_server.get("prompt_tokens"), theirs_server.get("prompt_tokens"), None),
    ("total tokens/s", ours_server.get("tokens_per_second"), theirs_server.get("tokens_per_second"), True),
    ("time to first token, median, ms", ours_server.get("ttft_median_ms"), theirs_server.get("ttft_median_ms"), False),
    ("time to first token, second chat turn, ms", ours_server.get("second_turn_ttft_ms"),
     theirs_server.get("second_turn_ttft_ms"), False),
    ("answers shorter than asked", ours_server.get("short_answers"), theirs_server.get("short_answers"), None),
    ("peak memory of the server, MiB", ours_server.get("peak_rss_mib"), theirs_server.get("peak_rss_mib"), False),
]
number = lambda v: "-" if v is None else (f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.1f}")
print(f"  {'figure':<62} {'llmesh':>9} {'llama.cpp':>9} {'ratio':>7}")
for label, ours, theirs, higher in rows:
    if higher is None and ours is None and theirs is None:
        print(f"  {label}")
        continue
    ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "-"
    arrow = {True: " (higher is better)", False: " (lower is better)"}.get(higher, "")
    print(f"  {label + arrow:<62} {number(ours):>9} {number(theirs):>9} {ratio:>7}")
print("  ratio = llmesh / llama.cpp; '-' where llama.cpp has no such figure or a step failed")
PY
  rm -f "$work"/*.json "$work"/*.load
}

for model in "$@"; do
  echo "== $(basename "$model")" >&2
  bench_model "$model"
done
