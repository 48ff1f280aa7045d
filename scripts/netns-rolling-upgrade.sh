#!/usr/bin/env bash
# A rolling upgrade under load: every host of a model is stopped (SIGTERM, so it drains) and
# started again, one after the other, while clients stream answers through the entry node the
# whole time. Three "hosts" (network namespaces) on one bridge, finding each other by mDNS:
#
#   node-a  no models: the entry node the clients talk to
#   node-b  smollm2
#   node-c  smollm2
#
# Two clients send streamed chat requests through node-a back to back. node-b is stopped, waited
# for (it finishes its answers and exits), started again (with LLMESH_BIN_NEW when given: the
# upgrade) and waited for until node-a routes to it; then node-c the same. No request may fail and
# no stream may break; every node must be seen draining by node-a before it leaves, unless it
# had no answer to finish and left at once.
#
#   scripts/netns-rolling-upgrade.sh
#
# Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) for `ip netns`; without it prints `SKIP: ...` and
# exits 77. Prints `MEASURE name value unit` lines (reported, never asserted), then `PASS`, or
# `FAIL: reason` and the tail of every node's log. Everything it starts and creates is removed on
# exit, also after a failure or Ctrl-C; the logs are kept after a failure.
#
#   LLMESH_BIN          the binary (default $CARGO_TARGET_DIR/debug/llmesh, target dir
#                       /var/tmp/llmesh-target)
#   LLMESH_BIN_NEW      the binary each host is restarted with (default: LLMESH_BIN)
#   LLMESH_MODELS_DIR   where scripts/fetch-models.sh put the demo models (default models/)
#   LLMESH_NETNS_TIMEOUT  seconds to wait for each step (default 60)
#   LLMESH_NETNS_KEEP_LOGS=1  keep the nodes' logs after a success too
set -euo pipefail -o errtrace
repo=$(cd "$(dirname "$0")/.." && pwd)

# shellcheck source=scripts/netns-lib.sh
source "$repo/scripts/netns-lib.sh"
three_nodes_on_a_bridge 97
new_bin=${LLMESH_BIN_NEW:-$bin}

# --- the network ------------------------------------------------------------------------------------

netns_preflight "$bridge_ns" llmesh-netns-rolling-upgrade

bridge_hosts

# The load: CLIENTS threads sending streamed chats to node-a back to back until $2.stop exists.
# Every answer must end in [DONE] with no error and its whole length. On the end, one line:
# "ANSWERED FAILED LONGEST_PAUSE_MS" (the longest a client waited for its next chunk, the first
# one included), and each failure's reason on stderr.
cat >"$tmp/load.py" <<'EOF'
import http.client, json, os, sys, threading, time

clients, out, body = int(sys.argv[1]), sys.argv[2], sys.argv[3]
expected = json.loads(body)["max_tokens"]
answered, failures, lock = [0], [], threading.Lock()

longest_pause = [0.0]

def one():
    last = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", 8080, timeout=120)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        return f"status {response.status}: {response.read(300)!r}"
    done, tokens = False, 0
    for line in response:
        now = time.monotonic()
        with lock:
            longest_pause[0] = max(longest_pause[0], now - last)
        last = now
        line = line.strip()
        if line == b"data: [DONE]":
            done = True
            break
        if not line.startswith(b"data:"):
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            return f"the stream carried an error: {chunk['error']}"
        usage = chunk.get("usage")
        if usage:
            tokens = usage["completion_tokens"]
    if not done:
        return "the stream ended without [DONE]"
    if tokens != expected:
        return f"{tokens} tokens, not {expected}"
    return None

def client():
    while not os.path.exists(out + ".stop"):
        try:
            failure = one()
        except Exception as error:  # a reset or a timeout is a failure too
            failure = repr(error)
        with lock:
            if failure:
                failures.append(failure)
            else:
                answered[0] += 1
            open(out + ".count", "w").write(str(answered[0]))

