"""What the tests and the benchmarks share: the kernel release with headers,
sandboxes (a private configuration for our commands), starting our server,
waiting for a condition, and ending the processes they start.

The tests' library: they import these names from here (`from shared import
...`); tests/conftest.py holds only fixtures and hooks.  Plain Python (no
project module; pytest only to skip a test): bench/common.py imports this
file the same way pytest does, as the top-level module `shared`.
"""

import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
PYTHON = sys.executable
CLIENT = os.path.join(ROOT, "stap_client.py")
SERVER = os.path.join(ROOT, "stap_server.py")
PROGRAMS = os.path.join(TESTS, "programs")  # what the tests run as programs of their own
TEST_USER = "staptest"
SHARED = "/tmp/stap-server-tests"  # world-readable: the compile account reads it
SERVER_COMMANDS = ("stap-serverd", "stap-start-server", "stap-stop-server",
                   "stap-find-or-start-server")


# --------------------------------------------------------------------------
# Waiting, and ending processes
# --------------------------------------------------------------------------

def pid_alive(pid):
    """Running, and not a zombie waiting for a parent that never reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# certutil's serials, like the real server's, are the time in units of 2**19 us; NSS takes
# two certificates of one issuer (every server's subject) and serial for one, so servers
# that make their first certificates in one such half second cannot be told apart.
CERT_SERIAL_UNIT = (1 << 19) / 1e6
last_serial_window = [-1]


def new_serial_window():
    """Wait until a certificate made now gets a serial none made before
    serial_window_used() has."""
    while int(time.time() / CERT_SERIAL_UNIT) <= last_serial_window[0]:
        time.sleep(0.02)


def serial_window_used():
    last_serial_window[0] = int(time.time() / CERT_SERIAL_UNIT)


def program(name):
    """The path of tests/programs/NAME.py (each says at its top how it is run)."""
    return os.path.join(PROGRAMS, f"{name}.py")


def copy_program(name, path):
    """path, a copy of the stand-in tests/programs/NAME (executable, as that file is; each says at
    its top what it stands in for): a file of the test's own, where the programs run by another
    account or in a sandbox can reach it."""
    shutil.copy(os.path.join(PROGRAMS, name), path)
    return path


def wait_until(condition, timeout, message, interval=0.05, error=AssertionError):
    """condition()'s first true value within timeout seconds, else raise
    error(message); message may be a function, called only then."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(message() if callable(message) else message)
        time.sleep(interval)


def stop_pid(*targets, timeout=30):
    """End processes we started: SIGTERM each, then SIGKILL whichever is
    still there after timeout seconds.  A target is a pid (polled until it
    is gone: a server that detached is not our child) or a Popen (reaped)."""

    def gone(target):
        if isinstance(target, subprocess.Popen):
            return target.poll() is not None
        return not pid_alive(target)

    def send(target, signum):
        with contextlib.suppress(ProcessLookupError):
            os.kill(target.pid if isinstance(target, subprocess.Popen) else target, signum)

    live = [t for t in targets if not gone(t)]
    for target in live:
        send(target, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: all(gone(t) for t in live), timeout, "", error=TimeoutError)
    for target in live:
        if not gone(target):
            send(target, signal.SIGKILL)
        if isinstance(target, subprocess.Popen):
            target.wait(10)  # SIGKILL takes effect at once, unless the kernel holds it


# --------------------------------------------------------------------------
# The kernel release with headers
# --------------------------------------------------------------------------

def headers_release():
    """The newest release under /lib/modules with a build tree, or None."""
    mods = "/lib/modules"
    rels = [r for r in os.listdir(mods) if os.path.isdir(os.path.join(mods, r, "build"))] \
        if os.path.isdir(mods) else []
    rels.sort(key=lambda r: [int(x) if x.isdigit() else x for x in
                             r.replace("-", ".").split(".")])
    return rels[-1] if rels else None


def fixed_runtime_for(krel, top):
    """The -R directory that a stap run without our server needs for krel's headers (made under
    top by our server's own table of runtime fixes, in a process of its own), or None."""
    out = subprocess.run([PYTHON, program("fixed_runtime"), ROOT, krel, top],
                         capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    return out or None


# --------------------------------------------------------------------------
# Sandboxes: environment for a user, with private sysconfdir and SYSTEMTAP_DIR
# --------------------------------------------------------------------------

def private_config(top):
    """Make TOP/etc (the sysconfdir) and TOP/home (with SYSTEMTAP_DIR under
    it); return the environment that points our commands there."""
    home = os.path.join(top, "home")
    os.makedirs(os.path.join(top, "etc"))
    os.makedirs(home)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
            "SYSTEMTAP_DIR": os.path.join(home, ".systemtap"),
            "STAP_SYSCONFDIR": os.path.join(top, "etc"), "LANG": "C.UTF-8"}


def module_for(command):
    return SERVER if command in SERVER_COMMANDS else CLIENT


