#!/usr/bin/env bash
# What the network-namespace scripts share: FAIL/SKIP/PASS reporting, the cleanup that stops every
# node and deletes every namespace on any exit, bounded waits, starting and stopping nodes (one log
# per start), and questions asked of a node's API: models, invitations, chat.
# Sourced by scripts/netns-*.sh after `set -euo pipefail -o errtrace` and `repo=...`; they define
# `ns` (node -> namespace) before calling `netns_preflight`.
# shellcheck disable=SC2317,SC2034,SC2154  # functions, state and settings shared with the scripts that source it

export LC_ALL=C # a decimal point in $EPOCHREALTIME and awk's numbers

# Settings every script takes from the environment (see each script's header).
bin=${LLMESH_BIN:-${CARGO_TARGET_DIR:-/var/tmp/llmesh-target}/debug/llmesh}
models_dir=${LLMESH_MODELS_DIR:-$repo/models}
chat_model="$models_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
timeout=${LLMESH_NETNS_TIMEOUT:-60}

declare -A pid=()      # node -> pid of its llmesh, while it runs
step_pid=""            # a slow request running in the background (run_killable)
helpers=()             # other children to stop on exit (load clients)
created_ns=()          # every namespace this run added, for the cleanup
reported=0             # a FAIL or SKIP line was printed already
tmp=""                 # this run's logs and scratch files
declare -A runs=()     # node -> how many times it was started (one log file per start)

say() { echo "--- $*"; }

# Three nodes a, b and c on one bridge, in 10.OCTET.x.0/24 with x random so that runs side by side
# do not collide: sets nodes, prefix, bridge_ns, subnet, ns and address. Each script has an OCTET
# of its own: 99 netns-cluster.sh, 98 netns-failover.sh, 97 netns-rolling-upgrade.sh, 96 soak.sh
# (10.100-189.x are netns-routed.sh's, 10.200-249.x netns-relay.sh's).
three_nodes_on_a_bridge() { # OCTET
  nodes=(a b c)
  prefix="llmesh-$$"
  bridge_ns="$prefix-br"
  subnet="10.$1.$((RANDOM % 200 + 20))"
  declare -gA ns=([a]="$prefix-a" [b]="$prefix-b" [c]="$prefix-c")
  declare -gA address=([a]="$subnet.11" [b]="$subnet.12" [c]="$subnet.13")
}

measure() { echo "MEASURE $1 $2 $3"; } # NAME VALUE UNIT: reported, never asserted

fail() {
  echo "FAIL: $*"
  reported=1
  exit 1
}

skip() {
  echo "SKIP: $*"
  reported=1
  exit 77
}

# An unexpected failing command (set -e) says where it happened; subshells leave it to their parent.
on_error() {
  local status=$? line=$1 command=$2
  if [ "$BASH_SUBSHELL" -eq 0 ] && [ "$reported" -eq 0 ]; then
    echo "FAIL: line $line: '$command' exited with $status"
    reported=1
  fi
}
trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR

