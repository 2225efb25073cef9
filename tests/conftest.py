"""Shared fixtures: a private sysconfdir and SYSTEMTAP_DIR, the unprivileged
test account, the kernel release with headers, the runtime fixture, running
servers (cleaned up by pid) and a recording staprun stand-in."""

import dataclasses
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]

from shared import pid_alive, private_config, stop_pid, wait_until  # noqa: E402,F401  (tests import them here)


PYTHON = sys.executable
CLIENT = os.path.join(ROOT, "stap_client.py")
SERVER = os.path.join(ROOT, "stap_server.py")
TEST_USER = "staptest"
SHARED = "/tmp/stap-server-tests"  # world-readable: the compile account reads it


def module_for(command):
    return SERVER if command in ("stap-serverd", "stap-start-server", "stap-stop-server",
                                 "stap-find-or-start-server") else CLIENT


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, other accounts, chown)")


# --------------------------------------------------------------------------
# The kernel release, the runtime fixture, a warm stap cache
# --------------------------------------------------------------------------

def headers_release():
    mods = "/lib/modules"
    rels = [r for r in os.listdir(mods) if os.path.isdir(os.path.join(mods, r, "build"))] \
        if os.path.isdir(mods) else []
    rels.sort(key=lambda r: [int(x) if x.isdigit() else x for x in
                             r.replace("-", ".").split(".")])
    return rels[-1] if rels else None


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
def runtime(krel, shared_dir):
    """The -R directory pass 4 needs with these headers, or None (spec 11)."""
    out = subprocess.run([os.path.join(ROOT, "tools", "runtime-fixture"), krel, shared_dir],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out or None


@pytest.fixture(scope="session")
def cache_dir(shared_dir):
    """stap's cache for a root server's compile account, kept for the session."""
    path = os.path.join(shared_dir, "compile-cache")
    os.makedirs(path, 0o755, exist_ok=True)
    return path


# --------------------------------------------------------------------------
# Sandboxes: environment for a user, with private sysconfdir and SYSTEMTAP_DIR
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Sandbox:
    top: str
    env: dict
    user: str = None  # None: root

    @property
    def sysconfdir(self):
        return self.env["STAP_SYSCONFDIR"]

    @property
    def systemtap_dir(self):
        return self.env["SYSTEMTAP_DIR"]

    def path(self, *parts):
        return os.path.join(self.top, *parts)

    def run(self, command, *args, timeout=300, input=None, cwd=None, env=None):
        """Run one of our commands (as python3 MODULE COMMAND ...) as this user."""
        argv = [PYTHON, module_for(command), command, *args]
        return self.run_argv(argv, timeout=timeout, input=input, cwd=cwd, env=env)

    def run_argv(self, argv, timeout=300, input=None, cwd=None, env=None):
        kw = {}
        if self.user:
            pw = pwd.getpwnam(self.user)
            kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        return subprocess.run(argv, env={**self.env, **(env or {})}, capture_output=True,
                              timeout=timeout, input=input, cwd=cwd or self.top, **kw)


def ensure_test_user():
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", TEST_USER], check=True)
    return pwd.getpwnam(TEST_USER)


def make_sandbox(user=None):
    """A private configuration for root (user None), the test account or
    another existing account."""
    top = tempfile.mkdtemp(prefix="stap-sandbox.")
    os.chmod(top, 0o755)
    env = private_config(top)
    if user:
        pw = ensure_test_user() if user == TEST_USER else pwd.getpwnam(user)
        for d in (top, env["HOME"]):
            os.chown(d, pw.pw_uid, pw.pw_gid)
    return Sandbox(top=top, env=env, user=user)


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
    """stap-start-server on loopback; returns a Server."""
    args = ["--listen", "127.0.0.1", "-r", krel, "--log", box.path("server.log"),
            "--advertise", "none"]
    if runtime:
        args += ["-R", runtime]
    if cache and os.geteuid() == 0 and box.user is None:
        args += ["--cache-dir", cache]
    proc = box.run("stap-start-server", *args, *extra, timeout=60, env=env)
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
