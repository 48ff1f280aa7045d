#!/usr/bin/env bash
# Three llmesh nodes on three "hosts": network namespaces with their own addresses, joined by a
# bridge that lives in a fourth namespace, so the root namespace is never touched. The nodes find
# each other by mDNS alone (no --peer). Only node-c hosts a model; the script checks that node-a and
# node-b list it, that a chat request to node-a is answered by node-c, and that after node-c is
# killed node-a stops listing the model and answers an error instead of hanging.
#
#   scripts/netns-cluster.sh
#
# Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) for `ip netns`; without it prints `SKIP: ...` and
# exits 77. Prints `MEASURE name value unit` lines (reported, never asserted), then `PASS`, or
# `FAIL: reason` and the tail of every node's log. Everything it starts and creates is removed on
# exit, also after a failure or Ctrl-C; the logs are kept after a failure.
#
#   LLMESH_BIN          the binary (default $CARGO_TARGET_DIR/debug/llmesh, target dir
#                       /var/tmp/llmesh-target)
#   LLMESH_MODELS_DIR   where scripts/fetch-models.sh put the demo models (default models/)
#   LLMESH_NETNS_TIMEOUT  seconds to wait for each step (default 60)
#   LLMESH_NETNS_SAMPLES  requests per latency measurement (default 20)
#   LLMESH_NETNS_KEEP_LOGS=1  keep the nodes' logs after a success too
set -euo pipefail -o errtrace
repo=$(cd "$(dirname "$0")/.." && pwd)
samples=${LLMESH_NETNS_SAMPLES:-20}

# shellcheck source=scripts/netns-lib.sh
source "$repo/scripts/netns-lib.sh"
three_nodes_on_a_bridge 99

# --- the network ------------------------------------------------------------------------------------

netns_preflight "$bridge_ns" llmesh-netns

say "network: bridge in $bridge_ns, hosts in $prefix-{a,b,c} on $subnet.0/24"
ip -n "$bridge_ns" link add br0 type bridge mcast_snooping 0
ip -n "$bridge_ns" link set dev br0 up
for node in "${nodes[@]}"; do
  add_ns "${ns[$node]}"
  # Both ends are created in their namespaces directly: nothing appears in the root namespace.
  ip link add eth0 netns "${ns[$node]}" type veth peer name "port-$node" netns "$bridge_ns"
  ip -n "$bridge_ns" link set dev "port-$node" master br0 up
  ip -n "${ns[$node]}" addr add "${address[$node]}/24" dev eth0
  # libp2p's mDNS ignores loopback: it needs a multicast-capable interface that is up.
  ip -n "${ns[$node]}" link set dev eth0 multicast on up
done

# --- helpers ----------------------------------------------------------------------------------------

kill_node() { # NODE: SIGKILL, as when a host loses power
  kill -KILL "${pid[$1]}"
  wait "${pid[$1]}" 2>/dev/null || true
  unset "pid[$1]"
}

chat_body() { # MAX_TOKENS STREAM
  printf '{"model":"smollm2","temperature":0,"max_tokens":%s,"stream":%s,"messages":[%s,%s]}' "$1" "$2" \
    '{"role":"system","content":"You are a helpful assistant."}' \
    '{"role":"user","content":"What is the capital of France?"}'
}

# Writes "TTFT TOTAL" to $tmp/latency-NODE: the medians, in ms, of $samples streamed requests to
# NODE after one warm-up request; every answer must come from node-c, all within 5 x $timeout s.
measure_latency() { # NODE
  run_killable "$tmp/latency-$1" ip netns exec "${ns[$1]}" \
    python3 "$tmp/latency.py" "$samples" "$((timeout * 5))" "$(chat_body 16 true)"
}

cat >"$tmp/latency.py" <<'EOF'
import http.client, json, statistics, sys, time

samples, budget, body = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + budget

