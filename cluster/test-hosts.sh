#!/usr/bin/env bash
# Test hosts on one machine: N network namespaces joined by a private bridge, each a "host" with
# its own loopback and one interface (eth0) at 198.18.0.<i>/24 (RFC 2544's benchmarking range,
# which routes nowhere), so every byte between two of them crosses an interface, as on a cluster.
# Each host also has a hostname, System V IPC and a /dev/shm of its own (UTS, IPC and mount
# namespaces, held by one process per host): processes on two hosts share no memory, so MPI and
# Ray cannot take them for neighbours on one machine (they would try shared memory and hang).
# Each host's /etc/hosts names every host of the set. The rest of the filesystem is shared, like
# a cluster's shared filesystem. Needs root,
# iproute2 and util-linux (unshare, nsenter).
#
#   cluster/test-hosts.sh up N [STATE_DIR]     make hosts 1..N (default STATE_DIR /tmp/distffn-hosts)
#   cluster/test-hosts.sh run I CMD...           run CMD on host I (nsenter), STATE_DIR from $HOSTS_STATE
#   cluster/test-hosts.sh lose I                 SIGKILL every process of host I (a lost machine); STATE_DIR from $HOSTS_STATE
#   cluster/test-hosts.sh down [STATE_DIR]     kill what runs in them (by pid) and remove everything made
#   cluster/test-hosts.sh status [STATE_DIR]   the hosts, their addresses and process counts
#
# Nothing is added to the machine's own network namespace: the bridge lives in a namespace of its
# own (the hub), each veth pair is created between a host and the hub, no host has a default
# route, and forwarding is off everywhere, so nothing reaches any other network. Names carry a
# tag of this instance (from STATE_DIR), so several sets may exist side by side. `down` removes
# exactly the namespaces recorded in STATE_DIR/namespaces.
#
# Settings (environment): HOSTS_SUBNET (198.18.0: the /24 used; another one inside 198.18.0.0/15,
# e.g. 198.19.7, for a second set), HOSTS_IFACE (eth0: the hosts' interface name).
set -euo pipefail
ACTION=${1:-}
IFACE=${HOSTS_IFACE:-eth0}
SUBNET=${HOSTS_SUBNET:-198.18.0}

state_of() { printf '%s' "${1:-${HOSTS_STATE:-/tmp/distffn-hosts}}"; }
tag_of() { printf '%s' "$(printf '%s' "$1" | cksum | cut -c1-6)"; }

check_subnet() {
    # 198.18.0.0/15: the second octet is 18 or 19
    [[ "$SUBNET" =~ ^198\.(18|19)\.([0-9]{1,3})$ ]] && [ "${BASH_REMATCH[2]}" -le 255 ] || {
        echo "test-hosts.sh: HOSTS_SUBNET must lie in 198.18.0.0/15 (e.g. 198.18.0), got $SUBNET" >&2; exit 2; }
}

