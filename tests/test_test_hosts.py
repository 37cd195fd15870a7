"""`cluster/test-hosts.sh`: hosts as network namespaces on a private bridge. What crosses between
two of them crosses their interfaces; nothing reaches any other network; the machine's own
network is untouched; `down` leaves no namespace and no process behind."""
from __future__ import annotations

import os
import subprocess
import time

from helpers import REPO, run_group

SCRIPT = os.path.join(REPO, "cluster", "test-hosts.sh")

SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 5000)); s.settimeout(20)
c, peer = s.accept(); data = c.recv(100); c.sendall(data[::-1]); print(peer[0])
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5000), timeout=20); c.sendall(b"hello"); print(c.recv(100).decode())
"""


def links(ns_cmd=()):
    out = run_group([*ns_cmd, "ip", "-o", "link"], timeout=10).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def namespaces() -> set:
    return {line.split()[0] for line in run_group(["ip", "netns", "list"], timeout=10).stdout.splitlines() if line}


def rx_bytes(hosts, i) -> int:
    return int(hosts.run(i, "cat", "/sys/class/net/eth0/statistics/rx_bytes").stdout)


def test_two_hosts_talk_over_their_interfaces_and_reach_nothing_else(test_hosts):
    machine_links, before = links(), namespaces()
    (h1, a1), (h2, a2) = test_hosts.make(2)
    assert [a1, a2] == ["198.18.0.1", "198.18.0.2"]
    assert links() == machine_links                       # nothing added to the machine's network
    for i, addr in ((1, a1), (2, a2)):
        r = test_hosts.run(i, "ip", "-o", "-4", "addr")
        assert sorted(line.split()[1] + " " + line.split()[3] for line in r.stdout.splitlines()) == \
            ["eth0 " + addr + "/24", "lo 127.0.0.1/8"]
        routes = test_hosts.run(i, "ip", "route").stdout.splitlines()
        assert routes == [f"198.18.0.0/24 dev eth0 proto kernel scope link src {addr} "], routes
    received = rx_bytes(test_hosts, 2)
    server = test_hosts.popen(2, "python3", "-c", SERVER, a2, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(100):                              # until the server listens
            r = test_hosts.run(1, "python3", "-c", CLIENT, a2)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        assert r.stdout.strip() == "olleh", r.stderr
        assert server.communicate(timeout=20)[0].strip() == a1     # it came from host 1's address
    finally:
        if server.poll() is None:
            server.kill()
    assert rx_bytes(test_hosts, 2) > received             # over host 2's eth0, not a loopback
    outside = test_hosts.run(1, "python3", "-c", "import socket; socket.create_connection(('192.0.2.1', 9), timeout=2)")
    assert outside.returncode != 0 and "Network is unreachable" in outside.stderr
    made = namespaces() - before
    assert len(made) == 3 and {h1, h2} < made             # two hosts and their bridge's hub


def test_hosts_share_no_memory_and_have_names_of_their_own(test_hosts):
    (h1, _), (h2, _) = test_hosts.make(2)
    assert [test_hosts.run(i, "hostname").stdout.strip() for i in (1, 2)] == [h1, h2]
    assert test_hosts.run(1, "sh", "-c", "echo x > /dev/shm/distffn-probe").returncode == 0
    assert test_hosts.run(1, "cat", "/dev/shm/distffn-probe").stdout == "x\n"
    assert test_hosts.run(2, "cat", "/dev/shm/distffn-probe").returncode != 0     # host 2's own /dev/shm
    assert not os.path.exists("/dev/shm/distffn-probe")                           # nor the machine's


def test_down_ends_the_hosts_processes_and_removes_every_namespace(test_hosts):
    before = namespaces()
    test_hosts.make(2)
    sleeper = test_hosts.popen(2, "sleep", "300")
    time.sleep(0.5)
    assert "(1 processes)" in run_group([SCRIPT, "status", str(test_hosts.state_dir)],
                                         timeout=10).stdout
    down = run_group([SCRIPT, "down", str(test_hosts.state_dir)], timeout=60)
    assert down.returncode == 0, down.stderr
    assert sleeper.wait(10) != 0                          # ended by down, by pid
    assert namespaces() == before
    assert not test_hosts.state_dir.exists()


def test_addresses_outside_the_benchmarking_range_are_refused(tmp_path):
    for subnet in ("10.0.0", "192.168.1", "198.20.0", "198.18.300"):
        r = run_group([SCRIPT, "up", "2", str(tmp_path / subnet)], timeout=10,
                      env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOSTS_SUBNET": subnet})
        assert r.returncode == 2 and "198.18.0.0/15" in r.stderr, (subnet, r.stderr)
        assert not (tmp_path / subnet).exists()
