#!/usr/bin/env bash
# Two members that cannot reach each other, relayed by a third that both can reach. Three "hosts"
# (network namespaces) on two subnets with no route between them:
#
#   node-r  on both subnets (one interface in each, no forwarding): the cluster secret, no models
#   node-x  on subnet 1 only: joins with a connection key from node-r, hosts smollm2-x
#   node-y  on subnet 2 only: joins with a connection key from node-r, hosts smollm2-y
#
# node-x and node-y learn of each other through node-r, reserve a relayed address on it (their
# inviter), and answer each other's chat requests through a circuit relayed by node-r, which logs
# the circuit. mDNS is off: only connection keys join.
#
#   scripts/netns-relay.sh
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

prefix="llmesh-$$"
bridge_ns="$prefix-br"
# 10.99.x is netns-cluster.sh's and 10.100-189.x netns-routed.sh's.
net="10.$((RANDOM % 50 + 200))"
declare -A ns=([r]="$prefix-r" [x]="$prefix-x" [y]="$prefix-y")
declare -A address=([x]="$net.1.11" [y]="$net.2.12")

# shellcheck source=scripts/netns-lib.sh
source "$repo/scripts/netns-lib.sh"

# --- the network ------------------------------------------------------------------------------------

netns_preflight "$bridge_ns" llmesh-netns-relay

say "network: $net.1.0/24 (node-r, node-x) and $net.2.0/24 (node-r, node-y), no route between them"
for subnet in 1 2; do
  ip -n "$bridge_ns" link add "br$subnet" type bridge
  ip -n "$bridge_ns" link set dev "br$subnet" up
done
add_ns "${ns[r]}"
ip netns exec "${ns[r]}" sysctl -q -w net.ipv4.ip_forward=0
for subnet in 1 2; do
  ip link add "eth$subnet" netns "${ns[r]}" type veth peer name "port-r$subnet" netns "$bridge_ns"
  ip -n "$bridge_ns" link set dev "port-r$subnet" master "br$subnet" up
  ip -n "${ns[r]}" addr add "$net.$subnet.10/24" dev "eth$subnet"
  ip -n "${ns[r]}" link set dev "eth$subnet" up
done
declare -A subnet_of=([x]=1 [y]=2)
for node in x y; do
  add_ns "${ns[$node]}"
  ip link add eth0 netns "${ns[$node]}" type veth peer name "port-$node" netns "$bridge_ns"
  ip -n "$bridge_ns" link set dev "port-$node" master "br${subnet_of[$node]}" up
  ip -n "${ns[$node]}" addr add "${address[$node]}/24" dev eth0
  ip -n "${ns[$node]}" link set dev eth0 up
done

# The premise: node-x and node-y have no path to each other, only to node-r.
wait_for "node-x reaches node-r" can_connect x "$net.1.10"
wait_for "node-y reaches node-r" can_connect y "$net.2.10"
! can_connect x "${address[y]}" || fail "node-x reaches node-y directly: the premise does not hold"
say "node-x and node-y each reach node-r, and not each other"

# --- the cluster ------------------------------------------------------------------------------------

start_r_and_join_x_y
wait_for "node-r lists smollm2-x" lists_model r smollm2-x node-x
wait_for "node-r lists smollm2-y" lists_model r smollm2-y node-y
relay_waited=$(now)
wait_for "node-x lists smollm2-y hosted by node-y" lists_model x smollm2-y node-y
wait_for "node-y lists smollm2-x hosted by node-x" lists_model y smollm2-x node-x
# Does NODE's /api/nodes give node-OTHER an address relayed by node-r?
knows_relayed_address() { # NODE OTHER
  local body
  body=$(in_ns "$1" curl -sf --max-time 2 "$(url "$1" /api/nodes)") || return 1
  python3 -c '
import json, sys
body = json.load(sys.stdin)
nodes = body if isinstance(body, list) else body.get("nodes") or body.get("data") or []
sys.exit(0 if any(n.get("name") == sys.argv[1] and any("/p2p-circuit/" in a for a in n.get("addresses") or [])
                  for n in nodes) else 1)' "node-$2" <<<"$body"
}
for node in x y; do
  wait_for "node-$node reserved a relayed address on node-r" \
    grep -q "reachable through a relay" "$(log_of "$node")"
done
wait_for "node-x knows node-y's relayed address" knows_relayed_address x y
wait_for "node-y knows node-x's relayed address" knows_relayed_address y x
measure relay_ready_seconds "$(seconds_since "$relay_waited")" s

started=$(now)
chat_answered_by x smollm2-y y
measure relayed_chat_seconds "$(seconds_since "$started")" s
started=$(now)
chat_answered_by y smollm2-y y
measure local_chat_seconds "$(seconds_since "$started")" s
chat_answered_by y smollm2-x x
grep -q "relaying a circuit" "$(log_of r)" || fail "node-r logged no relayed circuit"
say "node-r relayed: $(grep -c "relaying a circuit" "$(log_of r)") circuit(s)"

echo PASS