cleanup() {
  local status=$? log
  set +e
  trap - ERR
  # A second signal (timeout(1) signals the whole process group) must not cut the cleanup short.
  trap '' INT TERM
  if [ -n "$step_pid" ]; then
    kill -KILL "$step_pid" 2>/dev/null
    wait "$step_pid" 2>/dev/null
  fi
  for helper in "${helpers[@]}"; do
    kill -KILL "$helper" 2>/dev/null
    wait "$helper" 2>/dev/null
  done
  for node in "${!pid[@]}"; do
    kill -TERM "${pid[$node]}" 2>/dev/null
  done
  for node in "${!pid[@]}"; do
    stop_within 10 "${pid[$node]}" || { kill -KILL "${pid[$node]}" 2>/dev/null; wait "${pid[$node]}" 2>/dev/null; }
  done
  if [ "$status" -ne 0 ] && [ "$status" -ne 77 ] && [ -n "$tmp" ]; then
    [ "$reported" -eq 1 ] || echo "FAIL: exited with status $status"
    for log in "$tmp"/*.log; do
      [ -f "$log" ] || continue
      echo "=== last 40 lines of $log"
      tail -n 40 "$log"
    done
    echo "=== logs kept in $tmp"
  elif [ -n "$tmp" ] && [ "${LLMESH_NETNS_KEEP_LOGS:-0}" = 1 ]; then
    echo "=== logs kept in $tmp"
  elif [ -n "$tmp" ]; then
    rm -rf "$tmp"
  fi
  # Deleting a namespace deletes its interfaces: the veth pairs and the bridge go with them.
  for name in "${created_ns[@]}"; do
    ip netns delete "$name" 2>/dev/null || echo "warning: cannot delete namespace $name"
  done
  exit "$status"
}
trap cleanup EXIT
trap 'echo "FAIL: interrupted"; reported=1; exit 130' INT
trap 'echo "FAIL: terminated"; reported=1; exit 143' TERM

# Wait up to SECONDS for PID (a child of this shell) to end.
stop_within() { # SECONDS PID
  local deadline=$((SECONDS + $1))
  while kill -0 "$2" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
  wait "$2" 2>/dev/null
  return 0
}

now() { echo "$EPOCHREALTIME"; }
seconds_since() { awk -v start="$1" -v end="$EPOCHREALTIME" 'BEGIN { printf "%.2f", end - start }'; }

in_ns() { # NODE COMMAND...: run COMMAND on NODE's "host"
  local node=$1
  shift
  ip netns exec "${ns[$node]}" "$@"
}

# Does a TCP connection attempt from NODE to ADDRESS get an answer (accepted or refused) within
# 3 s? For checking a script's premise: who can reach whom.
can_connect() { # NODE ADDRESS
  local output
  output=$(in_ns "$1" timeout 3 bash -c "exec 3<>/dev/tcp/$2/9" 2>&1) && return 0
  [[ "$output" == *"refused"* ]]
}

add_ns() { # NAME
  ip netns add "$1"
  created_ns+=("$1")
  ip -n "$1" link set dev lo up
}

# Skip without `ip netns`; check the binary and the model; make $tmp (named after NAME).
netns_preflight() { # BRIDGE_NAMESPACE NAME
  command -v ip >/dev/null || skip "network namespaces unavailable (no 'ip' command)"
  local tool error
  for tool in curl python3 awk; do
    command -v "$tool" >/dev/null || fail "$tool is needed"
  done
  if ! error=$(ip netns add "$1" 2>&1); then
    skip "network namespaces unavailable ($(echo "$error" | head -n 1))"
  fi
  created_ns+=("$1")
  [ -x "$bin" ] || fail "no llmesh binary at $bin (cargo build, or set LLMESH_BIN)"
  [ -f "$chat_model" ] || fail "no demo model at $chat_model (run scripts/fetch-models.sh)"
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/$2.XXXXXX")
}

# One bridge (br0 in $bridge_ns) and every node of "${nodes[@]}" on it: its namespace, a veth
# whose bridge end is port-NODE, its address in $subnet.0/24, multicast on (mDNS).
bridge_hosts() {
  say "network: bridge in $bridge_ns, hosts in $prefix-{$(IFS=,; echo "${nodes[*]}")} on $subnet.0/24"
  ip -n "$bridge_ns" link add br0 type bridge mcast_snooping 0
  ip -n "$bridge_ns" link set dev br0 up
  local node
  for node in "${nodes[@]}"; do
    add_ns "${ns[$node]}"
    ip link add eth0 netns "${ns[$node]}" type veth peer name "port-$node" netns "$bridge_ns"
    ip -n "$bridge_ns" link set dev "port-$node" master br0 up
    ip -n "${ns[$node]}" addr add "${address[$node]}/24" dev eth0
    ip -n "${ns[$node]}" link set dev eth0 multicast on up
  done
}

check_alive() {
  local node
  for node in "${!pid[@]}"; do
    kill -0 "${pid[$node]}" 2>/dev/null || fail "node-$node exited early (see its log below)"
  done
}

# Poll CONDITION every 0.2 s until it holds; fail after $timeout seconds or when a node dies.
wait_for() { # DESCRIPTION CONDITION...
  local description=$1 deadline
  shift
  deadline=$(awk -v now="$EPOCHREALTIME" -v t="$timeout" 'BEGIN { printf "%d", now + t }')
  until "$@"; do
    check_alive
    [ "${EPOCHREALTIME%.*}" -lt "$deadline" ] || fail "$description: not within ${timeout} s"
    sleep 0.2
  done
}

# Sleep SECONDS while checking that every node stays up.
stay_up() { # SECONDS
  local deadline=$((SECONDS + $1))
  while [ "$SECONDS" -lt "$deadline" ]; do
    check_alive
    sleep 0.2
  done
}

healthy() { # NODE
  [ "$(in_ns "$1" curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:8080/health)" = 200 ]
}

# Does NODE's /v1/models list MODEL with HOST among its hosts (HOST empty: with any or no host)?
lists_model() { # NODE MODEL [HOST]
  local body
  body=$(in_ns "$1" curl -sf --max-time 2 http://127.0.0.1:8080/v1/models) || return 2
  python3 -c '
import json, sys
model, host = sys.argv[1], sys.argv[2]
try:
    entries = json.load(sys.stdin)["data"]
except (ValueError, KeyError, TypeError):
    sys.exit(2)
for entry in entries:
    hosts = [h.get("name") for h in (entry.get("llmesh") or {}).get("hosts") or []]
    if entry.get("id") == model and (not host or host in hosts):
        sys.exit(0)
sys.exit(1)' "$2" "${3:-}" <<<"$body"
}

# NODE's /v1/models answers and does not list MODEL.
lacks_model() { # NODE MODEL
  local status=0
  lists_model "$1" "$2" || status=$?
  [ "$status" -eq 1 ]
}

# Run a slow step as a child that the cleanup can end: a signal interrupts `wait` at once, whereas
# bash holds its traps until a foreground command ends. COMMAND must be an external command, not a
# shell function, so that the pid is the command's own.
run_killable() { # OUTPUT_FILE COMMAND...
  local output=$1 status=0
  shift
  "$@" >"$output" &
  step_pid=$!
  wait "$step_pid" || status=$?
  step_pid=""
  return "$status"
}

# --- nodes and their API (each node's API is on 127.0.0.1:8080 in its namespace) -------------------

url() { echo "http://127.0.0.1:8080$2"; } # NODE PATH: NODE's API, seen from its host

start_node() { # NODE [EXTRA FLAGS...]
  local node=$1
  shift
  runs[$node]=$((${runs[$node]:-0} + 1))
  mkdir -p "$tmp/$node"
  # NO_COLOR: plain log files.
  NO_COLOR=1 ip netns exec "${ns[$node]}" "$bin" serve \
    --listen 127.0.0.1:8080 --p2p-listen /ip4/0.0.0.0/tcp/7690 \
    --name "node-$node" --data-dir "$tmp/$node" "$@" >"$(log_of "$node")" 2>&1 &
  pid[$node]=$!
}

log_of() { echo "$tmp/node-$1.${runs[$1]}.log"; } # NODE: the log of its latest start

stop_node() { # NODE: SIGTERM, as on a clean shutdown
  kill -TERM "${pid[$1]}"
  stop_within "$timeout" "${pid[$1]}" || fail "node-$1 did not stop within $timeout s of SIGTERM"
  unset "pid[$1]"
}

# POST BODY to NODE's PATH; the response body goes to $tmp/post.json; fails unless the status is 200.
# (Not for command substitution: a fail there would end the subshell only, and its message with it.)
post() { # NODE PATH BODY
  local status
  status=$(in_ns "$1" curl -sS -o "$tmp/post.json" -w '%{http_code}' --max-time 10 \
    -H 'Content-Type: application/json' -d "$3" "$(url "$1" "$2")") ||
    fail "POST $2 to node-$1: curl failed"
  [ "$status" = 200 ] || fail "POST $2 to node-$1: status $status: $(head -c 500 "$tmp/post.json")"
}

json_field() { # FIELD: print FIELD of the JSON object on stdin
  python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

# Sets $key to a connection key from NODE, good for one use within SECONDS.
invite_from() { # NODE SECONDS
  post "$1" /api/invitations "{\"uses\":1,\"valid_seconds\":$2}"
  key=$(json_field key <"$tmp/post.json")
  [[ "$key" == llmesh://join/* ]] || fail "node-$1's invitation is not a connection key: $key"
}

# node-r founds a cluster with a secret (no models, no mDNS); node-x and node-y join it with a
# connection key each and host smollm2-x and smollm2-y. (netns-relay.sh, netns-holepunch.sh)
start_r_and_join_x_y() {
  local key_x key_y
  say "starting node-r with the cluster secret"
  start_node r --no-mdns --cluster-key team-secret-for-tests
  wait_for "node-r answers /health" healthy r
  invite_from r 600
  key_x=$key
  invite_from r 600
  key_y=$key
  say "node-x and node-y join with keys from node-r"
  start_node x --no-mdns --model "smollm2-x=$chat_model" --join "$key_x"
  start_node y --no-mdns --model "smollm2-y=$chat_model" --join "$key_y"
}

chat_request() { # MODEL MAX_TOKENS
  printf '{"model":"%s","temperature":0,"max_tokens":%s,"messages":[%s,%s]}' "$1" "$2" \
    '{"role":"system","content":"You are a helpful assistant."}' \
    '{"role":"user","content":"What is the capital of France?"}'
}

# A chat request to NODE for MODEL must be answered by node-ANSWERER and mention Paris.
chat_answered_by() { # NODE MODEL ANSWERER
  local node=$1 model=$2 answerer=$3 status answered_by answer
  run_killable "$tmp/chat.status" ip netns exec "${ns[$node]}" curl -sS -o "$tmp/chat.json" \
    -D "$tmp/chat.headers" -w '%{http_code}' --max-time 120 -H 'Content-Type: application/json' \
    -d "$(chat_request "$model" 30)" "$(url "$node" /v1/chat/completions)" ||
    fail "chat request to node-$node for $model: curl failed (see above)"
  status=$(cat "$tmp/chat.status")
  [ "$status" = 200 ] || fail "chat request to node-$node for $model: status $status: $(head -c 500 "$tmp/chat.json")"
  answered_by=$(tr -d '\r' <"$tmp/chat.headers" | awk -F': ' 'tolower($1) == "x-llmesh-node" { print $2 }')
  [ "$answered_by" = "node-$answerer" ] ||
    fail "chat request to node-$node for $model: x-llmesh-node is '$answered_by', not node-$answerer"
  answer=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' \
    <"$tmp/chat.json")
  [[ "$answer" == *Paris* ]] || fail "chat request to node-$node for $model: the answer lacks Paris: $answer"
  say "node-$answerer answered $model through node-$node: $answer"
}
