#!/usr/bin/env bash
# A SLURM cluster on this machine, for trying `distffn submit` and for tests: one node by
# default, or several hosts that share this filesystem (test hosts: cluster/test-hosts.sh).
#
#   cluster/slurm/local-cluster.sh up|down|status [STATE_DIR]
#
# Everything lives in STATE_DIR (default ${TMPDIR:-/tmp}/distffn-slurm): munge key, socket and
# seed; slurm.conf; pid files, logs, spool and state of munged, slurmctld and slurmd. Nothing is
# read from or written to /etc/slurm, /etc/munge, /run or /var. Clients find the cluster through
#
#   export SLURM_CONF=STATE_DIR/slurm.conf
#
# Runs as root (SlurmUser=root), without systemd or cgroups (proctrack/linuxproc, task/none), one
# partition `debug`, cons_tres/CR_Core so jobs share the node by core, no accounting (no
# slurmdbd: sacct has nothing to say), MinJobAge=3600 so finished jobs stay visible to
# `scontrol show job` for an hour.
#
# Environment (all optional): DISTFFN_SLURMCTLD_PORT (default 16817), DISTFFN_SLURMD_PORT
# (16818), DISTFFN_SRUN_PORTS (16820-16899), DISTFFN_SLURM_KILLWAIT (30 s between the SIGTERM
# and the SIGKILL of a cancelled job), DISTFFN_SLURM_UP_TIMEOUT (30 s), DISTFFN_SLURM_STOP_GRACE
# (10 s per daemon before SIGKILL), DISTFFN_SLURM_NODENAME (one node: default `hostname -s`),
# DISTFFN_SLURM_CRED_EXPIRE (30 s: how long a requeued job waits before it may start again).
#
# Several nodes: DISTFFN_SLURM_NODES="NAME=ADDRESS NAME=ADDRESS ..." names each node by its
# hostname and the address its daemons bind and are reached at; the first also runs slurmctld.
# DISTFFN_SLURM_ON is a command prefix that runs a command on node I, %i in it standing for I
# (1, 2, ... in the order of the list), e.g. for test hosts made by `cluster/test-hosts.sh up 2`:
#
#   HOSTS_STATE=/tmp/distffn-hosts DISTFFN_SLURM_ON="cluster/test-hosts.sh run %i" \
#   DISTFFN_SLURM_NODES="dfn123456-h1=198.18.0.1 dfn123456-h2=198.18.0.2" cluster/slurm/local-cluster.sh up
#
# slurmctld and each slurmd are started on their node through that prefix; munged runs here, its
# socket in STATE_DIR reached from every node (the filesystem is shared, and a Unix socket's
# path works across network namespaces). SLURM's clients (sbatch, squeue, distffn submit) must
# run where the first node's address is reachable: `down` and `status` run theirs on node 1.
# Each node's hostname must resolve to its address on every node (/etc/hosts, DNS), as on any
# cluster: with NoInAddrAny, srun and slurmstepd bind the address their hostname resolves to.
# The daemons' pids must be visible here (namespaces, not other machines): `down` stops them by
# their pid files, each slurmd's named slurmd-NAME.pid.
#
# `down` cancels this cluster's jobs, then stops exactly the daemons named in its pid files
# (SIGTERM, SIGKILL after the grace), and any slurmstepd this slurmd left behind (recognised by
# SLURM_CONF=STATE_DIR/slurm.conf in its environment) with its job's processes; never by process
# name. STATE_DIR is kept (job ids continue on the next `up`); delete it to start afresh.
set -euo pipefail

CMD=${1:-}
STATE=${2:-${TMPDIR:-/tmp}/distffn-slurm}
case "$CMD" in up | down | status) ;; *)
    echo "usage: $0 up|down|status [STATE_DIR]" >&2; exit 2 ;;
esac
if [ "$CMD" != up ] && [ ! -d "$STATE" ]; then
    echo "no cluster in $STATE (nothing to do)"
    [ "$CMD" = status ] && exit 3
    exit 0
fi
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd -P)        # absolute: it goes into slurm.conf and daemon command lines