up() {
    local n=${1:?usage: $0 up N [STATE_DIR]} state i tag hub host
    state=$(state_of "${2:-}")
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 16 ] || { echo "test-hosts.sh: N: 1 to 16, got $n" >&2; exit 2; }
    check_subnet
    command -v ip >/dev/null || { echo "test-hosts.sh: 'ip' not found: apt-get install -y iproute2" >&2; exit 2; }
    if [ -s "$state/namespaces" ]; then
        echo "test-hosts.sh: $state already holds hosts (down first)" >&2; exit 2
    fi
    mkdir -p "$state"
    chmod 700 "$state"
    tag=$(tag_of "$state")
    hub="dfn$tag-hub"
    : >"$state/namespaces"
    # recorded before it exists, so `down` removes it even if `up` fails half-way
    echo "$hub" >>"$state/namespaces"
    trap 'down "$state" >/dev/null 2>&1 || true' ERR
    ip netns add "$hub"
    ip -n "$hub" link set lo up
    ip -n "$hub" link add br0 type bridge
    ip -n "$hub" link set br0 up
    ip netns exec "$hub" sysctl -qw net.ipv4.ip_forward=0
    : >"$state/hosts"
    for ((i = 1; i <= n; i++)); do
        host="dfn$tag-h$i"
        echo "$host" >>"$state/namespaces"
        ip netns add "$host"
        ip -n "$host" link set lo up
        # the pair is made inside the host and its peer moved to the hub at once
        ip -n "$host" link add "$IFACE" type veth peer name "h$i" netns "$hub"
        ip -n "$hub" link set "h$i" master br0 up
        ip -n "$host" addr add "$SUBNET.$i/24" dev "$IFACE"
        ip -n "$host" link set "$IFACE" up
        ip netns exec "$host" sysctl -qw net.ipv4.ip_forward=0
        # the host's holder: its hostname, IPC and /dev/shm live as long as this process
        ip netns exec "$host" unshare --uts --ipc --mount --propagation private \
            sh -c 'hostname "$0" && mount -t tmpfs -o mode=1777,size=50% tmpfs /dev/shm && exec sleep infinity' \
            "$host" </dev/null >/dev/null 2>&1 &
        echo "$i $host $SUBNET.$i $!" >>"$state/hosts"
    done
    # up when every holder has its hostname (its namespaces are made)
    for ((i = 0; i < 100; i++)); do
        awk '{print $2, $4}' "$state/hosts" | while read -r host pid; do
            [ "$(nsenter --target "$pid" --uts hostname 2>/dev/null)" = "$host" ] || exit 1
        done && break
        sleep 0.1
    done
    # every host's name resolves to its address on every host, as on a cluster (SLURM's daemons
    # and srun bind the address of their hostname): an /etc/hosts of the set, bind-mounted in each
    # host's own mount namespace (the machine's own /etc/hosts is untouched)
    { echo "127.0.0.1 localhost"; awk '{print $3, $2}' "$state/hosts"; } >"$state/etc-hosts"
    awk '{print $4}' "$state/hosts" | while read -r pid; do
        nsenter --target "$pid" --mount mount --bind "$state/etc-hosts" /etc/hosts
    done
    trap - ERR
    echo "$n test hosts up: $(awk '{s = s (NR > 1 ? ", " : "") $2 "=" $3} END {print s}' "$state/hosts") on $IFACE"
    echo "run on host I: HOSTS_STATE=$state $0 run I CMD..."
}

run_on() {
    local i=${1:?usage: $0 run I CMD...} state pid
    shift
    state=$(state_of "")
    pid=$(awk -v i="$i" '$1 == i {print $4}' "$state/hosts" 2>/dev/null)
    [ -n "$pid" ] || { echo "test-hosts.sh: no host $i in $state" >&2; exit 2; }
    exec nsenter --target "$pid" --net --uts --ipc --mount --wd="$PWD" "$@"
}

lose() {
    # every process of host I killed at once (SIGKILL), as when a machine loses power; the host
    # itself (its address, its holder) stays, answering nothing
    local i=${1:?usage: $0 lose I} state host holder pids
    state=$(state_of "")
    read -r host holder < <(awk -v i="$i" '$1 == i {print $2, $4}' "$state/hosts" 2>/dev/null) || true
    [ -n "${host:-}" ] || { echo "test-hosts.sh: no host $i in $state" >&2; exit 2; }
    pids=$(ip netns pids "$host" | grep -vx "$holder" || true)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    echo "host $i ($host): killed $(printf '%s\n' $pids | grep -c .) processes"
}

down() {
    local state ns pids i alive
    state=$(state_of "${1:-}")
    [ -f "$state/namespaces" ] || { echo "no test hosts recorded in $state"; return 0; }
    # every process in the hosts: SIGTERM, then SIGKILL after STOP_GRACE_S
    while read -r ns; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
    done <"$state/namespaces"
    for ((i = 0; i < ${STOP_GRACE_S:-5} * 10; i++)); do
        alive=0
        while read -r ns; do [ -n "$(ip netns pids "$ns" 2>/dev/null || true)" ] && alive=1; done <"$state/namespaces"
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    while read -r ns; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    done <"$state/namespaces"
    # deleting a namespace deletes its end of each veth pair, and with it the other end
    while read -r ns; do
        ip netns del "$ns" 2>/dev/null || true
    done <"$state/namespaces"
    rm -f "$state/namespaces" "$state/hosts" "$state/etc-hosts"
    rmdir "$state" 2>/dev/null || true
    echo "test hosts removed"
}

status() {
    local state
    state=$(state_of "${1:-}")
    [ -f "$state/hosts" ] || { echo "no test hosts in $state"; return 0; }
    while read -r i host addr holder; do
        echo "host $i: $host $addr ($(ip netns pids "$host" 2>/dev/null | grep -vcx "$holder") processes)"
    done <"$state/hosts"
}

case "$ACTION" in
    up) shift; up "$@" ;;
    run) shift; run_on "$@" ;;
    lose) shift; lose "$@" ;;
    down) shift; down "$@" ;;
    status) shift; status "$@" ;;
    *) echo "usage: $0 up N [STATE_DIR] | run I CMD... | lose I | down [STATE_DIR] | status [STATE_DIR]" >&2; exit 2 ;;
esac
