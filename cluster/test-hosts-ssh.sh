#!/usr/bin/env bash
# An `ssh` for the test hosts of cluster/test-hosts.sh: MPICH's mpiexec (hydra) starts its proxy
# on each other host of a host file through it, as it would through ssh on a cluster.
#
#   mpiexec -f HOSTFILE -launcher ssh -launcher-exec cluster/test-hosts-ssh.sh -iface eth0 -n N CMD...
#
# Hydra calls it as `LAUNCHER [-x|-X] HOST WORD...` (its ssh launcher: X forwarding off, then
# the host file's name for the host, then the proxy's command line with the executable in
# double quotes, for the remote shell). Like ssh it runs the words, joined by spaces, with
# `sh -c` on that host: here inside test host I (`cluster/test-hosts.sh run I`), I found by
# HOST = the host's name (dfn<tag>-h<I>), its address (198.18.0.<I>) or its number I, in the
# set $HOSTS_STATE names (default /tmp/distffn-hosts). `user@HOST` is taken as HOST.
# Nothing is forwarded but what the command line carries, as with ssh: hydra passes the ranks'
# environment through its proxy, not through the launcher.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${HOSTS_STATE:-/tmp/distffn-hosts}

while [ $# -gt 0 ]; do          # ssh's options that hydra may pass (HYDRA_LAUNCHER_EXTRA_ARGS too)
    case "$1" in
        -x | -X | -n | -T | -q) shift ;;
        -o | -p | -l | -i) shift 2 ;;
        --) shift; break ;;
        -*) echo "test-hosts-ssh.sh: unknown option $1" >&2; exit 255 ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || { echo "usage: $0 [-x] HOST COMMAND..." >&2; exit 255; }
host=${1#*@}
shift
i=$(awk -v h="$host" '$1 == h || $2 == h || $3 == h {print $1; exit}' "$STATE/hosts" 2>/dev/null || true)
[ -n "$i" ] || { echo "test-hosts-ssh.sh: no test host $host in $STATE/hosts" >&2; exit 255; }
# hydra's descriptors beyond stdio (its control port's listener among them) stay here, as ssh
# would leave them: the remote side gets only stdin, stdout and stderr
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null || true
done
# exit code 255 for the launcher's own failures, as ssh
HOSTS_STATE=$STATE exec "$HERE/test-hosts.sh" run "$i" sh -c "$*"