CTLD_PORT=${DISTFFN_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${DISTFFN_SLURMD_PORT:-16818}
SRUN_PORTS=${DISTFFN_SRUN_PORTS:-16820-16899}
KILLWAIT=${DISTFFN_SLURM_KILLWAIT:-30}
CRED_EXPIRE=${DISTFFN_SLURM_CRED_EXPIRE:-30}
UP_TIMEOUT=${DISTFFN_SLURM_UP_TIMEOUT:-30}
STOP_GRACE=${DISTFFN_SLURM_STOP_GRACE:-10}
HOST=$(hostname -s)                   # slurmctld only runs where SlurmctldHost is this name
NODE=${DISTFFN_SLURM_NODENAME:-$HOST}
ON=${DISTFFN_SLURM_ON:-}
MULTI=${DISTFFN_SLURM_NODES:-}
NAMES=() ADDRS=()
if [ -n "$MULTI" ]; then
    for pair in $MULTI; do
        if ! [[ "$pair" =~ ^([A-Za-z0-9][A-Za-z0-9._-]*)=([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)$ ]]; then
            echo "error: DISTFFN_SLURM_NODES: expected NAME=ADDRESS pairs (IPv4), got '$pair'" >&2
            exit 2
        fi
        NAMES+=("${BASH_REMATCH[1]}") ADDRS+=("${BASH_REMATCH[2]}")
    done
    CTLD_HOST=${NAMES[0]} CTLD_ADDR=${ADDRS[0]}
    SLURMDS=("${NAMES[@]/#/slurmd-}")         # their pid files: run/slurmd-NAME.pid
else
    NAMES=("$NODE") ADDRS=(127.0.0.1)
    CTLD_HOST=$HOST CTLD_ADDR=127.0.0.1
    SLURMDS=(slurmd)
fi
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
# Clients and daemons read this; slurmd also hands exactly this SLURM_CONF to every slurmstepd
# (its only environment), which is how `down` recognises our leftover slurmstepd processes.
export SLURM_CONF=$CONF

pidfile() { echo "$STATE/run/$1.pid"; }

# Run a command on node $1 (1, 2, ...): through DISTFFN_SLURM_ON, or here without it.
on() {
    local i=$1 prefix
    shift
    [ -n "$ON" ] || { "$@"; return; }
    IFS=" " read -ra prefix <<< "${ON//%i/$i}"
    "${prefix[@]}" "$@"
}

# The pid in $1's pid file when that process is alive AND is ours: the right program, with our
# STATE_DIR on its command line (a stale pid file must never make us signal a stranger).
our_pid() {
    local name=$1 f pid
    f=$(pidfile "$name")
    [ -s "$f" ] || return 1
    pid=$(tr -dc 0-9 < "$f")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name%%-*}" ] || return 1     # slurmd-NAME: slurmd
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$STATE/" || return 1
    echo "$pid"
}

running() { our_pid "$1" > /dev/null; }

# SIGTERM the pids given (nothing else), wait up to STOP_GRACE s, then SIGKILL those still alive.
stop_pids() {
    local what=$1 pid i alive
    shift
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < STOP_GRACE * 10; i++)); do
        alive=()
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        [ "${#alive[@]}" = 0 ] && return 0
        sleep 0.1
    done
    echo "$what (pids ${alive[*]}) ignored SIGTERM for ${STOP_GRACE}s: SIGKILL" >&2
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

# All descendants of pid $1 (a job's processes below its slurmstepd).
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

port_busy() { on "$1" ss -Htln "sport = :$2" 2>/dev/null | grep -q .; }     # on node $1

