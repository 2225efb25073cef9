"""Shared fixtures: a private sysconfdir and SYSTEMTAP_DIR, the unprivileged
test account, the kernel release with headers, the runtime fixture, running
servers (cleaned up by pid) and a recording staprun stand-in."""

import dataclasses
import json
import os
import shutil
import sys
import tempfile

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]

# The tests import these from here.
from shared import (  # noqa: E402,F401
    CLIENT,
    PYTHON,
    SERVER,
    TEST_USER,
    Sandbox,
    ensure_test_user,
    fixed_runtime_for,
    headers_release,
    make_sandbox,
    module_for,
    new_serial_window,
    pid_alive,
    private_config,
    serial_window_used,
    stop_pid,
    wait_until,
)

SHARED = "/tmp/stap-server-tests"  # world-readable: the compile account reads it


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, other accounts, chown)")


# --------------------------------------------------------------------------
# The kernel release, the runtime fixture, stap's knowledge of the kernel
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def krel():
    rel = headers_release()
    if not rel:
        pytest.skip("no installed kernel headers (apt-get install linux-headers-amd64)")
    return rel


@pytest.fixture(scope="session")
def shared_dir():
    os.makedirs(SHARED, 0o755, exist_ok=True)
    os.chmod(SHARED, 0o755)
    return SHARED


@pytest.fixture(scope="session")
def runtime():
    """No -R for our server: it fixes the runtime for a kernel itself (spec 5, 11)."""
    return None


@pytest.fixture(scope="session")
def fixed_runtime(krel, shared_dir):
    """The -R directory that stap run without our server (the real stap-serverd, a local stap)
    needs for these headers, or None: made by our server's own table of fixes."""
    return fixed_runtime_for(krel, shared_dir)


@pytest.fixture(scope="session")
def cache_dir(shared_dir):
    """A root server's --cache-dir (stap's knowledge of each kernel), kept between sessions."""
    path = os.path.join(shared_dir, "knowledge-cache")
    os.makedirs(path, 0o755, exist_ok=True)
    return path


# --------------------------------------------------------------------------
# Sandboxes: environment for a user, with private sysconfdir and SYSTEMTAP_DIR
# --------------------------------------------------------------------------

@pytest.fixture
def sandbox():
    """Root's sandbox (as root) or the caller's own."""
    box = make_sandbox()
    yield box
    shutil.rmtree(box.top, ignore_errors=True)


@pytest.fixture
def user_sandbox():
    """A sandbox for the unprivileged test account."""
    need_root()
    box = make_sandbox(TEST_USER)
    yield box
    shutil.rmtree(box.top, ignore_errors=True)


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Server:
    pid: int
    port: int
    status: dict
    box: Sandbox

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    @property
    def log(self):
        return self.status["log"]

    def stop(self):
        stop_pid(self.pid)


def status_file(box, pid):
    run = "/run/stap-server" if box.user is None and os.geteuid() == 0 else \
        os.path.join(box.systemtap_dir, "run")
    return os.path.join(run, f"stap-serverd.{pid}.json")


def start_server(box, krel, runtime=None, *extra, cache=None, env=None):
    """stap-start-server on loopback (krel None: no -r); returns a Server."""
    args = ["--listen", "127.0.0.1", *(["-r", krel] if krel else []), "--log",
            box.path("server.log"), "--advertise", "none"]
    if runtime:
        args += ["-R", runtime]
    if cache and os.geteuid() == 0 and box.user is None:
        args += ["--cache-dir", cache]
    new_serial_window()  # its first start makes a certificate
    proc = box.run("stap-start-server", *args, *extra, timeout=60, env=env)
    serial_window_used()
    assert proc.returncode == 0, proc.stderr.decode()
    pid = int(proc.stdout.decode().strip())
    with open(status_file(box, pid)) as f:
        status = json.load(f)
    return Server(pid=pid, port=status["port"], status=status, box=box)


@pytest.fixture
def servers():
    """Start servers with servers.start(box, ...); all are stopped afterwards."""
    started = []

    class Starter:
        def start(self, box, krel, runtime=None, *extra, cache=None, env=None):
            srv = start_server(box, krel, runtime, *extra, cache=cache, env=env)
            started.append(srv)
            return srv

    yield Starter()
    for srv in started:
        srv.stop()


@pytest.fixture
def server(servers, sandbox, krel, runtime, cache_dir):
    """One root (or caller's) server on loopback serving the headers release."""
    return servers.start(sandbox, krel, runtime, cache=cache_dir)


# --------------------------------------------------------------------------
# A staprun stand-in that records what it was given
# --------------------------------------------------------------------------

STAPRUN_STANDIN = """#!/bin/sh
# Records its arguments and the module it was given; exits with $STAPRUN_RC.
rec="${STAPRUN_RECORD:?}"
printf '%s\\n' "$@" > "$rec.args"
for a in "$@"; do case "$a" in *.ko) /bin/cp "$a" "$rec.ko";; esac; done
pwd > "$rec.cwd"
exit "${STAPRUN_RC:-0}"
"""


@pytest.fixture
def staprun(tmp_path):
    """(env, record prefix): set env to make stap-client use the stand-in."""
    d = tempfile.mkdtemp(prefix="staprun.")
    os.chmod(d, 0o777)
    script = os.path.join(d, "staprun")
    with open(script, "w") as f:
        f.write(STAPRUN_STANDIN)
    os.chmod(script, 0o755)
    record = os.path.join(d, "rec")
    yield {"SYSTEMTAP_STAPRUN": script, "STAPRUN_RECORD": record}, record
    shutil.rmtree(d, ignore_errors=True)
