#!/usr/bin/env bash
# A two-node Ray cluster on one machine, loopback only: `ray start --head` plus a second
# `ray start --address=...` node, then `distffn run` against it, then everything torn down.
#
#   unshare --net cluster/local-two-node.sh JOB.yaml [distffn run options...]
#
# Under `unshare --net` (root) the cluster lives in a private network namespace whose only
# interface is loopback, so Ray picks 127.0.0.1 for every node and nothing listens elsewhere.
# The nodes share a freshly generated auth token. The job's workers are placed with a SPREAD
# placement group, one per node when num_workers=2.
set -euo pipefail
JOB=${1:?usage: $0 JOB.yaml [distffn run options...]}; shift
ip link set lo up 2>/dev/null || true
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}
export RAY_AUTH_TOKEN
SESSION=$(mktemp -d /tmp/distffn-ray.XXXXXX)
cleanup() { ray stop --force >/dev/null 2>&1 || true; rm -rf "$SESSION"; }
trap cleanup EXIT
ray start --head --port=0 --num-cpus="${HEAD_CPUS:-1}" --include-dashboard=false \
    --disable-usage-stats --temp-dir="$SESSION" >"$SESSION.head.log" 2>&1 \
    || { cat "$SESSION.head.log" >&2; exit 1; }
ADDRESS=$(cat "$SESSION/ray_current_cluster")
ray start --address="$ADDRESS" --num-cpus="${NODE_CPUS:-1}" --disable-usage-stats \
    >"$SESSION.node.log" 2>&1 || { cat "$SESSION.node.log" >&2; exit 1; }
rm -f "$SESSION.head.log" "$SESSION.node.log"
echo "two-node Ray cluster at $ADDRESS"
distffn run "$JOB" --set scaling.backend=ray --set scaling.num_workers="${NUM_WORKERS:-2}" \
    --set scaling.address="$ADDRESS" "$@"
