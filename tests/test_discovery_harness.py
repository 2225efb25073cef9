"""Tests of DNS-SD discovery (browse and advertise) on the namespace network.

Host A advertises, host B browses, with an avahi daemon on both, on one, or
on neither; plus the real systemtap client listing our advertisement.
Tests that build namespaces need root and skip otherwise.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netns import TestNetwork, avahi_skip_reason, skip_reason  # noqa: E402
from shared import ROOT, program, wait_until  # noqa: E402

PYTHON = "/usr/bin/python3"        # has dnspython (python3-dnspython)


def load_discovery():
    """The browsing side in this process (for the pure functions)."""
    sys.path.insert(0, ROOT)
    import stap_client
    return stap_client


discovery = load_discovery()

THIS_SYSINFO = discovery.local_sysinfo()     # namespaces share the kernel
OTHER_SYSINFO = "6.1.0-99-amd64 x86_64"
CERTINFO = "1a:2b:3c:4d"


class Advertisement:
    """The first of LINK_PUBLISHERS that publishes, in a child process inside a host."""

    def __init__(self, host, port, sysinfos, version="4.8"):
        cfg = {"port": port, "sysinfos": sysinfos, "version": version,
               "certinfo": CERTINFO, "optinfo": ""}
        self.proc = host.popen([PYTHON, program("advertise"), ROOT, json.dumps(cfg)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"advertiser failed: {self.proc.stderr.read()}")
        info = json.loads(line)
        self.mode, self.names = info["mode"], info["names"]
        print(f'advertise on {host.hostname}: {self.mode} {self.names} '
              f'in {info["seconds"]:.2f} s')

    def stop(self):
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(10)
        assert "stopped" in out, self.proc.stderr.read()


def find(host, **args):
    """find_servers() run on host; prints and returns its answer."""
    r = host.run([PYTHON, program("find_servers"), ROOT, json.dumps(args)], timeout=30)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    print(f'find_servers({args}) on {host.hostname}: '
          f'{answer["seconds"]:.3f} s, {len(answer["records"])} found')
    for line in answer["lines"]:
        print("   ", line)
    return answer


def ipv4(records):
    """One record per instance: a server is also listed at its IPv6 addresses."""
    return [r for r in records if ":" not in r["address"]]


def needs(avahi):
    reason = avahi_skip_reason() if avahi else skip_reason()
    if reason:
        pytest.skip(reason)


AVAHI_CASES = {"avahi-both": (True, True), "avahi-only-a": (True, False),
               "avahi-only-b": (False, True), "avahi-neither": (False, False)}


# --- pure functions (no root needed) ---------------------------------------

def test_parse_avahi_browse_output():
    text = (
        '+;veth0;IPv4;Systemtap\\032Compile\\032Server\\032on\\032h;_stap._tcp;local\n'
        '=;veth0;IPv4;Systemtap\\032Compile\\032Server\\032on\\032h;_stap._tcp;local;'
        'h.local;10.0.0.1;4242;"optinfo=" "certinfo=aa:bb" "version=4.8" '
        '"sysinfo=6.1.0-9-amd64 x86_64"\n'
        '=;eth1;IPv4;Systemtap\\032Compile\\032Server\\032on\\032h;_stap._tcp;local;'
        'h.local;10.0.0.1;4242;"optinfo=" "certinfo=aa:bb" "version=4.8" '
        '"sysinfo=6.1.0-9-amd64 x86_64"\n'
        '=;veth0;IPv6;a\\.b\\\\c;_stap._tcp;local;h.local;fe80::1;4243;"sysinfo=x y"\n'
        # an IPv6 address resolved over IPv4 still needs its scope
        '=;eth1;IPv4;a\\.b\\\\c;_stap._tcp;local;h.local;fe80::2;4243;"sysinfo=x y"\n')
    records = discovery.unique_records(discovery.parse_avahi_browse(text))
    assert len(records) == 3
    first, second, third = records
    assert third.address == "fe80::2%eth1"
    assert first.name == "Systemtap Compile Server on h"
    assert (first.host, first.address, first.port) == ("h.local", "10.0.0.1", 4242)
    assert first.sysinfo == "6.1.0-9-amd64 x86_64"
    assert first.version == "4.8" and first.certinfo == "aa:bb"
    assert first.txt["optinfo"] == ""
    assert second.name == "a.b\\c" and second.address == "fe80::1%veth0"
    assert discovery.format_server_line(first) == (
        "h.local 10.0.0.1 4242 'sysinfo=6.1.0-9-amd64 x86_64' 'version=4.8' "
        "'certinfo=aa:bb' 'optinfo='")


def test_unescape_and_alternative_names():
    assert discovery.unescape_avahi_label("A\\032B\\038\\.") == "A B&."
    import stap_server
    assert stap_server.alternative_name("X") == "X #2"
    assert stap_server.alternative_name("X #2") == "X #3"


def test_mdns_wire_class_bits():
    import dns.rdatatype
    q = discovery.mdns_query([(discovery.service_name(), dns.rdatatype.PTR)])
    qu = q[:-2] + b"\x80\x01"                 # set the QU bit
    message, unicast = discovery.parse_mdns(qu)
    assert unicast == [True]
    assert message.question[0].rdclass == 1
    assert discovery.parse_mdns(b"garbage") == (None, [])


# --- on the namespace network ------------------------------------------------

@pytest.mark.parametrize("case", list(AVAHI_CASES))
def test_advertise_on_a_find_on_b(case):
    avahi = AVAHI_CASES[case]
    needs(any(avahi))
    with TestNetwork(avahi=avahi) as net:
        a, b = net.hosts
        adv = Advertisement(a, 4242, [THIS_SYSINFO])
        assert adv.mode == ("avahi" if avahi[0] else "mdns")
        answer = find(b, all_servers=True)
        # avahi also publishes the host's link-local IPv6 address (over
        # IPv4 too); such records must carry their interface as scope.
        records = [r for r in answer["records"] if ":" not in r["address"]]
        assert len(records) == 1, net.logs()
        assert all("%" in r["address"] for r in answer["records"]
                   if r["address"].startswith("fe80:"))
        rec = records[0]
        assert rec["host"] == "stap-host-a.local"
        assert rec["address"] == "10.200.0.1"
        assert rec["port"] == 4242
        assert rec["sysinfo"] == THIS_SYSINFO
        assert rec["version"] == "4.8" and rec["certinfo"] == CERTINFO
        assert rec["name"] == "Systemtap Compile Server on stap-host-a"
        assert answer["lines"][0].startswith(
            f"stap-host-a.local 10.200.0.1 4242 'sysinfo={THIS_SYSINFO}'")
        assert answer["seconds"] < 1.5
        adv.stop()


@pytest.mark.parametrize("case", ["avahi-both", "avahi-neither"])
def test_compatible_filter(case):
    avahi = AVAHI_CASES[case]
    needs(any(avahi))
    with TestNetwork(avahi=avahi) as net:
        a, b = net.hosts
        adv = Advertisement(a, 4242, [THIS_SYSINFO, OTHER_SYSINFO])
        assert len(set(adv.names)) == 2
        everything = ipv4(find(b, all_servers=True)["records"])
        assert sorted(r["sysinfo"] for r in everything) == sorted(
            [THIS_SYSINFO, OTHER_SYSINFO])
        compatible = ipv4(find(b)["records"])
        assert [r["sysinfo"] for r in compatible] == [THIS_SYSINFO]
        other = ipv4(find(b, sysinfo=OTHER_SYSINFO)["records"])
        assert [r["sysinfo"] for r in other] == [OTHER_SYSINFO]
        adv.stop()


@pytest.mark.parametrize("case", ["avahi-both", "avahi-neither"])
def test_two_advertisers_on_one_host(case):
    avahi = AVAHI_CASES[case]
    needs(any(avahi))
    with TestNetwork(avahi=avahi) as net:
        a, b = net.hosts
        first = Advertisement(a, 4242, [THIS_SYSINFO])
        second = Advertisement(a, 4343, [THIS_SYSINFO])
        assert first.names != second.names
        records = ipv4(find(b)["records"])
        assert sorted((r["port"], r["name"]) for r in records) == [
            (4242, first.names[0]), (4343, second.names[0])]
        second.stop()
        # The withdrawal (avahi's or our goodbye) reaches B at once.
        ports = []

        def only_the_first():
            ports[:] = [r["port"] for r in ipv4(find(b)["records"])]
            return ports == [4242]

        wait_until(only_the_first, 3, lambda: f"B still sees ports {ports}", interval=0)
        first.stop()


@pytest.mark.parametrize("avahi", [False, True], ids=["mdns", "avahi"])
def test_single_host_loopback(avahi):
    needs(avahi)
    with TestNetwork(avahi=avahi, single=True) as net:
        (host,) = net.hosts
        adv = Advertisement(host, 4242, [THIS_SYSINFO])
        records = ipv4(find(host)["records"])
        assert [(r["port"], r["host"]) for r in records] == [
            (4242, "stap-host-a.local")], net.logs()
        adv.stop()


def test_no_server_answers_quickly():
    needs(False)
    with TestNetwork(avahi=False) as net:
        answer = find(net.hosts[1], all_servers=True)
        assert answer["records"] == []
        assert answer["seconds"] < 1.5


@pytest.mark.skipif(shutil.which("stap") is None, reason="systemtap not installed")
def test_real_stap_lists_our_advertisement():
    """systemtap's own client (avahi client library) sees our server."""
    needs(True)
    with TestNetwork(avahi=True) as net:
        a, b = net.hosts
        adv = Advertisement(a, 4242, [THIS_SYSINFO, OTHER_SYSINFO])
        env = dict(os.environ, SYSTEMTAP_DIR=os.path.join(b.workdir, "stap"))
        r = b.run(["stap", "--list-servers=all"], env=env, timeout=60)
        print(r.stdout, r.stderr)
        out = r.stdout + r.stderr
        assert "10.200.0.1:4242" in out or ("10.200.0.1" in out and "4242" in out)
        assert THIS_SYSINFO in out and OTHER_SYSINFO in out
        r = b.run(["stap", "--list-servers=online,compatible"], env=env,
                  timeout=60)
        print(r.stdout, r.stderr)
        assert THIS_SYSINFO in r.stdout + r.stderr
        assert OTHER_SYSINFO not in r.stdout + r.stderr
        adv.stop()


