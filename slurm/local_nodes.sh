# Sourced by slurm/local_cluster.sh for a cluster of N >= 2 nodes on this one machine.
#
# Node i (ddpm-node1 .. ddpm-nodeN) is
#   - a network namespace `ddpm-nodeI` (ip netns) whose only links are lo and eth0, one end of a
#     veth pair whose other end (ddpm-vI) sits on the bridge ddpm-br in the root namespace;
#     address $SUBNET.(10+i)/24; the bridge (the controller's side) has $SUBNET.1;
#   - a UTS + mount namespace held open by a `sleep` (the "holder"), with the hostname ddpm-nodeI
#     and $DIR/hosts bound over /etc/hosts, so that every node resolves every other by name
#     (the launcher's --main_process_ip is the first host of the job's node list) without DNS
#     ($DIR/resolv.conf, bound over /etc/resolv.conf, names the node's own loopback);
#   - its own slurmd, started inside those namespaces (nsenter into the holder).
# The nodes get no default route: a packet for any address outside $SUBNET.0/24 has nowhere to
# go (ENETUNREACH), so nothing a job does can reach the outside network.

NODE_PREFIX=ddpm-node
BRIDGE=ddpm-br
SUBNET="${DDPM_SLURM_SUBNET:-10.217.27}"  # a /24 that nothing on this machine uses (checked)

node_name() { echo "$NODE_PREFIX$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

holder_pid() {  # the pid of node NAME's namespace holder, when it is alive and is that holder
  pid_of "holder-$1" "ddpm-holder $1 "  # the space: node1 is not node10
}

node_exec() {  # node_exec NAME CMD...: run CMD inside node NAME (network, hostname, /etc/hosts)
  local name="$1" pid
  shift
  pid="$(holder_pid "$name")" || die "node $name is not up (bash slurm/local_cluster.sh start --nodes N)"
  nsenter -t "$pid" -n -u -m -- "$@"
}

ip2int() { local IFS=. a b c d; read -r a b c d <<<"$1"; echo $(((a << 24) | (b << 16) | (c << 8) | d)); }

check_subnet_free() {
  # Refuse a subnet that overlaps any address or route of this machine other than our bridge:
  # the nodes' traffic must stay between the namespaces made here.
  [[ $SUBNET =~ ^(10|172|192)\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
    || die "DDPM_SLURM_SUBNET=$SUBNET: give the first three numbers of a private /24, e.g. 10.217.27"
  local lo hi dst dev net len n_lo n_hi
  lo="$(ip2int "$SUBNET.0")"
  hi=$((lo + 255))
  while read -r dst dev; do
    [[ $dst == default || $dev == "$BRIDGE" ]] && continue
    [[ $dst == */* ]] || dst="$dst/32"
    net="${dst%/*}" len="${dst#*/}"
    n_lo=$(($(ip2int "$net") & ~((1 << (32 - len)) - 1) & 0xffffffff))
    n_hi=$((n_lo + (1 << (32 - len)) - 1))
    if ((n_lo <= hi && lo <= n_hi)); then
      die "subnet $SUBNET.0/24 overlaps $dst on $dev; choose another with DDPM_SLURM_SUBNET=A.B.C"
    fi
  done < <(ip -4 route show table all | awk '{d = $1; if (d ~ /^(local|broadcast|unreachable|prohibit|blackhole|throw|nat|anycast|multicast)$/) d = $2
                                              v = ""; for (i = 1; i < NF; i++) if ($i == "dev") v = $(i + 1); print d, v}'
           ip -4 -o addr show | awk '{print $4, $2}')
}

write_hosts() {
  local i
  {
    echo "127.0.0.1 localhost"
    echo "$CTL_ADDR $CTL_NAME"
    for ((i = 1; i <= NODES; i++)); do echo "$(node_addr "$i") $(node_name "$i")"; done
  } >"$DIR/hosts.tmp"
  mv "$DIR/hosts.tmp" "$DIR/hosts"
  # A name that is not in hosts is asked of the node's own loopback (where nothing answers),
  # never of this machine's DNS server.
  echo "nameserver 127.0.0.1" >"$DIR/resolv.conf"
}

bridge_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip -4 addr show dev "$BRIDGE" | grep -q "inet $CTL_ADDR/" || ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

node_up() {  # node_up I: namespace, link, address, holder; each step only if missing
  local i="$1" name ns veth addr
  name="$(node_name "$i")" ns="$(node_name "$i")" veth="ddpm-v$i" addr="$(node_addr "$i")"
  [[ -e /run/netns/$ns ]] || ip netns add "$ns"
  if ! ip netns exec "$ns" ip link show eth0 >/dev/null 2>&1; then
    ip link del "$veth" 2>/dev/null || true  # half a pair left by an interrupted start
    ip link add "$veth" type veth peer name "$veth-n"
    ip link set "$veth-n" netns "$ns"
    ip netns exec "$ns" ip link set "$veth-n" name eth0
  fi
  ip link set "$veth" master "$BRIDGE"
  ip link set "$veth" up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" sh -c "ip -4 addr show dev eth0 | grep -q 'inet $addr/' || ip addr add $addr/24 dev eth0"
  ip netns exec "$ns" ip link set eth0 up
  if ! holder_pid "$name" >/dev/null; then
    # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs the host's cgroup mount.
    # unshare execs (no fork), so the pid the holder writes is the sleep's.
    setsid nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private -- bash -c \
      'echo $$ >"$1" && hostname "$2" && mount --bind "$3" /etc/hosts \
       && { [[ ! -e /etc/resolv.conf ]] || mount --bind "$4" /etc/resolv.conf; } \
       && exec -a "ddpm-holder $2" sleep infinity' \
      holder "$DIR/run/holder-$name.pid" "$name" "$DIR/hosts" "$DIR/resolv.conf" </dev/null >>"$DIR/log/nodes.log" 2>&1 &
    wait_for 20 "namespace holder of $name" holder_pid "$name"
  fi
}

nodes_up() {
  local i
  check_subnet_free
  echo "$NODES" >"$DIR/nodes"
  write_hosts
  bridge_up
  for ((i = 1; i <= NODES; i++)); do node_up "$i"; done
}

made_nodes() {  # how many nodes the last start made (0 when none)
  [[ -s $DIR/nodes ]] && tr -dc 0-9 <"$DIR/nodes" || echo 0
}

nodes_down() {  # remove every holder, namespace and link a start made (the daemons are stopped first)
  local n i name pid
  n="$(made_nodes)"
  for ((i = 1; i <= n; i++)); do
    name="$(node_name "$i")"
    if pid="$(holder_pid "$name")"; then stop_pid "$pid" "holder of $name"; fi
    rm -f "$DIR/run/holder-$name.pid"
    # Deleting the namespace deletes its end of the pair, and with it the bridge's end.
    if [[ -e /run/netns/$name ]]; then ip netns del "$name" && log "removed namespace $name"; fi
    ip link del "ddpm-v$i" 2>/dev/null || true
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" && log "removed bridge $BRIDGE"; fi
  rm -f "$DIR/nodes"
}