def once():
    if time.monotonic() > deadline:
        sys.exit(f"the measurement took over {budget:.0f} s")
    connection = http.client.HTTPConnection("127.0.0.1", 8080, timeout=60)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        sys.exit(f"status {response.status}: {response.read(500)!r}")
    if response.getheader("x-llmesh-node") != "node-c":
        sys.exit(f"answered by {response.getheader('x-llmesh-node')!r}, not node-c")
    first = None
    for line in response:
        line = line.strip()
        if line == b"data: [DONE]":
            break
        if first is None and line.startswith(b"data:"):
            choices = json.loads(line[5:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    connection.close()
    if first is None:
        sys.exit("the stream carried no content")
    return (first - start) * 1000, (end - start) * 1000

once()
timings = [once() for _ in range(samples)]
print(f"{statistics.median(t for t, _ in timings):.1f} {statistics.median(t for _, t in timings):.1f}")
EOF

# Without a cluster secret the overlay stays on loopback (see src/p2p/exposure.rs).
cluster_key=$(head -c 32 /dev/urandom | base64 | tr -d "/+=\n")

# --- the cluster ------------------------------------------------------------------------------------

say "starting node-a and node-b (no models)"
start_node a --cluster-key "$cluster_key"
start_node b --cluster-key "$cluster_key"
wait_for "node-a answers /health" healthy a
wait_for "node-b answers /health" healthy b

say "starting node-c with smollm2"
c_started=$(now)
start_node c --model "smollm2=$chat_model" --cluster-key "$cluster_key"
c_ready=""
a_sees_c() {
  if [ -z "$c_ready" ] && healthy c; then
    c_ready=$(seconds_since "$c_started")
  fi
  lists_model a smollm2 node-c
}
wait_for "node-a lists smollm2 hosted by node-c (mDNS)" a_sees_c
measure join_seconds "$(seconds_since "$c_started")" s
wait_for "node-c answers /health" healthy c
measure c_startup_seconds "${c_ready:-$(seconds_since "$c_started")}" s
wait_for "node-b lists smollm2 hosted by node-c (mDNS)" lists_model b smollm2 node-c
say "node-a and node-b list smollm2 on node-c"

say "chat request to node-a, which hosts nothing"
run_killable "$tmp/answer.status" ip netns exec "${ns[a]}" curl -sS -o "$tmp/answer.json" \
  -D "$tmp/answer.headers" -w '%{http_code}' --max-time 120 -H 'Content-Type: application/json' \
  -d "$(chat_body 30 false)" http://127.0.0.1:8080/v1/chat/completions ||
  fail "chat request to node-a: curl failed (see above)"
status=$(cat "$tmp/answer.status")
[ "$status" = 200 ] || fail "chat request to node-a: status $status: $(head -c 500 "$tmp/answer.json")"
answered_by=$(tr -d '\r' <"$tmp/answer.headers" | awk -F': ' 'tolower($1) == "x-llmesh-node" { print $2 }')
[ "$answered_by" = node-c ] || fail "chat request to node-a: x-llmesh-node is '$answered_by', not node-c"
answer=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' \
  <"$tmp/answer.json")
[[ "$answer" == *Paris* ]] || fail "chat request to node-a: the answer lacks Paris: $answer"
say "node-c answered through node-a: $answer"

say "latency, median of $samples streamed requests (max_tokens 16): through node-a, then on node-c"
measure_latency a || fail "latency through node-a (see above)"
measure_latency c || fail "latency on node-c (see above)"
read -r hop_ttft hop_total <"$tmp/latency-a"
read -r direct_ttft direct_total <"$tmp/latency-c"
measure hop_ttft_ms "$hop_ttft" ms
measure direct_ttft_ms "$direct_ttft" ms
measure hop_total_ms "$hop_total" ms
measure direct_total_ms "$direct_total" ms

say "SIGKILL node-c"
kill_node c
killed=$(now)
wait_for "node-a stops listing smollm2 after node-c was killed" lacks_model a smollm2
measure leave_after_sigkill_seconds "$(seconds_since "$killed")" s

run_killable "$tmp/after.status" ip netns exec "${ns[a]}" curl -s -o "$tmp/after.json" -w '%{http_code}' \
  --max-time 30 -H 'Content-Type: application/json' -d "$(chat_body 30 false)" \
  http://127.0.0.1:8080/v1/chat/completions || true
status=$(cat "$tmp/after.status")
case "$status" in
  404 | 503) say "node-a answers $status for smollm2 once node-c is gone" ;;
  000) fail "chat request to node-a after node-c was killed: no answer within 30 s" ;;
  *) fail "chat request to node-a after node-c was killed: status $status, not 404 or 503: $(head -c 500 "$tmp/after.json")" ;;
esac

echo PASS
