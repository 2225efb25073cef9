"""Wide-area DNS-SD (issue 11): a server on one subnet registers itself by
TSIG-signed DNS UPDATE in a zone of a real BIND 9, and a client on another
subnet, routed through a third namespace where multicast does not reach,
finds and uses it through unicast DNS; a wrong key is refused with one
line; a stopped server's records go."""

import os
import re
import shutil
import subprocess
import time

import pytest
from hardening_helpers import stand_in_program, write_named_conf, write_tsig_key
from netns import TestNetwork, skip_reason
from shared import CLIENT, PYTHON, SERVER, make_sandbox, start_server, stop_pid, wait_until

pytestmark = pytest.mark.integration

ZONE = "fleet.test"
KEY_NAME = "stap-update"


@pytest.fixture
def fleet(krel):
    """(A, B, router, key file, sandbox): BIND 9 on the router serves ZONE,
    updatable with the key; B's resolver is the router, its search domain
    ZONE, and the sandbox's configuration browses the search domains."""
    if os.geteuid() != 0 or skip_reason():
        pytest.skip(skip_reason() or "needs root (network namespaces)")
    if not shutil.which("named"):
        pytest.skip("BIND 9 is not installed (tools/install-deps installs bind9)")
    with TestNetwork(routed=True) as net:
        a, b = net.hosts
        r, w = net.router, net.router.workdir
        keyfile = os.path.join(w, "update.key")
        write_tsig_key(keyfile, KEY_NAME)  # as the README says: mode 0600, the server's
        conf = write_named_conf(w, ZONE, keyfile, KEY_NAME, ["10.201.1.1", "10.201.2.1"],
                                "10.201.1.1")
        log = open(os.path.join(w, "named.log"), "w")
        r.popen(["named", "-g", "-c", conf], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: "running" in open(os.path.join(w, "named.log")).read(), 10,
                   "named did not start")
        resolv = os.path.join(b.workdir, "resolv.conf")
        with open(resolv, "w") as f:
            f.write(f"nameserver 10.201.2.1\nsearch {ZONE}\n")
        b.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)  # B's own mounts
        box = make_sandbox()
        os.makedirs(os.path.join(box.sysconfdir, "systemtap"), exist_ok=True)
        with open(os.path.join(box.sysconfdir, "systemtap", "stap-server-domains"), "w") as f:
            f.write("# the host's search domains\nsearch\n")
        try:
            yield a, b, r, keyfile, box
        finally:
            shutil.rmtree(box.top, ignore_errors=True)


def dns_update(keyfile):
    """The options that register a server in ZONE, updated with keyfile."""
    return ["--dns-update", ZONE, "--dns-server", "10.201.1.1", "--tsig-key", keyfile]


def new_log(box):
    return box.path(f"server-{time.monotonic_ns()}.log")


def start(host, box, krel, keyfile):
    """stap-start-server on host registering in the zone, which may refuse it: the run."""
    return host.run([PYTHON, SERVER, "stap-start-server", "--listen", "::", "-r", krel,
                     "--log", new_log(box), *dns_update(keyfile)], env=box.env, timeout=60)


def find(host, box, *args):
    return host.run([PYTHON, CLIENT, "stap-find-servers", "--all", *args], env=box.env)


def test_found_and_used_across_subnets_then_gone(fleet, krel):
    a, b, _, keyfile, box = fleet
    pid = start_server(box, krel, None, *dns_update(keyfile), netns=a, log=new_log(box)).pid
    try:
        found = wait_until(lambda: [l for l in find(b, box).stdout.splitlines()
                                    if "10.201.1.2" in l], 10, "not found over DNS")
        print(f"B sees: {found[0]}")
        host, address, port, rest = found[0].split(" ", 3)
        assert host == f"stap-host-a.{ZONE}" and address == "10.201.1.2"
        assert rest.startswith(f"'sysinfo={krel} x86_64'") and "'certinfo=" in rest
        # multicast does not cross the router: without DNS, B finds nothing
        proc = b.run([PYTHON, CLIENT, "stap-find-servers", "--all"],
                     env={**box.env, "STAP_SYSCONFDIR": box.path("empty-etc")})
        assert proc.returncode == 1 and "10.201.1.2" not in proc.stdout
        # the explicit option does the same as the configuration file
        proc = b.run([PYTHON, CLIENT, "stap-find-servers", "--all", f"--domain={ZONE}"],
                     env={**box.env, "STAP_SYSCONFDIR": box.path("empty-etc")})
        assert "10.201.1.2" in proc.stdout, proc.stdout + proc.stderr
        # a client on B compiles through it, found in DNS
        proc = b.run([PYTHON, CLIENT, "stap-client", "-r", krel, "-p2", "-e",
                      "probe begin { exit() }"], env=box.env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "begin" in proc.stdout
    finally:
        stop_pid(pid)
    wait_until(lambda: "10.201.1.2" not in find(b, box).stdout, 10,
               "a stopped server's records stayed in the zone")


def test_a_wrong_key_is_refused_in_one_line(fleet, krel):
    a, _, _, keyfile, box = fleet
    wrong = box.path("wrong.key")
    write_tsig_key(wrong, KEY_NAME)
    proc = start(a, box, krel, wrong)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    print(err)
    assert len(err.splitlines()) == 1, err
    assert re.match(rf"stap-start-server: ERROR: DNS UPDATE of {ZONE}\. at 10\.201\.1\.1", err), err
    assert "BADSIG" in err or "BadSignature" in err or "NOTAUTH" in err, err


def zone_hint(host, box):
    """The load fields of A's server as B reads them from the zone."""
    for line in find(host, box).stdout.splitlines():
        if "10.201.1.2" in line:
            return dict(re.findall(r"'(slots|busy|queued)=([^']*)'", line))
    return {}


def test_the_zone_follows_the_load(fleet, krel):
    """The load hint in the zone is refreshed by DNS UPDATE as the queue
    grows and drains, as on the link (here the link is not advertised)."""
    a, b, _, keyfile, box = fleet
    slow = stand_in_program(box, "stap_slow.sh")
    srv = start_server(box, krel, None, *dns_update(keyfile), "--max-threads", "1",
                       "--load-refresh", "1", env={"SYSTEMTAP_STAP": slow},
                       netns=a, advertise="none", log=new_log(box))
    try:
        idle = {"slots": "1", "busy": "0", "queued": "0"}
        wait_until(lambda: zone_hint(b, box) == idle, 10, "not registered with its load")
        clients = [a.popen([PYTHON, CLIENT, "stap-client", f"--server=127.0.0.1:{srv.port}",
                            "-r", krel, "-p2", "-e",
                            f"probe begin {{ /* SLOWPROBE 4 s, client {n} */ }}"],
                           env=box.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for n in range(2)]
        busy = wait_until(lambda: zone_hint(b, box).get("queued") == "1" and zone_hint(b, box),
                          6, "the zone never showed the queue")
        print(f"zone's load hint while busy: {busy}")
        for c in clients:
            c.wait(30)
        wait_until(lambda: zone_hint(b, box) == idle, 10, "the zone never went back to idle")
    finally:
        srv.stop()
