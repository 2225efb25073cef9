"""Discovery end to end: a real server on host A, our commands on host B
(two network namespaces joined by a veth pair, each with or without its own
avahi daemon)."""

import contextlib
import json
import os
import re
import subprocess
import time

import pytest
from hardening_helpers import stand_in_program
from netns import network_factory  # noqa: F401  (a fixture)
from shared import CLIENT, PYTHON, SERVER, make_sandbox, start_server, stop_pid, wait_until

import stap_client

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def server_on(host, box, krel, runtime, cache_dir):
    """A real stap-serverd inside host (all its addresses), stopped by pid."""
    srv = start_server(box, krel, runtime, cache=cache_dir, netns=host)
    try:
        yield srv.pid, srv.status
    finally:
        srv.stop()


def find(host, box, *args):
    t = time.monotonic()
    proc = host.run([PYTHON, CLIENT, "stap-find-servers", *args], env=box.env)
    return proc, time.monotonic() - t


def wait_until_found(host, box, *args, bound=10):
    """The first stap-find-servers that finds something: (proc, seconds)."""
    last = []

    def found():
        last[:] = find(host, box, *args)
        return last[0].returncode == 0 and tuple(last)

    return wait_until(found, bound, lambda: f"nothing found within {bound} s: {last[0].stderr}",
                      interval=0.3)


