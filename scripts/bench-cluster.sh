#!/usr/bin/env bash
# Cluster benchmark on loopback (numbers for humans; asserts nothing):
#   1. throughput of 8 concurrent streaming clients through an entry node, with one host of the
#      model and then with two;
#   2. a host killed with SIGKILL under that load: requests lost and the longest stall between two
#      tokens any client saw.
# Nodes run on 127.0.0.1 only and are stopped on exit, also on failure.
#
#   scripts/bench-cluster.sh            (LLMESH_BIN, LLMESH_MODELS_DIR, CLIENTS, REQUESTS override)
#
# All nodes share this machine: with two hosts on few cores, give each node one thread
# (RAYON_NUM_THREADS=1) or their thread pools fight over the cores.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${LLMESH_BIN:-${CARGO_TARGET_DIR:-/var/tmp/llmesh-target}/release/llmesh}
models=${LLMESH_MODELS_DIR:-models}
clients=${CLIENTS:-8}
requests=${REQUESTS:-6}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() { # NAME HTTP_PORT [ARGS...] -> pid in $started
  local name=$1 port=$2
  shift 2
  NO_COLOR=1 "$bin" serve --listen "127.0.0.1:$port" --p2p-listen /ip4/127.0.0.1/tcp/0 --no-mdns \
    --data-dir "$work/$name" --name "$name" "$@" >"$work/$name.log" 2>&1 &
  started=$!
  pids+=("$started")
  for _ in $(seq 300); do
    curl -sf "127.0.0.1:$port/health" >/dev/null && return 0
    sleep 0.1
  done
  echo "FAIL: $name did not start" >&2
  tail -20 "$work/$name.log" >&2
  exit 1
}

p2p_address() { # HTTP_PORT
  curl -sf "127.0.0.1:$1/api/nodes" | python3 -c 'import json,sys; n=[x for x in json.load(sys.stdin)["data"] if x["this_node"]][0]; print([a for a in n["addresses"] if "127.0.0.1" in a][0])'
}

wait_hosts() { # HTTP_PORT COUNT
  for _ in $(seq 300); do
    local n
    n=$(curl -sf "127.0.0.1:$1/v1/models" | python3 -c 'import json,sys; d=[m for m in json.load(sys.stdin)["data"] if m["id"]=="smollm2"]; print(len(d[0]["llmesh"]["hosts"]) if d else 0)')
    [ "$n" = "$2" ] && return 0
    sleep 0.1
  done
  echo "FAIL: the entry node never saw $2 host(s)" >&2
  exit 1
}

load() { # HTTP_PORT LABEL [KILL_PID_AFTER_SECONDS KILL_PID]
  python3 - "$@" "$clients" "$requests" <<'PY'
import http.client, json, os, signal, sys, threading, time
port, label = int(sys.argv[1]), sys.argv[2]
kill = (float(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 6 else None
clients, per_client = int(sys.argv[-2]), int(sys.argv[-1])
body = json.dumps({"model": "smollm2", "stream": True, "max_tokens": 48, "ignore_eos": True, "temperature": 0,
                   "messages": [{"role": "user", "content": "Tell me about the sea."}]})
tokens, lost, stall, lock = [0], [0], [0.0], threading.Lock()
def client():
    for _ in range(per_client):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            ok, count, last, worst = response.status == 200, 0, time.monotonic(), 0.0
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    ok = False
                    break
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.monotonic()
                    if count:
                        worst = max(worst, now - last)
                    last, count = now, count + 1
            with lock:
                tokens[0] += count
                stall[0] = max(stall[0], worst)
                lost[0] += 0 if ok else 1
        except Exception:
            with lock:
                lost[0] += 1
        finally:
            connection.close()
threads = [threading.Thread(target=client) for _ in range(clients)]
started = time.monotonic()
for thread in threads:
    thread.start()
if kill:
    time.sleep(kill[0])
    os.kill(kill[1], signal.SIGKILL)
for thread in threads:
    thread.join()
elapsed = time.monotonic() - started
print(f"MEASURE {label}_tokens_per_second {tokens[0] / elapsed:.1f}")
print(f"MEASURE {label}_requests_lost {lost[0]} of {clients * per_client}")
print(f"MEASURE {label}_longest_stall_ms {stall[0] * 1000:.0f}")
PY
}

h1=$(free_port); h2=$(free_port); entry=$(free_port)
start host-1 "$h1" --model "smollm2=$models/SmolLM2-135M-Instruct.Q4_1.gguf"
host1_pid=$started
start entry "$entry" --peer "$(p2p_address "$h1")"
wait_hosts "$entry" 1
load "$entry" one_host
start host-2 "$h2" --model "smollm2=$models/SmolLM2-135M-Instruct.Q4_1.gguf" --peer "$(p2p_address "$h1")"
host2_pid=$started
wait_hosts "$entry" 2
load "$entry" two_hosts
load "$entry" host_killed 3 "$host2_pid"
: "$host1_pid"