def test_harness_cleans_up_after_a_failure():
    """Namespaces and daemons are gone even when the test body raises."""
    needs(True)
    pids = []
    with pytest.raises(RuntimeError, match="boom"), \
            TestNetwork(avahi=(True, False)) as net:
        a, b = net.hosts
        names = [h.netns for h in net.hosts]
        pids = [a.holder.pid, a.dbus.pid, a.avahi.pid, b.holder.pid,
                a.popen(["sleep", "60"]).pid]
        assert a.has_avahi and not b.has_avahi
        assert a.run(["hostname"]).stdout.strip() == "stap-host-a"
        assert b.run(["hostname"]).stdout.strip() == "stap-host-b"
        # B has no avahi: avahi-browse finds no daemon on B's own bus.
        r = b.run(["avahi-browse", "-a", "-t", "-p"], timeout=10)
        assert r.returncode != 0 and "Daemon not running" in r.stderr
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True,
                            text=True).stdout
    assert not any(name in listed for name in names)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), pid


def test_mdns_answers_carry_ipv6_addresses():
    """Without avahi our responder also answers AAAA: the server is listed at
    its IPv6 link-local address too, with the interface as its scope."""
    needs(False)
    with TestNetwork(avahi=False) as net:
        a, b = net.hosts
        adv = Advertisement(a, 4242, [THIS_SYSINFO])
        records = find(b)["records"]
        v6 = [r["address"] for r in records if ":" in r["address"]]
        assert v6 and all(x.startswith("fe80:") and "%" in x for x in v6), records
        assert [r["address"] for r in ipv4(records)] == ["10.200.0.1"]
        adv.stop()
