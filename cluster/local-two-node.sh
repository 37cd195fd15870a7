#!/usr/bin/env bash
# A two-node Ray cluster on one machine, loopback only: a head (`ray start --head`) and a second
# node (`ray start --address=...`), then `distffn run` against it, then both torn down.
#
#   unshare --net cluster/local-two-node.sh JOB.yaml [distffn run options...]
#
# Under `unshare --net` (root) the cluster lives in a private network namespace whose only
# interface is loopback, so Ray picks 127.0.0.1 for every node and nothing listens elsewhere;
# MPI (scaling.aggregation=allreduce) is told to use that interface, lo. The nodes share a
# freshly generated auth token and a temp folder of their own. The job's workers are placed
# with a SPREAD placement group, one per node when num_workers=2.
#
# Each node runs as `ray start --block` in a process session of its own, and this script stops
# exactly those sessions (SIGTERM, then SIGKILL after STOP_GRACE_S): never `ray stop`, which
# ends every Ray process of every user on the machine. It prints the session ids it started
# ("node sessions: ...") so a caller can check that nothing of them is left.
set -euo pipefail
JOB=${1:?usage: $0 JOB.yaml [distffn run options...]}; shift
ip link set lo up 2>/dev/null || true
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}
export RAY_AUTH_TOKEN
SESSION=$(mktemp -d /tmp/distffn-ray.XXXXXX)
NODES=()

stop_nodes() {
    local pgid alive i
    for pgid in "${NODES[@]}"; do kill -TERM -- "-$pgid" 2>/dev/null || true; done
    for ((i = 0; i < ${STOP_GRACE_S:-10} * 10; i++)); do
        alive=0
        for pgid in "${NODES[@]}"; do kill -0 -- "-$pgid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pgid in "${NODES[@]}"; do kill -KILL -- "-$pgid" 2>/dev/null || true; done
    rm -rf "$SESSION"
}
trap stop_nodes EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

start_node() {   # LOG ARGS...: one `ray start --block` in a session of its own, up when its log says so
    local log=$1; shift
    setsid ray start --block --disable-usage-stats "$@" >"$log" 2>&1 &
    NODES+=("$!")
    for ((i = 0; i < 600; i++)); do
        grep -q "Ray runtime started" "$log" 2>/dev/null && return 0
        kill -0 "$!" 2>/dev/null || { cat "$log" >&2; return 1; }
        sleep 0.1
    done
    echo "ray start did not come up within 60 s:" >&2; cat "$log" >&2; return 1
}

start_node "$SESSION/head.log" --head --port=0 --num-cpus="${HEAD_CPUS:-1}" --include-dashboard=false \
    --temp-dir="$SESSION"
ADDRESS=$(cat "$SESSION/ray_current_cluster")
start_node "$SESSION/node.log" --address="$ADDRESS" --num-cpus="${NODE_CPUS:-1}"
echo "two-node Ray cluster at $ADDRESS"
echo "node sessions: ${NODES[*]}"
distffn run "$JOB" --set scaling.backend=ray --set scaling.num_workers="${NUM_WORKERS:-2}" \
    --set scaling.address="$ADDRESS" --set scaling.interface=lo "$@"