threads = [threading.Thread(target=client) for _ in range(clients)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for failure in failures:
    print(failure, file=sys.stderr)
print(answered[0], len(failures), round(longest_pause[0] * 1000))
EOF

answered() { [ -f "$tmp/load.count" ] && cat "$tmp/load.count" || echo 0; }
answered_more_than() { [ "$(answered)" -gt "$1" ]; }

# Does node-a's /api/nodes show NODE as draining?
seen_draining() { # NODE
  in_ns a curl -sf --max-time 2 http://127.0.0.1:8080/api/nodes |
    python3 -c 'import json, sys
nodes = json.load(sys.stdin)["data"]
sys.exit(0 if any(n["name"] == sys.argv[1] and n["status"] == "draining" for n in nodes) else 1)' "node-$1"
}

seen_draining_or_gone() { # NODE PID
  seen_draining "$1" || ! kill -0 "$2" 2>/dev/null
}

cluster_key=$(head -c 32 /dev/urandom | base64 | tr -d "/+=\n")

# --- the cluster ------------------------------------------------------------------------------------

say "starting node-a (no models), node-b and node-c (smollm2)"
start_node a --cluster-key "$cluster_key"
start_node b --model "smollm2=$chat_model" --cluster-key "$cluster_key" --drain-timeout 60
start_node c --model "smollm2=$chat_model" --cluster-key "$cluster_key" --drain-timeout 60
wait_for "node-a lists smollm2 on node-b (mDNS)" lists_model a smollm2 node-b
wait_for "node-a lists smollm2 on node-c (mDNS)" lists_model a smollm2 node-c

say "load: 2 clients streaming through node-a"
body=$(printf '{"model":"smollm2","temperature":0,"max_tokens":48,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true},"messages":[%s]}' \
  '{"role":"user","content":"Tell me about the sea."}')
in_ns a python3 "$tmp/load.py" 2 "$tmp/load" "$body" >"$tmp/load.summary" 2>"$tmp/load.errors" &
step_pid=$!
wait_for "the load gets its first answers" answered_more_than 2

upgrade_started=$(now)
for host in b c; do
  before=$(answered)
  say "upgrading node-$host: SIGTERM (drain), then a restart"
  stopping_at=$(now)
  host_pid=${pid[$host]}
  unset "pid[$host]" # it is meant to exit now
  kill -TERM "$host_pid"
  # A host with no answer running drains at once and may be gone before node-a polls.
  wait_for "node-a sees node-$host draining" seen_draining_or_gone "$host" "$host_pid"
  measure "drain_seen_${host}_seconds" "$(seconds_since "$stopping_at")" s
  stop_within "$timeout" "$host_pid" || fail "node-$host did not finish draining within $timeout s"
  measure "drained_${host}_seconds" "$(seconds_since "$stopping_at")" s
  grep -q "drained: every answer finished" "$(log_of "$host")" ||
    fail "node-$host did not finish its answers before it left"
  bin=$new_bin start_node "$host" --model "smollm2=$chat_model" --cluster-key "$cluster_key" --drain-timeout 60
  wait_for "node-a routes to node-$host again" lists_model a smollm2 "node-$host"
  measure "back_${host}_seconds" "$(seconds_since "$stopping_at")" s
  wait_for "answers keep coming after node-$host's upgrade" answered_more_than "$((before + 2))"
done
measure upgrade_seconds "$(seconds_since "$upgrade_started")" s

touch "$tmp/load.stop"
status=0
wait "$step_pid" || status=$?
step_pid=""
[ "$status" -eq 0 ] || fail "the load client failed: $(cat "$tmp/load.errors")"
read -r ok failed longest_pause <"$tmp/load.summary"
measure answers "$ok" requests
measure failed "$failed" requests
measure resumed "$(grep -c "answer resumed" "$(log_of a)" || true)" requests
measure longest_pause "$longest_pause" ms
[ "$failed" -eq 0 ] || fail "$failed of $((ok + failed)) requests failed during the upgrade: $(head -5 "$tmp/load.errors")"
say "$ok answers streamed through the upgrade of both hosts, none failed"
echo PASS
