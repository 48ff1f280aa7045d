#!/usr/bin/env bash
# A soak: a three-node cluster under mixed traffic for a long while (30 minutes by default), its
# hosts killed and restarted every few minutes and one bridge port taken down once. Three "hosts"
# (network namespaces) on one bridge, finding each other by mDNS:
#
#   node-a  no models: an entry node
#   node-b  smollm2 (chat) and minilm (embeddings)
#   node-c  smollm2 and minilm
#
# Every node has clients of its own (two each), sending back to back a mix of chat answers
# (plain and streamed, 8 to 48 tokens, `ignore_eos`, so each answer's length is known) and
# embeddings (1 to 4 inputs). Every KILL_EVERY seconds one host, b and c in turn, is killed with
# SIGKILL (a crash, not a drain) and started again: its own clients pause just before, so what is
# judged is what the other nodes were sending to it, which must fail over (mid-answer included).
# Halfway through, the bridge port of the host killed least recently goes down for 20 s, as a
# pulled cable. Nothing may be lost: every request gets its whole answer.
#
#   scripts/soak.sh
#
# Reports (MEASURE lines, then PASS or FAIL): requests sent, failed and resumed (answers the
# router moved to another host part-way), p50/p99 latency of each kind of request, and the RSS and
# open file descriptors of every node when the load starts and at the end (node-a's sampled every
# minute too). It fails if a request fails, if a node dies, or if node-a, which is never restarted,
# grows by more than LLMESH_SOAK_RSS_GROWTH_MIB of memory or 64 file descriptors between the end
# of the first two minutes and the end.
#
# Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) for `ip netns`; without it prints `SKIP: ...` and
# exits 77. Everything it starts and creates is removed on exit, also after a failure or Ctrl-C;
# the logs are kept after a failure.
#
#   LLMESH_BIN            the binary (default $CARGO_TARGET_DIR/debug/llmesh; a release build is
#                         what a soak should run: LLMESH_BIN=target/release/llmesh)
#   LLMESH_MODELS_DIR     where scripts/fetch-models.sh put the demo models (default models/)
#   LLMESH_SOAK_MINUTES   how long the load runs (default 30)
#   LLMESH_SOAK_KILL_EVERY  seconds between host kills (default 240)
#   LLMESH_SOAK_RSS_GROWTH_MIB  node-a's allowed memory growth (default 64)
#   LLMESH_NETNS_TIMEOUT  seconds to wait for each step (default 60)
#   LLMESH_NETNS_KEEP_LOGS=1  keep the nodes' logs after a success too
set -euo pipefail -o errtrace
repo=$(cd "$(dirname "$0")/.." && pwd)

# shellcheck source=scripts/netns-lib.sh
source "$repo/scripts/netns-lib.sh"
three_nodes_on_a_bridge 96

minutes=${LLMESH_SOAK_MINUTES:-30}
kill_every=${LLMESH_SOAK_KILL_EVERY:-240}
rss_growth_mib=${LLMESH_SOAK_RSS_GROWTH_MIB:-64}
fd_growth=64
embedding_model="$models_dir/all-MiniLM-L6-v2"
declare -A load_pid=()

netns_preflight "$bridge_ns" llmesh-soak
[ -d "$embedding_model" ] || fail "no embedding model at $embedding_model (run scripts/fetch-models.sh)"
bridge_hosts

cable() { # NODE up|down
  ip -n "$bridge_ns" link set dev "port-$1" "$2"
}

cluster_key=$(head -c 32 /dev/urandom | base64 | tr -d "/+=\n")
host_flags=(--model "smollm2=$chat_model" --model "minilm=$embedding_model" --cluster-key "$cluster_key")
start_host() { start_node "$1" "${host_flags[@]}" --drain-timeout 5; }

# RSS (KiB) and open file descriptors of NODE's process.
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/${pid[$1]}/status"; }
fds() { find "/proc/${pid[$1]}/fd" -mindepth 1 -maxdepth 1 | wc -l; }
resources() { # NODE WHEN
  measure "rss_${1}_${2}" "$(($(rss_kib "$1") / 1024))" MiB
  measure "fds_${1}_${2}" "$(fds "$1")" fds
}

# --- the load ---------------------------------------------------------------------------------------

# The client of one node: THREADS threads sending back to back to the node's API until
# $OUT.stop exists; they hold off while $OUT.pause exists ($OUT.inflight counts what they have
# running). At the end, $OUT.json: per kind, how many were sent, the latencies in ms of those
# that succeeded, and the failures with their reasons.
cat >"$tmp/load.py" <<'EOF'
import http.client, json, os, random, sys, threading, time

