"""A minimal client host: only Python (with the NSS bindings), the NSS tools
and staprun on PATH (no stap, no compiler, no avahi) trusts a server and
runs a script through it."""

import os
import subprocess

import pytest
from netns import network_factory  # noqa: F401  (a fixture)
from shared import CLIENT, PYTHON, copy_program, make_sandbox, start_server, stop_pid

pytestmark = pytest.mark.integration

MINIMAL_TOOLS = ("certutil", "signtool")


def minimal_path(top):
    """A PATH directory holding only the minimal host's tools."""
    bindir = os.path.join(top, "minbin")
    os.makedirs(bindir)
    for tool in MINIMAL_TOOLS:
        real = subprocess.run(["which", tool], capture_output=True, text=True,
                              check=True).stdout.strip()
        os.symlink(real, os.path.join(bindir, tool))
    copy_program("staprun_record.sh", os.path.join(bindir, "staprun"))
    return bindir


def test_client_module_stands_alone():
    proc = subprocess.run([PYTHON, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "import stap_client; assert 'stap_server' not in sys.modules; "
                           "assert 'dns' not in sys.modules", os.path.dirname(CLIENT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_minimal_host_trusts_and_uses_a_server(network_factory, krel, runtime,  # noqa: F811
                                               cache_dir):
    net = network_factory(avahi=False, single=True)
    host = net.hosts[0]
    server_box = make_sandbox()
    srv = start_server(server_box, krel, runtime, cache=cache_dir, netns=host,
                       listen="127.0.0.1", advertise="none", log=server_box.path("log"))
    pid, port = srv.pid, srv.port
    try:
        box = make_sandbox()  # the minimal host's own, empty, configuration
        bindir = minimal_path(box.top)
        env = box.env  # nsenter itself is found on the full PATH; the client gets bindir
        minimal = ["/usr/bin/env", f"PATH={bindir}", f"STAPRUN_RECORD={box.path('rec')}"]
        for tool in ("stap", "gcc", "cc", "make", "avahi-browse"):
            assert host.run(["sh", "-c", f"PATH={bindir} command -v {tool}"]).returncode != 0
        certfile = os.path.join(server_box.sysconfdir, "systemtap", "ssl", "server",
                                "stap-server.cert")
        client_db = os.path.join(box.sysconfdir, "systemtap", "ssl", "client")
        proc = host.run(minimal + [PYTHON, CLIENT, "stap-add-server-cert", certfile, client_db],
                        env=env)
        assert proc.returncode == 0, proc.stderr
        work = box.path("work")
        os.makedirs(work)
        proc = host.run(minimal + [PYTHON, CLIENT, "stap-client", f"--server=127.0.0.1:{port}",
                         "-r", krel, "-e", 'probe begin { println("hi"); exit() }'],
                        env=env, cwd=work, timeout=600)
        assert proc.returncode == 0, proc.stderr
        with open(box.path("rec.args")) as f:
            args = f.read().splitlines()
        assert args[0] == "-R" and args[1].endswith(".ko")
        assert os.path.getsize(box.path("rec.ko")) > 0
    finally:
        stop_pid(pid)
