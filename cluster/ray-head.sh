#!/usr/bin/env bash
# A Ray head for `distffn submit --cluster cluster/ray-local.yaml`: token authentication on, the
# dashboard and its job server on 127.0.0.1 unless told otherwise.
#
#   cluster/ray-head.sh up [STATE_DIR]       start it (default STATE_DIR: /tmp/distffn-ray-head)
#   cluster/ray-head.sh down [STATE_DIR]     stop exactly the processes it started
#   cluster/ray-head.sh status [STATE_DIR]   say whether it runs, and where
#
# Settings (environment): RAY_HEAD_HOST (127.0.0.1: what the GCS and the job server bind to; a
# real head names its private address), RAY_DASHBOARD_PORT (8265), RAY_HEAD_PORT (6379),
# RAY_AGENT_PORT (52365), START_TIMEOUT_S (90),
# RAY_HEAD_CPUS (all), RAY_AUTH_TOKEN (default: the one in STATE_DIR/auth_token, generated once).
#
# Why token auth: an open job API runs any code that reaches it as the head's user (ShadowRay,
# CVE-2023-48022). The token lives in STATE_DIR/auth_token (mode 600); clients read it from
# RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray does.
#
# The head runs as `ray start --block` in a process session of its own; `down` ends that session
# (SIGTERM, then SIGKILL after STOP_GRACE_S): never `ray stop`, which ends every Ray process of
# every user on the machine.
set -euo pipefail
ACTION=${1:-}
STATE=${2:-${TMPDIR:-/tmp}/distffn-ray-head}
HOST=${RAY_HEAD_HOST:-127.0.0.1}
DASH_PORT=${RAY_DASHBOARD_PORT:-8265}
GCS_PORT=${RAY_HEAD_PORT:-6379}
AGENT_PORT=${RAY_AGENT_PORT:-52365}   # the head's dashboard agent, which runs submitted jobs
PIDFILE=$STATE/head.pgid

running() { [ -f "$PIDFILE" ] && kill -0 -- "-$(cat "$PIDFILE")" 2>/dev/null; }

up() {
    if running; then
        echo "Ray head already running (session $(cat "$PIDFILE")); job server at http://$HOST:$DASH_PORT"
        return 0
    fi
    local port
    for port in "$GCS_PORT" "$DASH_PORT" "$AGENT_PORT"; do
        if ! python3 -c 'import socket, sys; socket.create_server((sys.argv[1], int(sys.argv[2]))).close()' \
                "$HOST" "$port" 2>/dev/null; then
            echo "ray-head.sh: $HOST:$port is in use (another Ray?); choose RAY_HEAD_PORT / RAY_DASHBOARD_PORT" >&2
            exit 2
        fi
    done
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    # Ray's own temp folder: short, since its unix sockets live there (at most 107 bytes a path)
    local temp
    temp=$(mktemp -d /tmp/ray-head.XXXXXX)
    echo "$temp" >"$STATE/ray_temp_dir"
    local token_file=$STATE/auth_token
    if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
        (umask 077; printf '%s\n' "$RAY_AUTH_TOKEN" >"$token_file")
    elif [ ! -s "$token_file" ]; then
        (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$token_file")
    fi
    local ray_bin
    ray_bin=$(command -v ray) || { echo "ray-head.sh: no 'ray' on PATH; pip install -e \".[cluster]\"" >&2; exit 2; }
    # `distffn stop` and `ray job stop` send SIGTERM; give the run time to write its checkpoint
    export RAY_JOB_STOP_WAIT_TIME_S=${RAY_JOB_STOP_WAIT_TIME_S:-30}
    # on loopback Ray must be told it is a one-machine cluster, or it rewrites 127.0.0.1 to the
    # host's outward address and binds there
    case "$HOST" in 127.*|localhost) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ;; esac
    # a session of its own, so `down` can end the head and everything it started, and nothing else
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file RAY_USAGE_STATS_ENABLED=0 \
        setsid "$ray_bin" start --head --block --disable-usage-stats \
        --node-ip-address="$HOST" --port="$GCS_PORT" \
        --dashboard-host="$HOST" --dashboard-port="$DASH_PORT" --include-dashboard=true \
        --dashboard-agent-listen-port="$AGENT_PORT" \
        ${RAY_HEAD_CPUS:+--num-cpus="$RAY_HEAD_CPUS"} \
        --temp-dir="$temp" >"$STATE/head.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    # up when the job server and the agent that runs its jobs both answer (on a busy machine the
    # agent can take a minute more than the job server; a job submitted before gets "No
    # available agent")
    for ((i = 0; i < ${START_TIMEOUT_S:-90} * 5; i++)); do
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            echo "ray-head.sh: the head exited while starting; its log:" >&2
            tail -n 30 "$STATE/head.log" >&2
            exit 1
        fi
        if python3 - "$HOST" "$DASH_PORT" "$AGENT_PORT" "$token_file" <<'EOF' 2>/dev/null; then
import sys, urllib.error, urllib.request
host, port, agent_port, token_file = sys.argv[1:]
headers = {"Authorization": f"Bearer {open(token_file).read().strip()}"}
urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/api/version", headers=headers), timeout=2)
try:                                    # any answer of the agent's will do (it may want its own auth)
    urllib.request.urlopen(f"http://{host}:{agent_port}/api/local_raylet_healthz", timeout=2)
except urllib.error.HTTPError:
    pass
EOF
            echo "Ray head up (session $(cat "$PIDFILE")): GCS $HOST:$GCS_PORT, job server http://$HOST:$DASH_PORT"
            echo "token: $token_file; clients use it with"
            echo "  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file"
            return 0
        fi
        sleep 0.2
    done
    echo "ray-head.sh: the job server did not answer at http://$HOST:$DASH_PORT within ${START_TIMEOUT_S:-90} s; log: $STATE/head.log" >&2
    down
    exit 1
}

down() {
    [ -f "$PIDFILE" ] || { echo "no Ray head of ours in $STATE"; return 0; }
    local pgid
    pgid=$(cat "$PIDFILE")
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for ((i = 0; i < ${STOP_GRACE_S:-15} * 10; i++)); do
        kill -0 -- "-$pgid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    rm -f "$PIDFILE"
    if [ -f "$STATE/ray_temp_dir" ]; then rm -rf "$(cat "$STATE/ray_temp_dir")" "$STATE/ray_temp_dir"; fi
    echo "Ray head stopped (session $pgid)"
}

case "$ACTION" in
    up) up ;;
    down) down ;;
    status)
        if running; then echo "running (session $(cat "$PIDFILE")): job server http://$HOST:$DASH_PORT"
        else echo "not running"; exit 3; fi ;;
    *) echo "usage: $0 up|down|status [STATE_DIR]" >&2; exit 2 ;;
esac