write_config() {
    local cpus mem_mb i
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # An empty plugstack.conf: otherwise slurmd/srun read /etc/slurm/plugstack.conf.
    : > "$STATE/plugstack.conf"
    cat > "$CONF" <<EOF
# Written by cluster/slurm/local-cluster.sh: a ${#NAMES[@]}-node cluster in $STATE.
ClusterName=distffn
# The controller: this machine on loopback, or the first node at its address.
SlurmctldHost=$CTLD_HOST($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SrunPortRange=$SRUN_PORTS
# Bind to the node's own address instead of 0.0.0.0.
# NoCtldInAddrAny: slurmctld; NoInAddrAny: slurmd, slurmstepd, srun.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged's socket, not /run/munge/munge.socket.2 (used by auth and cred alike).
# cred_expire also delays a requeued job's restart (default 120 s; BeginTime=now+cred_expire).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd${MULTI:+/%n}
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$STATE/run/slurmd${MULTI:+-%n}.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd${MULTI:+-%n}.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE/plugstack.conf
# No systemd, no delegated cgroup in a container: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# No mail here (the default /bin/mail is absent and slurmctld logs an error about it).
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (default 60/30 s): a requeued job restarts promptly.
SchedulerParameters=sched_interval=5,bf_interval=5
# Cores are the unit of allocation: two 1-core jobs run side by side on a 2-core node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the node line below, not slurmd's hardware probe (a container's view may differ).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Finished jobs stay in slurmctld's memory (scontrol show job) for an hour.
MinJobAge=3600
# Seconds between a cancelled job's SIGTERM and its SIGKILL.
KillWait=$KILLWAIT
EOF
    if [ -z "$MULTI" ]; then
        echo "NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    else     # each host is told this machine's cores and memory (they share them)
        for i in "${!NAMES[@]}"; do
            echo "NodeName=${NAMES[i]} NodeAddr=${ADDRS[i]} CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        done
    fi >> "$CONF"
    local IFS=,
    echo "PartitionName=debug Nodes=${NAMES[*]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$CONF"
    # A node in a network namespace may see no cgroup filesystem (`ip netns exec` mounts a fresh
    # /sys), where slurmd's detection of the cgroup version fails; nothing here uses cgroups
    # (proctrack/linuxproc, task/none), so name the version instead of detecting it.
    if [ -n "$MULTI" ]; then echo "CgroupPlugin=cgroup/v1" > "$STATE/cgroup.conf"; else rm -f "$STATE/cgroup.conf"; fi
}

start_munged() {
    local key=$STATE/munge/munge.key
    if [ ! -s "$key" ]; then
        # 1 KiB of randomness, readable by root only (munged refuses a key others can read).
        ( umask 077; head -c 1024 /dev/urandom > "$key" )
    fi
    munged --socket="$MUNGE_SOCKET" --key-file="$key" --pid-file="$(pidfile munged)" \
        --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed"
}

# Ready = the slurmd started at or after $2 (local time, as slurm prints it) on node $1 has
# registered and the node is usable. A restarted slurmctld may report the node idle from its
# saved state before slurmd is back; sinfo's idle* (not responding), idle~, drain... do not count.
# Bounded by UP_TIMEOUT from $3 (seconds since the epoch), a deadline all nodes share.
wait_idle() {
    local node=$1 since=$2 t0=$3 state="" started=""
    while (($(date +%s) - t0 < UP_TIMEOUT)); do
        state=$(on 1 sinfo -h -n "$node" -o %T 2>/dev/null || true)
        started=$(on 1 scontrol show node -o "$node" 2>/dev/null | grep -oP 'SlurmdStartTime=\K\S+' || true)
        if [[ "$started" > "$since" || "$started" == "$since" ]]; then
            case "$state" in idle | mixed | allocated) return 0 ;; esac
        fi
        sleep 0.5
    done
    echo "error: node $node not idle after ${UP_TIMEOUT}s (sinfo says '${state:-nothing}');" \
         "see $STATE/log/slurmctld.log and slurmd*.log" >&2
    return 1
}

# munged here, slurmctld on node 1, a slurmd on every node, and wait for the nodes.
start_daemons() {
    local i since t0
    since=$(date +%Y-%m-%dT%H:%M:%S) t0=$(date +%s)
    start_munged && on 1 slurmctld -f "$CONF" || return 1
    for i in "${!NAMES[@]}"; do
        on $((i + 1)) slurmd -f "$CONF" -N "${NAMES[i]}" || return 1
    done
    for i in "${!NAMES[@]}"; do
        wait_idle "${NAMES[i]}" "$since" "$t0" || return 1
    done
}

# Every daemon of this cluster running ($1 = all) or any of them ($1 = any).
daemons_running() {
    local name found=0
    for name in munged slurmctld "${SLURMDS[@]}"; do
        if running "$name"; then found=1; elif [ "$1" = all ]; then return 1; fi
    done
    [ "$1" = all ] || [ "$found" = 1 ]
}

