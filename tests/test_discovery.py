"""Discovery end to end: a real server on host A, our commands on host B
(two network namespaces joined by a veth pair, each with or without its own
avahi daemon)."""

import contextlib
import json
import time

import pytest

from conftest import PYTHON, SERVER, CLIENT, make_sandbox, stop_pid
from netns import network_factory  # noqa: F401  (a fixture)


@contextlib.contextmanager
def server_on(host, box, krel, runtime, cache_dir):
    """A real stap-serverd inside host (all its addresses), stopped by pid."""
    args = [PYTHON, SERVER, "stap-start-server", "--listen", "::", "-r", krel,
            "--log", box.path("server.log"), "--cache-dir", cache_dir]
    if runtime:
        args += ["-R", runtime]
    proc = host.run(args, env=box.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.strip())
    try:
        status = json.loads(host.run(["cat", f"/run/stap-server/stap-serverd.{pid}.json"]).stdout)
        yield pid, status
    finally:
        stop_pid(pid)


def find(host, box, *args):
    t = time.monotonic()
    proc = host.run([PYTHON, CLIENT, "stap-find-servers", *args], env=box.env)
    return proc, time.monotonic() - t


def wait_until_found(host, box, *args, bound=10):
    deadline = time.monotonic() + bound
    while True:
        proc, seconds = find(host, box, *args)
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc, seconds
        time.sleep(0.3)


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
        # find-or-start finds the compatible server for the release it was given
        proc = b.run([PYTHON, SERVER, "stap-find-or-start-server", "-r", krel],
                     env=box.env, timeout=60)
        if proc.stdout.strip() not in ("0", "-1"):
            stop_pid(int(proc.stdout))
        assert proc.stdout.strip() == "0" and proc.returncode == 0, proc.stderr
    # a stopped server withdraws its advertisement
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        proc, _ = find(b, box, "--all")
        if f" {status['port']} " not in proc.stdout:
            break
        time.sleep(0.3)
    assert f" {status['port']} " not in proc.stdout


def test_client_without_servers_says_what_it_searched(network_factory, krel):  # noqa: F811
    net = network_factory(avahi=False)
    b = net.hosts[1]
    box = make_sandbox()
    proc = b.run([PYTHON, SERVER, "stap-start-server", "--listen", "::", "-r", krel,
                  "--advertise", "none", "--log", box.path("log")], env=box.env, timeout=60)
    pid = int(proc.stdout)  # a server whose certificate makes the client database
    stop_pid(pid)
    proc = b.run([PYTHON, CLIENT, "stap-client", "-r", krel, "-p2", "-e", "probe begin {}"],
                 env=box.env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"stap-client: ERROR: no compile server found for {krel} x86_64: no server is "
        "advertised on the local network (searched with multicast DNS; no avahi daemon "
        "answered); start one with stap-start-server, or name one with --server=HOST:PORT")
