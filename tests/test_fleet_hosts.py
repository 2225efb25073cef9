"""A fleet on one link: each server on a host of its own (network namespaces
on one bridge, TestNetwork(hosts=N)), and a client host that finds them by
multicast DNS and spreads distinct compiles over them."""

import os
import re
import subprocess

import pytest
from netns import BRIDGED_SUBNET, TestNetwork, network_factory, skip_reason  # noqa: F401
from shared import CLIENT, PYTHON, make_sandbox, program, start_server, stop_pid, wait_until

pytestmark = pytest.mark.integration


def test_bridged_hosts_share_one_link_and_leave_nothing_behind():
    """Three namespaces on one bridge: their own addresses and names, one
    multicast domain; the namespaces and holders are gone afterwards."""
    if skip_reason():
        pytest.skip(skip_reason())
    with TestNetwork(hosts=3) as net:
        a, b, c = net.hosts
        assert [h.address for h in net.hosts] == [f"{BRIDGED_SUBNET}.{i}" for i in (1, 2, 3)]
        assert [h.run(["hostname"]).stdout.strip() for h in net.hosts] == [
            "stap-host-a", "stap-host-b", "stap-host-c"]
        inodes = {os.stat(f"/proc/{h.holder.pid}/ns/net").st_ino for h in net.hosts}
        assert len(inodes) == 3
        ports = net.switch.run(["ip", "-br", "link", "show", "master", "br0"]).stdout
        assert sorted(re.findall(r"^(port-\w)@", ports, re.M)) == ["port-a", "port-b", "port-c"]
        # A datagram to the mDNS group from C reaches A and B.
        receivers = [h.popen([PYTHON, program("mdns_listen"), h.address], stdout=subprocess.PIPE,
                             text=True) for h in (a, b)]
        for r in receivers:
            assert r.stdout.readline().strip() == "joined"
        assert c.run([PYTHON, program("mdns_send")]).returncode == 0
        assert [r.communicate(timeout=15)[0].strip() for r in receivers] == [c.address] * 2
        names = [h.netns for h in net.hosts + [net.switch]]
        holders = [h.holder.pid for h in net.hosts]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), listed
    assert not any(os.path.exists(f"/proc/{pid}") for pid in holders)


def start_on(host, box, krel, cache_dir):
    """Our server on host (all its addresses, multicast DNS, one compile
    slot): (pid, status)."""
    srv = start_server(box, krel, None, "--max-threads", "1", cache=cache_dir, netns=host,
                       advertise="mdns", log=box.path(f"{host.hostname}.log"))
    return srv.pid, srv.status


def test_compiles_by_discovery_spread_over_servers_on_two_hosts(network_factory,  # noqa: F811
                                                                 krel, cache_dir):
    net = network_factory(hosts=3)
    a, b, c = net.hosts
    box = make_sandbox()
    servers = []
    try:
        for host in (a, b):  # one after the other: the first makes the shared certificate
            servers.append((host, *start_on(host, box, krel, cache_dir)))
        last = []

        def both_listed():
            proc = c.run([PYTHON, CLIENT, "stap-find-servers", "--all"], env=box.env)
            last[:] = [proc]
            return all(f".local {host.address} {status['port']} " in proc.stdout
                       for host, _, status in servers)

        wait_until(both_listed, 15, lambda: f"not both listed on C: {last[0].stdout!r} "
                   f"{last[0].stderr!r}", interval=0.3)
        lines = [l for l in last[0].stdout.splitlines() if ":" not in l.split(" ")[1]]
        print("stap-find-servers --all on C:", *lines, sep="\n    ")
        # Each server is listed at its own host's address only, under its host's name.
        for host, _, status in servers:
            mine = [l for l in lines if f" {status['port']} " in l and
                    "'certinfo=" in l and l.startswith(f"{host.hostname}.local ")]
            assert [l.split(" ")[1] for l in mine] == [host.address], lines

        # Distinct -p2 compiles from C, no --server: until both servers have
        # served some (rendezvous hashing puts each on either with even odds).
        served = {host.hostname: 0 for host, _, _ in servers}
        for n in range(16):
            if n >= 4 and all(served.values()):
                break
            script = f"probe begin {{ /* fleet {n} */ exit() }}"
            proc = c.run([PYTHON, CLIENT, "stap-client", "-r", krel, "-p2", "-e", script],
                         env=box.env, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert "begin" in proc.stdout
            where = [host for host, _, status in servers
                     if f"fleet {n} " in open(status["log"]).read()]
            assert len(where) == 1, [h.hostname for h in where]
            served[where[0].hostname] += 1
        print(f"requests per server: {served}")
        assert all(served.values()), served
        for host, _, status in servers:
            requests = [l for l in open(status["log"]) if " request client=" in l]
            assert len(requests) == served[host.hostname]
            assert all(c.address in l and "rc=0" in l for l in requests), requests
    finally:
        stop_pid(*[pid for _, pid, _ in servers])
