#!/usr/bin/env bash
# Two members behind two NAT routers punch a hole and talk directly. Five "hosts" (network
# namespaces):
#
#   node-r   on the "internet" ($public.0/24): the cluster secret, no models
#   gate-x   a home router: NAT (masquerade) from 192.168.1.0/24 to the internet, drops
#            connections it did not see go out, as home routers do
#   node-x   behind gate-x: joins with a connection key from node-r, hosts smollm2-x
#   gate-y   the same for 192.168.2.0/24
#   node-y   behind gate-y: joins with a connection key from node-r, hosts smollm2-y
#
# node-x and node-y reach node-r but not each other. They first talk through a circuit relayed by
# node-r, then (libp2p DCUtR: both dial each other's address as node-r saw it, at the same time)
# through a direct connection across both NATs. The script checks that the direct connection
# happens, that chat requests are answered both ways after it, and that a streamed answer started
# as soon as they joined, while the connection may still be moving off the relay, arrives whole.
# mDNS is off: only connection keys join.
#
#   scripts/netns-holepunch.sh
#
# Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) for `ip netns`, and iptables; without them prints
# `SKIP: ...` and exits 77. Prints `MEASURE name value unit` lines (reported, never asserted), then
# `PASS`, or `FAIL: reason` and the tail of every node's log. Everything it starts and creates is
# removed on exit, also after a failure or Ctrl-C; the logs are kept after a failure.
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
# 10.97.x: the other scripts use 10.98-99.x, 10.100-189.x and 10.200-249.x.
public="10.97.$((RANDOM % 200 + 20))"
declare -A ns=([r]="$prefix-r" [x]="$prefix-x" [y]="$prefix-y")
declare -A gate=([x]="$prefix-gx" [y]="$prefix-gy")
declare -A gate_address=([x]="$public.2" [y]="$public.3")
declare -A home=([x]="192.168.1" [y]="192.168.2")

# shellcheck source=scripts/netns-lib.sh
source "$repo/scripts/netns-lib.sh"

# --- the network ------------------------------------------------------------------------------------

command -v iptables >/dev/null || skip "iptables is needed for NAT (Debian package iptables)"
netns_preflight "$bridge_ns" llmesh-netns-holepunch

say "network: the internet $public.0/24 (node-r, gate-x, gate-y); homes 192.168.1.0/24 and 192.168.2.0/24"
ip -n "$bridge_ns" link add br0 type bridge
ip -n "$bridge_ns" link set dev br0 up
add_ns "${ns[r]}"
ip link add eth0 netns "${ns[r]}" type veth peer name port-r netns "$bridge_ns"
ip -n "$bridge_ns" link set dev port-r master br0 up
ip -n "${ns[r]}" addr add "$public.10/24" dev eth0
ip -n "${ns[r]}" link set dev eth0 up
for node in x y; do
  g=${gate[$node]}
  add_ns "$g"
  ip link add wan netns "$g" type veth peer name "port-g$node" netns "$bridge_ns"
  ip -n "$bridge_ns" link set dev "port-g$node" master br0 up
  ip -n "$g" addr add "${gate_address[$node]}/24" dev wan
  ip -n "$g" link set dev wan up
  add_ns "${ns[$node]}"
  ip link add lan netns "$g" type veth peer name eth0 netns "${ns[$node]}"
  ip -n "$g" addr add "${home[$node]}.1/24" dev lan
  ip -n "$g" link set dev lan up
  ip -n "${ns[$node]}" addr add "${home[$node]}.11/24" dev eth0
  ip -n "${ns[$node]}" link set dev eth0 up
  ip -n "${ns[$node]}" route add default via "${home[$node]}.1"
  ip netns exec "$g" sysctl -q -w net.ipv4.ip_forward=1
  # Masquerade what leaves for the internet; drop what arrives unasked (no reset either).
  ip netns exec "$g" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE
  ip netns exec "$g" iptables -A INPUT -i wan -m conntrack --ctstate NEW -j DROP
  ip netns exec "$g" iptables -A FORWARD -i wan -m conntrack --ctstate NEW -j DROP
done

# The premise: node-x and node-y reach node-r, and neither reaches the other's router unasked.
wait_for "node-x reaches node-r" can_connect x "$public.10"
wait_for "node-y reaches node-r" can_connect y "$public.10"
! can_connect x "${gate_address[y]}" || fail "node-x reaches gate-y unasked: the premise does not hold"
! can_connect y "${gate_address[x]}" || fail "node-y reaches gate-x unasked: the premise does not hold"
say "node-x and node-y each reach node-r through their NAT, and not each other"

# --- the cluster ------------------------------------------------------------------------------------

start_r_and_join_x_y
started_both=$(now)
wait_for "node-x lists smollm2-y hosted by node-y" lists_model x smollm2-y node-y
wait_for "node-y lists smollm2-x hosted by node-x" lists_model y smollm2-x node-x
for node in x y; do
  wait_for "node-$node reserved a relayed address on node-r" \
    grep -q "reachable through a relay" "$(log_of "$node")"
done

# A long streamed answer from node-y to a client of node-x: it starts on whatever connection
# node-x and node-y have, relayed at first, and must arrive whole while that changes.
cat >"$tmp/stream.py" <<'EOF'
import http.client, json, sys

budget, body = float(sys.argv[1]), sys.argv[2]
connection = http.client.HTTPConnection("127.0.0.1", 8080, timeout=budget)
connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
response = connection.getresponse()
if response.status != 200:
    sys.exit(f"status {response.status}: {response.read(500)!r}")
pieces, done = 0, False
for line in response:
    line = line.strip()
    if line == b"data: [DONE]":
        done = True
        break
    if line.startswith(b"data:"):
        chunk = json.loads(line[5:])
        if "error" in chunk:
            sys.exit(f"the stream carried an error: {chunk['error']}")
        if (chunk.get("choices") or [{}])[0].get("delta", {}).get("content"):
            pieces += 1
if not done:
    sys.exit(f"the stream ended after {pieces} pieces without [DONE]")
print(pieces)
EOF
body=$(printf '{"model":"smollm2-y","temperature":0,"max_tokens":200,"ignore_eos":true,"stream":true,"messages":[%s]}' \
  '{"role":"user","content":"Tell me a long story about a lighthouse keeper."}')
in_ns x python3 "$tmp/stream.py" "$((timeout * 3))" "$body" >"$tmp/stream.out" 2>"$tmp/stream.error" &
step_pid=$!

punched() { grep -q "connected directly through a hole punched in NAT" "$(log_of x)" "$(log_of y)"; }
wait_for "node-x and node-y punch a hole through both NATs" punched
# From starting node-x and node-y with their keys until a log says so (polled every 0.2 s).
measure holepunch_seconds "$(seconds_since "$started_both")" s
say "direct connection: $(grep -h "hole punched" "$(log_of x)" "$(log_of y)" | head -n 1 | cut -c 1-200)"

status=0
wait "$step_pid" || status=$?
step_pid=""
[ "$status" -eq 0 ] || fail "the streamed answer broke while the connection moved: $(cat "$tmp/stream.error")"
say "the streamed answer arrived whole: $(cat "$tmp/stream.out") pieces"

started=$(now)
chat_answered_by x smollm2-y y
measure direct_chat_seconds "$(seconds_since "$started")" s
chat_answered_by y smollm2-x x

echo PASS