@dataclasses.dataclass
class Sandbox:
    top: str
    env: dict
    user: str = None  # None: root
    caps: str = None  # setpriv's capability list the user's commands get, as a unit gives them

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
        if self.user and self.caps:  # AmbientCapabilities= and CapabilityBoundingSet=
            caps = f"-all,{self.caps}"
            argv = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups",
                    f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}",
                    "--", *argv]
        elif self.user:
            pw = pwd.getpwnam(self.user)
            kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        return subprocess.run(argv, env={**self.env, **(env or {})}, capture_output=True,
                              timeout=timeout, input=input, cwd=cwd or self.top, **kw)


def need_root():
    if os.geteuid() != 0:
        import pytest  # here only: the benchmarks import this module without pytest
        pytest.skip("needs root (network namespaces, other accounts, chown)")


def ensure_test_user():
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", TEST_USER], check=True)
    return pwd.getpwnam(TEST_USER)


def make_sandbox(user=None, parent=None):
    """A private configuration for root (user None), the test account or
    another existing account, in a new directory under parent (default:
    the temporary directory)."""
    top = tempfile.mkdtemp(prefix="stap-sandbox.", dir=parent)
    os.chmod(top, 0o755)
    env = private_config(top)
    if user:
        pw = ensure_test_user() if user == TEST_USER else pwd.getpwnam(user)
        for d in (top, env["HOME"]):
            os.chown(d, pw.pw_uid, pw.pw_gid)
    return Sandbox(top=top, env=env, user=user)


# --------------------------------------------------------------------------
# Our server
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Server:
    pid: int
    port: int
    status: dict
    box: Sandbox
    host: object = None  # the netns.Host it runs in, or None: this machine's loopback
    listen: str = "127.0.0.1"

    @property
    def address(self):
        """HOST:PORT that reaches it: its --listen address, or its host's for a wildcard."""
        wildcard = self.host is not None and self.listen in ("::", "0.0.0.0")
        return f"{self.host.address if wildcard else self.listen}:{self.port}"

    @property
    def log(self):
        return self.status["log"]

    def stop(self):
        stop_pid(self.pid)


def status_file(box, pid):
    run = "/run/stap-server" if box.user is None and os.geteuid() == 0 else \
        os.path.join(box.systemtap_dir, "run")
    return os.path.join(run, f"stap-serverd.{pid}.json")


def start_server(box, release, runtime=None, *extra, cache=None, env=None, netns=None,
                 listen=None, advertise=None, log=None, timeout=60):
    """Start our server with stap-start-server, as the one way the tests do; a Server.

    box        the sandbox: the server's configuration, and its account (box.user; None: root;
               root only in a netns)
    release    -r RELEASE (None: no -r)
    runtime    -R DIR (None: the server fixes the runtime for the release itself)
    extra      more options, after all of these
    cache      --cache-dir, given only to a root server in root's own sandbox
    env        added to the sandbox's environment
    netns      a netns.Host to start it in (its own /run: the status file is read there);
               None: this machine, where it must listen on loopback only
    listen     --listen ADDR; default 127.0.0.1 on this machine, "::" in a netns
    advertise  --advertise MODE; default "none" on this machine (never advertise on the root
               namespace's network), the server's own default in a netns
    log        the log's path (default box.path("server.log"))
    timeout    seconds stap-start-server may take

    The stap-start-server run must succeed (the test fails with its stderr otherwise); a test
    that expects a refusal runs stap-start-server itself.
    """
    listen = listen or ("::" if netns else "127.0.0.1")
    args = ["--listen", listen, *(["-r", release] if release else []), "--log",
            log or box.path("server.log")]
    if advertise or not netns:
        args += ["--advertise", advertise or "none"]
    if runtime:
        args += ["-R", runtime]
    if cache and os.geteuid() == 0 and box.user is None:
        args += ["--cache-dir", cache]
    argv = [PYTHON, SERVER, "stap-start-server", *args, *extra]
    new_serial_window()  # its first start makes a certificate
    if netns is None:
        proc = box.run_argv(argv, timeout=timeout, env=env)
    else:
        assert box.user is None, "in a network namespace our server runs as root only"
        proc = subprocess.run(netns.prefix() + argv, env={**box.env, **(env or {})},
                              capture_output=True, timeout=timeout, cwd=box.top,
                              stdin=subprocess.DEVNULL)
    serial_window_used()
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    pid = int(proc.stdout.decode().strip())
    if netns is None:
        with open(status_file(box, pid)) as f:
            status = json.load(f)
    else:
        status = json.loads(netns.run(["cat", status_file(box, pid)]).stdout)
    return Server(pid=pid, port=status["port"], status=status, box=box, host=netns, listen=listen)


def complete_der(path):
    """True when path holds one whole DER element (a written certificate)."""
    try:
        with open(path, "rb") as f:
            der = f.read()
    except OSError:
        return False
    if len(der) < 4 or der[0] != 0x30 or not der[1] & 0x80:
        return False
    n = der[1] & 0x7F
    return len(der) == 2 + n + int.from_bytes(der[2:2 + n], "big")


def read_text(path):
    """A file's text, or "" when it cannot be read (not written yet, gone)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def without_progress(stderr):
    """Our client's stderr less its progress lines, which it prints once a request has taken a few
    seconds (on a terminal or not): they follow the machine's load, and the real client, which
    upstream's expectations come from, has none."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not line.startswith("stap-client: ")
                   or line.startswith(("stap-client: ERROR: ", "stap-client: WARNING: ")))