cmd_up() {
    if daemons_running all; then
        echo "already running in $STATE"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if daemons_running any; then
        echo "error: only some daemons of $STATE are running; run '$0 down $STATE' first" >&2
        return 1
    fi
    local port i
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
            echo "error: '$port' is not a TCP port" >&2   # slurm would silently wrap it
            return 1
        fi
    done
    for ((i = 1; i <= ${#NAMES[@]}; i++)); do         # slurmctld's port on node 1, slurmd's on each
        for port in $( ((i == 1)) && echo "$CTLD_PORT") "$SLURMD_PORT"; do
            if port_busy "$i" "$port"; then
                echo "error: port $port is in use${MULTI:+ on node $i}; set DISTFFN_SLURMCTLD_PORT / DISTFFN_SLURMD_PORT" >&2
                return 1
            fi
        done
    done
    # munged insists that its socket's directory (and those above it) be searchable by all but
    # writable only by its owner; the key itself is 0600.
    mkdir -p "$STATE"/{munge,run,log,ctld,slurmd}
    chmod 755 "$STATE" "$STATE/munge"
    write_config
    # All daemonise and write their pid files; -f points slurmctld and slurmd at our conf, -N
    # names the node (so NodeName need not be the hostname). A failed start stops whatever did
    # start (the logs stay in $STATE/log).
    if ! start_daemons; then
        echo "error: SLURM did not come up; stopping what started. Logs: $STATE/log/" >&2
        tail -n 5 "$STATE"/log/*.log >&2 2>/dev/null || true
        cmd_down >&2
        return 1
    fi
    local IFS=,
    echo "SLURM is up in $STATE (node${MULTI:+s} ${NAMES[*]}, partition debug, slurmctld port $CTLD_PORT)"
    echo "export SLURM_CONF=$CONF"
}

# Jobs first, while slurmctld can still cancel them properly (their slurmstepd kills the job's
# processes); bounded by KillWait plus a margin.
cancel_jobs() {
    local i jobs
    running slurmctld || return 0
    jobs=$(on 1 squeue -h -o %A 2>/dev/null || true)
    [ -n "$jobs" ] || return 0
    # shellcheck disable=SC2086 # one job id per word
    on 1 scancel $jobs 2>/dev/null || true
    for ((i = 0; i < (KILLWAIT + 10) * 2; i++)); do
        [ -z "$(on 1 squeue -h -o %A 2>/dev/null || true)" ] && return 0
        sleep 0.5
    done
    echo "warning: jobs still listed after cancel: $(on 1 squeue -h -o '%A %T' | tr '\n' ' ')" >&2
}

# slurmstepd processes this slurmd started (they carry SLURM_CONF=$CONF).
our_stepds() {
    local p pid
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
        tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF" && echo "$pid"
    done
    return 0
}

cmd_down() {
    local name names pid pids t0
    cancel_jobs
    # slurmd and slurmctld together (each takes 1-2 s to exit), munged last: they use it until
    # they are gone.
    for names in "${SLURMDS[*]} slurmctld" munged; do
        pids=()
        for name in $names; do
            pid=$(our_pid "$name") && pids+=("$pid") && echo "stopping $name (pid $pid)"
        done
        if [ "${#pids[@]}" -gt 0 ]; then
            t0=$(date +%s%N)
            stop_pids "$names" "${pids[@]}"
            echo "  stopped in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
        fi
        for name in $names; do rm -f "$(pidfile "$name")"; done
    done
    # Only when slurmctld was gone before `down` (so no cancel): a slurmstepd outlives slurmd,
    # and so do the job processes below it, which would be orphaned if it died first.
    for pid in $(our_stepds); do
        # shellcheck disable=SC2046 # one pid per word
        stop_pids "slurmstepd $pid and its job" "$pid" $(descendants "$pid")
        echo "stopped leftover slurmstepd (pid $pid) and its job's processes"
    done
}

cmd_status() {
    local name pid rc=0
    for name in munged slurmctld "${SLURMDS[@]}"; do
        if pid=$(our_pid "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: not running"; rc=3
        fi
    done
    if [ "$rc" = 0 ]; then
        local IFS=,
        on 1 sinfo -N -h -n "${NAMES[*]}" -o 'node: %N %T %C' 2>/dev/null || echo "node: ?"
        echo "export SLURM_CONF=$CONF"
    fi
    return "$rc"
}

"cmd_$CMD"
