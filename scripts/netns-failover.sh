#!/usr/bin/env bash
# A host's network cable is pulled in the middle of an answer, then plugged back in. Three "hosts"
# (network namespaces) on one bridge, finding each other by mDNS:
#
#   node-a  no models: the entry node the client talks to
#   node-b  smollm2
#   node-c  smollm2
#
# A long streamed chat request goes to node-a. Once it has streamed a few pieces, the bridge port
# of the host answering it goes down: that host sends nothing more, not even a reset, as when a
# laptop sleeps or leaves the Wi-Fi. The client must still get one whole answer, ending in
# [DONE] with no error, finished by the other host; node-a must stop listing the cut host; and
# once the port is up again the cut host must come back into node-a's list with no one's help.
#
#   scripts/netns-failover.sh
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
#   LLMESH_NETNS_KEEP_LOGS=1  keep the nodes' logs after a success too
set -euo pipefail -o errtrace
repo=$(cd "$(dirname "$0")/.." && pwd)

# shellcheck source=scripts/netns-lib.sh
source "$repo/scripts/netns-lib.sh"
three_nodes_on_a_bridge 98

# --- the network ------------------------------------------------------------------------------------

netns_preflight "$bridge_ns" llmesh-netns-failover

bridge_hosts

cable() { # NODE up|down: the node's port on the bridge, as a cable plugged in or pulled
  ip -n "$bridge_ns" link set dev "port-$1" "$2"
}

# The streaming client: writes the answering host to $2.host as soon as the headers come, one line
# per streamed piece ("SECONDS PIECE") to $2.pieces, and on the end a summary to stdout:
# "PIECES LONGEST_GAP_SECONDS TOTAL_SECONDS", or exits non-zero with what went wrong (also when the
# usage it is told does not count max_tokens completion tokens: the answer runs its whole length).
cat >"$tmp/stream.py" <<'EOF'
import http.client, json, sys, time

budget, out, body = float(sys.argv[1]), sys.argv[2], sys.argv[3]
connection = http.client.HTTPConnection("127.0.0.1", 8080, timeout=budget)
start = time.monotonic()
connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
response = connection.getresponse()
if response.status != 200:
    sys.exit(f"status {response.status}: {response.read(500)!r}")
with open(out + ".host", "w") as host:
    host.write(response.getheader("x-llmesh-node") or "")
pieces, last, longest, done, usage = 0, start, 0.0, False, None
with open(out + ".pieces", "w") as log:
    for line in response:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        if line == b"data: [DONE]":
            done = True
            break
        chunk = json.loads(line[5:])
        if "error" in chunk:
            sys.exit(f"the stream carried an error: {chunk['error']}")
        usage = chunk.get("usage") or usage
        choices = chunk.get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
            now = time.monotonic()
            pieces, longest, last = pieces + 1, max(longest, now - last), now
            log.write(f"{now - start:.3f} {json.dumps(choices[0]['delta']['content'])}\n")
            log.flush()
if not done:
    sys.exit(f"the stream ended after {pieces} pieces without [DONE]")
expected = json.loads(body)["max_tokens"]
if not usage or usage["completion_tokens"] != expected:
    sys.exit(f"the usage counts {usage and usage['completion_tokens']} completion tokens, not {expected}")
print(f"{pieces} {longest:.2f} {time.monotonic() - start:.2f}")
EOF

pieces_streamed() { # the pieces the client has received so far
  [ -f "$tmp/stream.pieces" ] && wc -l <"$tmp/stream.pieces" || echo 0
}

at_least_pieces() { [ "$(pieces_streamed)" -ge "$1" ]; }

# NODE's /v1/models answers and does not list HOST among MODEL's hosts.
unlisted() { # NODE MODEL HOST
  local status=0
  lists_model "$1" "$2" "$3" || status=$?
  [ "$status" -eq 1 ]
}

# Without a cluster secret the overlay stays on loopback (see src/p2p/exposure.rs).
cluster_key=$(head -c 32 /dev/urandom | base64 | tr -d "/+=\n")

# --- the cluster ------------------------------------------------------------------------------------

say "starting node-a (no models), node-b and node-c (smollm2)"
start_node a --cluster-key "$cluster_key"
start_node b --model "smollm2=$chat_model" --cluster-key "$cluster_key"
start_node c --model "smollm2=$chat_model" --cluster-key "$cluster_key"
wait_for "node-a lists smollm2 on node-b (mDNS)" lists_model a smollm2 node-b
wait_for "node-a lists smollm2 on node-c (mDNS)" lists_model a smollm2 node-c
chat_answered_by_either() {
  local status
  status=$(in_ns a curl -s -o "$tmp/warm.json" -w '%{http_code}' --max-time 60 \
    -H 'Content-Type: application/json' -d "$(chat_request smollm2 4)" "$(url a /v1/chat/completions)")
  [ "$status" = 200 ] || fail "a warm-up chat through node-a: status $status: $(head -c 500 "$tmp/warm.json")"
}
chat_answered_by_either

say "a long streamed answer through node-a"
# ignore_eos: the answer runs its whole length, so the cut always lands in the middle of it.
body=$(printf '{"model":"smollm2","temperature":0,"max_tokens":400,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true},"messages":[%s]}' \
  '{"role":"user","content":"Tell me a long story about a lighthouse keeper."}')
in_ns a python3 "$tmp/stream.py" "$((timeout * 3))" "$tmp/stream" "$body" >"$tmp/stream.summary" \
  2>"$tmp/stream.error" &
step_pid=$!
wait_for "the client gets its first 10 pieces" at_least_pieces 10
cut=$(cat "$tmp/stream.host")
case "$cut" in
  node-b) other=node-c ;;
  node-c) other=node-b ;;
  *) fail "the answer came from '$cut', not node-b or node-c" ;;
esac
cut=${cut#node-}
pieces_before=$(pieces_streamed)
say "pulling node-$cut's cable after $pieces_before pieces"
cable "$cut" down
cut_at=$(now)

wait_for "node-a stops listing node-$cut for smollm2" unlisted a smollm2 "node-$cut"
measure cut_host_dropped_seconds "$(seconds_since "$cut_at")" s

status=0
wait "$step_pid" || status=$?
step_pid=""
[ "$status" -eq 0 ] || fail "the streamed answer broke after the cable was pulled: $(cat "$tmp/stream.error")"
read -r pieces longest total <"$tmp/stream.summary"
[ "$pieces" -gt "$pieces_before" ] || fail "nothing was streamed after the cable was pulled"
grep -q "answer resumed.*host=$other" "$(log_of a)" ||
  fail "node-a's log does not say the answer resumed on $other"
say "the answer went on from $other: $pieces pieces in all, $pieces_before before the cut"
measure stream_pieces "$pieces" pieces
measure longest_stall_seconds "$longest" s
measure stream_total_seconds "$total" s

say "plugging node-$cut's cable back in"
cable "$cut" up
plugged_at=$(now)
# Redials back off up to 60 s while the cable is out, so this wait gets twice the usual time.
timeout=$((timeout * 2)) wait_for "node-a lists smollm2 on node-$cut again" lists_model a smollm2 "node-$cut"
measure reconnect_seconds "$(seconds_since "$plugged_at")" s
wait_for "node-$cut lists smollm2 on $other again" lists_model "$cut" smollm2 "$other"

echo PASS