@pytest.mark.parametrize("avahi", [True, False], ids=["avahi", "mdns"])
def test_find_servers_on_b_sees_server_on_a(avahi, network_factory, krel, runtime,  # noqa: F811
                                            cache_dir):
    net = network_factory(avahi=avahi)
    a, b = net.hosts
    box = make_sandbox()
    with server_on(a, box, krel, runtime, cache_dir) as (pid, status):
        proc, seconds = wait_until_found(b, box, "--all")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        mine = [l for l in lines if f" {status['port']} " in l and a.address in l]
        assert mine, lines
        host, address, port, rest = mine[0].split(" ", 3)
        assert address == a.address and int(port) == status["port"]
        assert rest.startswith(f"'sysinfo={krel} x86_64'")
        assert "'version=" in rest and "'certinfo=" in rest
        # root's server is trusted in the global client database, not yet as a signer
        assert rest.endswith("'trust=ssl'"), rest
        cert = os.path.join(status["database"], stap_client.SERVER_CERT_FILE)
        with open(cert, "rb") as f:
            serial = stap_client.serial_text(stap_client.certificate_serial(f.read()))
        assert f"'certinfo={serial}'" in rest or f"'certinfo=00:{serial}'" in rest, rest
        proc = b.run([PYTHON, CLIENT, "stap-add-server-cert", "--signer", cert], env=box.env)
        assert proc.returncode == 0, proc.stderr
        proc, _ = find(b, box, "--all")
        assert [l for l in proc.stdout.splitlines()
                if f" {status['port']} " in l and l.endswith("'trust=ssl,signer'")], proc.stdout
        print(f"stap-find-servers --all ({'avahi' if avahi else 'mdns'}): {seconds:.2f} s")
        assert seconds < 2.5
        # the local kernel is not the served release: not compatible by default
        proc, _ = find(b, box)
        if krel != b.run(["uname", "-r"]).stdout.strip():
            assert proc.returncode == 1 and proc.stdout == ""
        # stap-client with no --server finds it and compiles through it
        proc = b.run([PYTHON, CLIENT, "stap-client", "-r", krel, "-p2", "-e",
                      "probe begin { exit() }"], env=box.env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "begin" in proc.stdout
        # a release no server offers: the error names what is offered
        proc = b.run([PYTHON, CLIENT, "stap-client", "-r", "9.9.9-other", "-p2", "-e",
                      "probe begin { exit() }"], env=box.env, timeout=120)
        assert proc.returncode == 1
        assert ("stap-client: ERROR: no compile server found for 9.9.9-other x86_64: no "
                "advertised server serves it (") in proc.stderr
        assert f"serves {krel} x86_64" in proc.stderr
        # --server=HOST (no port) takes the advertised port
        proc = b.run([PYTHON, CLIENT, "stap-client", f"--server={a.address}", "-r", krel,
                      "-p1", "-e", "probe begin { exit() }"], env=box.env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        # --server=SERIAL picks the advertised server with that certificate serial
        proc = b.run([PYTHON, CLIENT, "stap-client", f"--server={serial}", "-r", krel,
                      "-p1", "-e", "probe begin { exit() }"], env=box.env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "begin" in proc.stdout
        # find-or-start finds the compatible server for the release it was given
        proc = b.run([PYTHON, SERVER, "stap-find-or-start-server", "-r", krel],
                     env=box.env, timeout=60)
        if proc.stdout.strip() not in ("0", "-1"):
            stop_pid(int(proc.stdout))
        assert proc.stdout.strip() == "0" and proc.returncode == 0, proc.stderr
    # a stopped server withdraws its advertisement
    wait_until(lambda: f" {status['port']} " not in find(b, box, "--all")[0].stdout, 10,
               "a stopped server is still advertised", interval=0.3)


def test_client_without_servers_says_what_it_searched(network_factory, krel):  # noqa: F811
    net = network_factory(avahi=False)
    b = net.hosts[1]
    box = make_sandbox()
    # a server whose certificate makes the client database
    start_server(box, krel, netns=b, advertise="none", log=box.path("log")).stop()
    proc = b.run([PYTHON, CLIENT, "stap-client", "-r", krel, "-p2", "-e", "probe begin {}"],
                 env=box.env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"stap-client: ERROR: no compile server found for {krel} x86_64: no server is "
        "advertised on the local network (searched with multicast DNS; no avahi daemon "
        "answered); start one with stap-start-server, or name one with --server=HOST:PORT")


# --------------------------------------------------------------------------
# A fleet: the load hint, and identical requests meeting one result cache
# --------------------------------------------------------------------------

SLOW = 6  # seconds each of the fleet test's compiles sleeps first: more than FIRST_GUESS
FIRST_GUESS = 5.0  # seconds: the server's compile time before it has measured one


def start_on(host, box, krel, *extra, env=None):
    srv = start_server(box, krel, None, *extra, env=env, netns=host,
                       log=box.path(f"server-{time.monotonic_ns()}.log"))
    return srv.pid, srv.status


def hint_of(host, box, port):
    """The TXT fields of the server at port, as stap-find-servers shows them."""
    proc, _ = find(host, box, "--all")
    for line in proc.stdout.splitlines():
        if f" {port} " in line:
            return dict(re.findall(r"'(\w+)=([^']*)'", line))
    return {}


def hint_showing(host, box, port, **want):
    """The server's hint once it shows every wanted key=value, else None."""
    hint = hint_of(host, box, port)
    return hint if all(hint.get(k) == v for k, v in want.items()) else None


def test_load_hint_follows_the_queue(network_factory, krel):  # noqa: F811
    net = network_factory(avahi=False)
    a, b = net.hosts
    box = make_sandbox()
    slow = stand_in_program(box, "stap_slow.sh")
    pid, status = start_on(a, box, krel, "--max-threads", "1", "--load-refresh", "1",
                           env={"SYSTEMTAP_STAP": slow})
    try:
        hint = wait_until(lambda: hint_of(b, box, status["port"]), 10, "not advertised")
        assert (hint["slots"], hint["busy"], hint["queued"]) == ("1", "0", "0"), hint
        clients = [a.popen([PYTHON, CLIENT, "stap-client", f"--server=127.0.0.1:{status['port']}",
                            "-r", krel, "-p2", "-e",
                            f"probe begin {{ /* SLOWPROBE {SLOW} s, client {n} */ }}"],
                           env=box.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for n in range(2)]
        busy = wait_until(lambda: hint_showing(b, box, status["port"], busy="1", queued="1"),
                          6, "the hint never showed the queue")
        print(f"load hint while busy: {busy}")
        for c in clients:
            c.wait(60)
        idle = wait_until(lambda: hint_showing(b, box, status["port"], busy="0", queued="0"),
                          10, "the hint never went back to idle")
        # It learnt how long these compiles take: each took more than SLOW seconds (a loaded
        # machine only makes them longer), so the hint left the first guess upwards, and no
        # compile took longer than its whole request, as the log times them.
        with open(status["log"]) as f:
            longest = max(float(t) for t in re.findall(r"^.*request .* seconds='([\d.]+)'",
                                                       f.read(), re.M))
        print(f"load hint when idle again: {idle}, the longest request {longest} s")
        assert FIRST_GUESS < float(idle["compile"]) <= round(longest, 1), (idle, longest)
    finally:
        stop_pid(pid)


def test_same_request_lands_on_the_same_server_of_three(network_factory, krel,  # noqa: F811
                                                        cache_dir):
    net = network_factory(avahi=False)
    a, b = net.hosts
    box = make_sandbox()
    servers = [start_on(a, box, krel, "--cache-dir", cache_dir) for _ in range(3)]
    try:
        wait_until(lambda: len([l for l in find(b, box, "--all")[0].stdout.splitlines()
                                if f"'sysinfo={krel}" in l]) >= 3, 10, "not all advertised")

        def landed(script):
            proc = b.run([PYTHON, CLIENT, "stap-client", "-r", krel, "-p2", "-e", script],
                         env=box.env, timeout=120)
            assert proc.returncode == 0, proc.stderr
            hits = [s["port"] for _, s in servers if script in open(s["log"]).read()]
            return hits

        same = "probe begin { /* one and the same */ exit() }"
        where = [landed(same) for _ in range(3)]
        assert all(len(w) == 1 for w in where) and len({w[0] for w in where}) == 1, where
        spread = {landed(f"probe begin {{ /* distinct {n} */ exit() }}")[0] for n in range(9)}
        print(f"identical request always on port {where[0][0]}; nine others on {sorted(spread)}")
        assert len(spread) >= 2, spread
    finally:
        for pid, _ in servers:
            stop_pid(pid)


def test_servers_started_at_once_on_one_host_both_appear(network_factory, krel):  # noqa: F811
    """Two responders that probe the same name at the same moment resolve
    the conflict (the higher port yields, the other defends): both servers
    are seen, under different names."""
    net = network_factory(avahi=False)
    a, b = net.hosts
    box = make_sandbox()
    stop_pid(start_on(a, box, krel, "--advertise", "none")[0])  # the certificate, made once
    logs = [box.path(f"twin{n}.log") for n in range(2)]
    starts = [a.popen([PYTHON, SERVER, "stap-start-server", "--listen", "::", "-r", krel,
                       "--log", log], env=box.env, stdout=subprocess.PIPE, text=True)
              for log in logs]
    pids = [int(p.communicate(timeout=60)[0]) for p in starts]
    try:
        ports = [json.loads(a.run(["cat", f"/run/stap-server/stap-serverd.{pid}.json"]).stdout)
                 ["port"] for pid in pids]
        wait_until(lambda: all(f" {port} " in find(b, box, "--all")[0].stdout for port in ports),
                   10, "both servers were not seen")
        names = [re.findall(r"advertised as '(.*)' through", open(log).read()) for log in logs]
        renamed = [re.findall(r"now '(.*)'$", open(log).read(), re.M) for log in logs]
        final = {(r or n)[-1] for n, r in zip(names, renamed)}
        assert len(final) == 2, (names, renamed)
    finally:
        for pid in pids:
            stop_pid(pid)