threads_count, out, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
kinds = ("chat", "chat_streamed", "embeddings")
sent = {kind: 0 for kind in kinds}
latencies = {kind: [] for kind in kinds}
failures = []
lock = threading.Lock()
inflight = [0]
QUESTIONS = ["Tell me about the sea.", "What is a lighthouse?", "Name three colours.",
             "Why is the sky blue?", "Write a line about trains."]

def set_inflight(change):
    with lock:
        inflight[0] += change
        with open(out + ".inflight.tmp", "w") as file:
            file.write(str(inflight[0]))
        os.replace(out + ".inflight.tmp", out + ".inflight")

def post(path, body, stream):
    connection = http.client.HTTPConnection("127.0.0.1", 8080, timeout=120)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read(300)!r}")
    if not stream:
        return json.loads(response.read())
    return response

def chat(rng, stream):
    tokens = rng.randint(8, 48)
    body = {"model": "smollm2", "max_tokens": tokens, "ignore_eos": True,
            "temperature": rng.choice([0, 0.8]),
            "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}
    if not stream:
        answer = post("/v1/chat/completions", body, False)
        if answer["usage"]["completion_tokens"] != tokens:
            raise RuntimeError(f"{answer['usage']['completion_tokens']} tokens, not {tokens}")
        return
    body.update(stream=True, stream_options={"include_usage": True})
    response = post("/v1/chat/completions", body, True)
    done, counted = False, None
    for line in response:
        line = line.strip()
        if line == b"data: [DONE]":
            done = True
            break
        if not line.startswith(b"data:"):
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            raise RuntimeError(f"the stream carried an error: {chunk['error']}")
        if chunk.get("usage"):
            counted = chunk["usage"]["completion_tokens"]
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    if counted != tokens:
        raise RuntimeError(f"{counted} tokens, not {tokens}")

def embeddings(rng):
    inputs = [rng.choice(QUESTIONS) for _ in range(rng.randint(1, 4))]
    answer = post("/v1/embeddings", {"model": "minilm", "input": inputs}, False)
    vectors = [item["embedding"] for item in answer["data"]]
    if len(vectors) != len(inputs) or any(len(vector) != 384 for vector in vectors):
        raise RuntimeError(f"{len(vectors)} vectors for {len(inputs)} inputs")

def client(index):
    rng = random.Random(seed * 100 + index)
    while not os.path.exists(out + ".stop"):
        if os.path.exists(out + ".pause"):
            time.sleep(0.1)
            continue
        kind = rng.choices(kinds, weights=(4, 4, 2))[0]
        set_inflight(1)
        started = time.monotonic()
        try:
            if kind == "embeddings":
                embeddings(rng)
            else:
                chat(rng, kind == "chat_streamed")
            failure = None
        except Exception as error:  # a reset or a timeout is a failure too
            failure = f"{kind} at {time.strftime('%H:%M:%S')}: {error!r}"
        elapsed = (time.monotonic() - started) * 1000
        with lock:
            sent[kind] += 1
            if failure:
                failures.append(failure)
            else:
                latencies[kind].append(elapsed)
        set_inflight(-1)

set_inflight(0)
threads = [threading.Thread(target=client, args=(i,)) for i in range(threads_count)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
with open(out + ".json", "w") as file:
    json.dump({"sent": sent, "latencies": latencies, "failures": failures}, file)
EOF

inflight() { cat "$tmp/load-$1.inflight" 2>/dev/null || echo 1; }
idle() { [ "$(inflight "$1")" = 0 ]; }

start_load() { # NODE SEED
  rm -f "$tmp/load-$1.stop" "$tmp/load-$1.pause" "$tmp/load-$1.inflight"
  in_ns "$1" python3 "$tmp/load.py" 2 "$tmp/load-$1" "$2" 2>"$tmp/load-$1.errors" &
  load_pid[$1]=$!
  helpers+=("${load_pid[$1]}")
}

stop_load() {
  local node
  for node in "${nodes[@]}"; do touch "$tmp/load-$node.stop"; done
  for node in "${nodes[@]}"; do
    # The longest request may take its full 120 s timeout.
    stop_within 150 "${load_pid[$node]}" || fail "node-$node's load client did not stop"
    [ -f "$tmp/load-$node.json" ] || fail "node-$node's load client wrote no summary: $(cat "$tmp/load-$node.errors")"
  done
}

# --- the cluster ------------------------------------------------------------------------------------

say "starting node-a (no models), node-b and node-c (smollm2, minilm)"
start_node a --cluster-key "$cluster_key"
start_host b
start_host c
for host in b c; do
  for model in smollm2 minilm; do
    wait_for "node-a lists $model on node-$host (mDNS)" lists_model a "$model" "node-$host"
  done
done

say "load: two clients on every node, for $minutes minutes; a host killed every $kill_every s"
start_load a 1
start_load b 2
start_load c 3
started=$SECONDS
end=$((started + minutes * 60))
baseline_at=$((started + 120))
cable_at=$((started + minutes * 30))
next_kill=$((started + kill_every))
next_sample=$((started + 60))
victim=b
cable_done=0
kills=0
a_rss_start=""
a_fds_start=""

for node in "${nodes[@]}"; do resources "$node" start; done

while [ "$SECONDS" -lt "$end" ]; do
  check_alive
  for node in "${nodes[@]}"; do
    kill -0 "${load_pid[$node]}" 2>/dev/null || fail "node-$node's load client died: $(cat "$tmp/load-$node.errors")"
  done
  if [ -z "$a_rss_start" ] && [ "$SECONDS" -ge "$baseline_at" ]; then
    a_rss_start=$(rss_kib a)
    a_fds_start=$(fds a)
  fi
  if [ "$SECONDS" -ge "$next_sample" ]; then
    measure "rss_a_minute_$(((SECONDS - started) / 60))" "$(($(rss_kib a) / 1024))" MiB
    next_sample=$((next_sample + 60))
  fi
  if [ "$cable_done" = 0 ] && [ "$SECONDS" -ge "$cable_at" ]; then
    # The next to be killed: the host killed least recently, up the longest.
    cut=$victim
    say "pulling node-$cut's cable for 20 s"
    cable "$cut" down
    sleep 20
    cable "$cut" up
    cable_done=1
    timeout=$((timeout * 2)) wait_for "node-a lists smollm2 on node-$cut again" lists_model a smollm2 "node-$cut"
  fi
  if [ "$SECONDS" -ge "$next_kill" ] && [ "$SECONDS" -lt $((end - 30)) ]; then
    say "killing node-$victim (SIGKILL) after $(((SECONDS - started) / 60)) minutes; its clients pause"
    touch "$tmp/load-$victim.pause"
    wait_for "node-$victim's own clients finish what they sent" idle "$victim"
    kill -KILL "${pid[$victim]}"
    wait "${pid[$victim]}" 2>/dev/null || true
    unset "pid[$victim]"
    kills=$((kills + 1))
    sleep 5
    start_host "$victim"
    for model in smollm2 minilm; do
      wait_for "node-a lists $model on node-$victim again" lists_model a "$model" "node-$victim"
    done
    wait_for "node-$victim answers /health" healthy "$victim"
    rm -f "$tmp/load-$victim.pause"
    victim=$([ "$victim" = b ] && echo c || echo b)
    next_kill=$((SECONDS + kill_every))
  fi
  sleep 1
done

for node in "${nodes[@]}"; do resources "$node" end; done
a_rss_end=$(rss_kib a)
a_fds_end=$(fds a)
stop_load
measure kills "$kills" kills

# --- the report -------------------------------------------------------------------------------------

resumed=$(cat "$tmp"/node-*.log | grep -c "answer resumed" || true)
measure resumed "$resumed" requests
python3 - "$tmp" <<'EOF'
import json, sys
from pathlib import Path

runs = [json.loads(path.read_text()) for path in Path(sys.argv[1]).glob("load-*.json")]
kinds = ("chat", "chat_streamed", "embeddings")

def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else 0

for kind in kinds:
    sent = sum(run["sent"][kind] for run in runs)
    latencies = [ms for run in runs for ms in run["latencies"][kind]]
    print(f"MEASURE sent_{kind} {sent} requests")
    print(f"MEASURE latency_{kind}_p50 {percentile(latencies, 50):.0f} ms")
    print(f"MEASURE latency_{kind}_p99 {percentile(latencies, 99):.0f} ms")
failures = [failure for run in runs for failure in run["failures"]]
print(f"MEASURE sent {sum(sum(run['sent'].values()) for run in runs)} requests")
print(f"MEASURE failed {len(failures)} requests")
Path(sys.argv[1], "failures").write_text("\n".join(failures))
EOF
failed=$(grep -c . "$tmp/failures" || true)
[ "$failed" -eq 0 ] || fail "$failed requests failed: $(head -5 "$tmp/failures")"
rss_growth=$(((a_rss_end - a_rss_start) / 1024))
fd_change=$((a_fds_end - a_fds_start))
measure rss_a_growth "$rss_growth" MiB
measure fds_a_growth "$fd_change" fds
[ "$rss_growth" -le "$rss_growth_mib" ] ||
  fail "node-a grew by $rss_growth MiB after the first two minutes (bound: $rss_growth_mib MiB)"
[ "$fd_change" -le "$fd_growth" ] || fail "node-a holds $fd_change more file descriptors than after two minutes"
say "$minutes minutes, $kills host kills and a pulled cable: nothing lost"
echo PASS
