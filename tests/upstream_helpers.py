# Shared by the ports of systemtap testsuite/systemtap.server/*.exp and of the server
# helpers in testsuite/lib/systemtap.exp and server_ns.exp (reimplemented, no code copied).
"""What the ports of systemtap's own compile-server testsuite share
(tests/test_upstream_*.py; upstream: testsuite/systemtap.server/*.exp and
the server helpers of testsuite/lib/systemtap.exp).

Every upstream case is replayed with three pairings:

  real-client  the real 4.8 `stap --use-server=127.0.0.1:PORT` against OUR server
  our-client   our `stap-client --server=127.0.0.1:PORT` against OUR server
  real-server  the real 4.8 client against the real 4.8 `stap-serverd` (run as
               nobody in a private network namespace): the reference that grounds
               each expectation in what the real server does

Adaptations this machine forces, made in every port (and said again where used):
- stap needs `-r KREL` (the headers release): the running kernel has no build tree.
- Pass 5 cannot run here (modules cannot be loaded): an upstream pass-5 run becomes
  `-p4`, and "it ran" becomes "the module came back" (rc 0, NAME.ko in the cwd,
  built for KREL).
- No avahi in the root network namespace: servers are named explicitly
  (`--use-server=HOST:PORT`, our `--server=HOST:PORT`) instead of being found,
  except in the discovery ports, which build their own network namespaces.
- "WARNING: Kernel function symbol table missing" is printed by every stap run on
  this machine (the -r release is not the running kernel), locally and on any
  server; output comparisons that upstream makes line by line ignore that line.

Nothing here copies upstream code: the logic is reimplemented from what each case
checks.  The Tcl behaviours the ports depend on (`expr srand()/rand()`, what
`catch {exec ...} result` leaves in result) are reimplemented and were checked
against tclsh 8.6 on this machine (see test_upstream_server_args.py).
"""

import concurrent.futures
import contextlib
import grp
import io
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import zipfile

import pytest
from shared import (
    CLIENT,
    PYTHON,
    complete_der,
    fixed_runtime_for,
    make_sandbox,
    program,
    start_server,
    stop_pid,
    wait_until,
    without_progress,
)

STAP = shutil.which("stap") or "/usr/bin/stap"
REAL_SERVERD = "/usr/lib/systemtap/stap-serverd"
REAL_PORT = 5555  # inside a private network namespace every port is free
PAIRINGS = ("real-client", "our-client", "real-server")
KSYM_WARNING = "WARNING: Kernel function symbol table missing [man warning::symbols]"
TIMEOUT = 300  # a first -p4 (kernel configuration probe) can take a minute

# Our own equivalents of the scripts beside the upstream .exp files (same
# behaviour, written here): hello.stp prints "Hello From Server" and exits,
# test.stp is the smallest script that exits, tapset/foo.stp defines foo().
HELLO_STP = 'probe begin\n{\n  printf("Hello From Server\\n")\n  exit()\n}\n'
TEST_STP = "probe begin { exit (); }\n"
FOO_TAPSET = 'function foo()\n{\n  printf("Hello\\n")\n}\n'


def need_tools(*tools):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, the nobody account)")
    for tool in tools:
        if not (os.path.isabs(tool) and os.access(tool, os.X_OK)) and not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")


def write_scripts(top):
    """hello.stp, test.stp and tapset/foo.stp under top; returns top."""
    os.makedirs(os.path.join(top, "tapset"), exist_ok=True)
    for name, text in (("hello.stp", HELLO_STP), ("test.stp", TEST_STP),
                       ("tapset/foo.stp", FOO_TAPSET)):
        with open(os.path.join(top, name), "w") as f:
            f.write(text)
    return top


def without_ksym_warning(text):
    return "\n".join(l for l in text.split("\n") if l != KSYM_WARNING)


def modules_in(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".ko"))


def vermagic(ko):
    return subprocess.run(["modinfo", "-F", "vermagic", ko], capture_output=True, text=True,
                          check=True, timeout=30).stdout.split()[0]


# --------------------------------------------------------------------------
# Tcl's `catch {exec ...} result`: what upstream compares
# --------------------------------------------------------------------------

def tcl_exec_result(proc):
    """What Tcl 8.6 leaves in `result` after `catch {exec CMD} result`
    (checked with tclsh on this machine): on success with a silent stderr,
    stdout less one final newline; otherwise stdout, then stderr less one
    final newline, then "child process exited abnormally" when the exit
    status was not 0 and stderr said nothing."""
    out, err = proc.stdout, proc.stderr
    if isinstance(out, bytes):
        out, err = out.decode(errors="replace"), err.decode(errors="replace")
    if proc.returncode == 0 and not err:
        return out[:-1] if out.endswith("\n") else out
    if err.endswith("\n"):
        err = err[:-1]
    return out + err + ("child process exited abnormally"
                        if proc.returncode != 0 and not err else "")


# --------------------------------------------------------------------------
# Servers and clients
# --------------------------------------------------------------------------

class RealServerd:
    """The real stap-serverd 4.8 as nobody in a new network namespace
    (loopback only), with extra options; reached at 127.0.0.1:REAL_PORT by
    commands run with prefix().  Its home (certificate database, stap cache)
    is kept under the shared test directory, so later sessions reuse its
    certificate and cache; its log is fresh each time."""

    def __init__(self, krel, runtime, home, *options):
        self.krel, self.runtime, self.home, self.options = krel, runtime, home, options
        self.proc = self.netns = self.out = None
        self.log = os.path.join(home, f"log.{os.getpid()}.{time.monotonic_ns()}")

    @property
    def cert(self):
        return os.path.join(self.home, ".systemtap", "ssl", "server", "stap.cert")

    @property
    def address(self):
        return f"127.0.0.1:{REAL_PORT}"

    def prefix(self):
        return ["nsenter", "-t", str(self.proc.pid), "-n"]

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def __enter__(self):
        nobody = pwd.getpwnam("nobody")
        os.makedirs(self.home, 0o700, exist_ok=True)
        os.chown(self.home, nobody.pw_uid, nobody.pw_gid)
        os.chmod(self.home, 0o700)
        inner = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 "env", "-i", "PATH=/usr/bin:/bin", f"HOME={self.home}",
                 f"SYSTEMTAP_DIR={self.home}/.systemtap", "LANG=C.UTF-8",
                 REAL_SERVERD, "--port", str(REAL_PORT), "-r", self.krel]
        if self.runtime:
            inner += ["-R", self.runtime]
        inner += ["--log", self.log, *self.options]
        self.out = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"',
                                      "sh", *inner], stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=self.out, start_new_session=True)
        try:
            wait_until(self._ready, 60, "the real stap-serverd was not ready within 60 s",
                       interval=0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            self.out.seek(0)
            raise AssertionError(f"stap-serverd exited with {self.proc.returncode}: "
                                 f"{self.out.read()}")
        if self.netns is None:
            try:
                link = os.readlink(f"/proc/{self.proc.pid}/ns/net")
                if link != os.readlink("/proc/self/ns/net"):
                    self.netns = link
            except OSError:
                return False
        if not self.netns or not complete_der(self.cert):
            return False  # it listens before it makes its certificate on a first start
        out = subprocess.run(self.prefix() + ["ss", "-Hltn"], capture_output=True, text=True,
                             timeout=10).stdout
        return any(l.split()[3].endswith(f":{REAL_PORT}") for l in out.splitlines()
                   if len(l.split()) > 3)

    def __exit__(self, *exc):
        if self.proc is not None:
            stop_pid(self.proc.pid, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.netns:
            left = [int(d) for d in os.listdir("/proc") if d.isdigit()
                    and _netns_of(d) == self.netns]
            for pid in left:
                stop_pid(pid, timeout=5)
        if self.out is not None:
            self.out.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log)
        return False


def _netns_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def real_client_env(top):
    """Environment of a real stap client with its own SYSTEMTAP_DIR under top."""
    home = os.path.join(top, "real-client")
    os.makedirs(home, exist_ok=True)
    return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home, "LANG": "C.UTF-8",
            "SYSTEMTAP_DIR": os.path.join(home, ".systemtap")}


def run(argv, env, cwd, timeout=TIMEOUT, input=None):
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


class Pairings:
    """One of our servers (options given), the real client trusting it, the
    reference real server (options given) and a real client trusting that
    one; run(pairing, args) runs a client of the pairing with args."""

    def __init__(self, krel, runtime, cache_dir, shared_dir, ours=(), real=(),
                 real_home="upstream-real-serverd", want_real=True):
        self.krel, self.runtime = krel, runtime
        self.top = tempfile.mkdtemp(prefix="stap-upstream.")
        os.chmod(self.top, 0o755)
        self.stack = contextlib.ExitStack()
        try:
            self.box = make_sandbox()
            self.stack.callback(shutil.rmtree, self.box.top, True)
            self.server = start_server(self.box, krel, runtime, *ours, cache=cache_dir)
            self.stack.callback(self.server.stop)
            self.real_env = real_client_env(os.path.join(self.top, "ours"))
            proc = run([STAP, "--trust-servers=ssl,no-prompt",
                        f"--use-server={self.server.address}"], self.real_env, self.top, 60)
            assert proc.returncode == 0, proc.stderr
            self.reference = None
            if want_real:
                self.reference = self.stack.enter_context(
                    RealServerd(krel, fixed_runtime_for(krel, shared_dir),  # ours needs none
                                os.path.join(shared_dir, real_home), *real))
                self.ref_env = real_client_env(os.path.join(self.top, "reference"))
                proc = run(self.reference.prefix() + [
                    STAP, "--trust-servers=ssl,no-prompt",
                    f"--use-server={self.reference.address}"], self.ref_env, self.top, 60)
                assert proc.returncode == 0, proc.stderr
        except BaseException:
            self.close()
            raise

    def close(self):
        self.stack.close()
        shutil.rmtree(self.top, ignore_errors=True)

    def workdir(self):
        """A fresh, empty working directory for one client run."""
        return tempfile.mkdtemp(prefix="cwd.", dir=self.top)

    def argv(self, pairing, args, server_last=False):
        if pairing == "our-client":
            return [PYTHON, CLIENT, "stap-client", f"--server={self.server.address}", *args]
        if pairing == "real-client":
            opt = f"--use-server={self.server.address}"
            return [STAP, *args, opt] if server_last else [STAP, opt, *args]
        if pairing == "real-server":
            opt = f"--use-server={self.reference.address}"
            return self.reference.prefix() + ([STAP, *args, opt] if server_last
                                              else [STAP, opt, *args])
        raise ValueError(pairing)

    def env(self, pairing, extra=None):
        base = {"our-client": self.box.env, "real-client": self.real_env,
                "real-server": getattr(self, "ref_env", None)}[pairing]
        return {**base, **(extra or {})}

    def run(self, pairing, args, cwd=None, env=None, input=None, server_last=False,
            timeout=TIMEOUT):
        if pairing == "real-server" and self.reference is None:
            pytest.skip("no reference server in this module")
        proc = run(self.argv(pairing, args, server_last), self.env(pairing, env),
                   cwd or self.workdir(), timeout, input)
        if pairing == "our-client":
            proc.stderr = without_progress(proc.stderr)
        return proc

    def server_log(self, pairing):
        """The log text of the server this pairing talks to."""
        if pairing == "real-server":
            return self.reference.log_text()
        with open(self.server.log, errors="replace") as f:
            return f.read()


@pytest.fixture(scope="module")
def pairings(krel, runtime, cache_dir, shared_dir):
    """Default servers (as the upstream setup_server starts them) for a module."""
    need_tools(STAP, REAL_SERVERD, "unshare", "nsenter", "setpriv", "ss", "certutil", "modinfo")
    p = Pairings(krel, runtime, cache_dir, shared_dir)
    yield p
    p.close()


@pytest.fixture(params=PAIRINGS)
def pairing(request):
    return request.param


# --------------------------------------------------------------------------
# Raw requests: exactly these stap arguments, as a server receives them
# --------------------------------------------------------------------------

def request_zip(krel, args, files=()):
    """The request the real 4.8 client would send for args (one argvN each)
    and files ((archive name, bytes)), for KREL on this architecture."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("version", "4.8")
        zf.writestr("sysinfo", f"sysinfo: {krel} {os.uname().machine}")
        for n, arg in enumerate(args, 1):
            zf.writestr(f"argv{n}", arg)
        zf.writestr("locale", "LANG=C.UTF-8\n")
        for name, data in files:
            zf.writestr(name, data)
    return buf.getvalue()


class Reply:
    def __init__(self, data):
        self.raw = data
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            self.rc = int(zf.read("rc").strip())
            self.stdout = zf.read("stdout").decode(errors="replace") if "stdout" in names else ""
            self.stderr = zf.read("stderr").decode(errors="replace") if "stderr" in names else ""
            self.names = names


def raw_request(pairings, server, request, timeout=TIMEOUT):
    """Send request (zip bytes) to "ours" or "real" (the reference); the Reply."""
    if server == "ours":
        prefix, address = [], pairings.server.address
        cert = os.path.join(pairings.server.status["database"], "stap-server.cert")
    else:
        prefix, address, cert = pairings.reference.prefix(), pairings.reference.address, \
            pairings.reference.cert
    pem = os.path.join(pairings.top, f"{server}-cert.pem")
    if not os.path.exists(pem):
        import ssl
        with open(cert, "rb") as f, open(pem + ".tmp", "w") as out:
            out.write(ssl.DER_cert_to_PEM_cert(f.read()))
        os.replace(pem + ".tmp", pem)
    host, port = address.rsplit(":", 1)
    proc = subprocess.run(prefix + [PYTHON, program("raw_client"), host, port, pem], input=request,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0 and proc.stdout, \
        f"no reply from {server} ({address}): {proc.stderr.decode(errors='replace')}"
    return Reply(proc.stdout)


def run_all(jobs, workers=4):
    """Run the callables of jobs ({key: callable}) a few at a time; {key:
    (result, None) or (None, exception)}."""
    def call(fn):
        try:
            return fn(), None
        except BaseException as e:  # reported by the test that reads it
            return None, e
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(call, fn) for key, fn in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


# --------------------------------------------------------------------------
# Module signers and the setuid staprun (server_privilege.exp, client.exp)
# --------------------------------------------------------------------------

# upstream's optional users (testsuite/lib/systemtap.exp): "stapusr" in group
# stapusr only, "stapsys" in stapusr and stapsys, "stapdev" in stapusr and
# stapdev; here scratch accounts with the same groups stand for them.
STAP_USERS = {"stapusr": ("stapusrtest", ["stapusr"]),
              "stapsys": ("stapsystest", ["stapusr", "stapsys"]),
              "stapdev": ("stapdevtest", ["stapusr", "stapdev"])}


@pytest.fixture(scope="module")
def stap_users():
    """{role: pwd entry}, the scratch accounts made (or completed) here."""
    out = {}
    for role, (name, groups) in STAP_USERS.items():
        try:
            pw = pwd.getpwnam(name)
            have = {g.gr_name for g in grp.getgrall() if name in g.gr_mem}
            if not set(groups) <= have:
                subprocess.run(["usermod", "-a", "-G", ",".join(groups), name], check=True)
        except KeyError:
            subprocess.run(["useradd", "-M", "-s", "/bin/sh", "-G", ",".join(groups), name],
                           check=True)
            pw = pwd.getpwnam(name)
        out[role] = pw
    return out


def with_etc(etc, argv, user=None):
    """argv that runs argv in a new mount namespace where etc is
    /etc/systemtap (upstream's server_ns_as_root / server_ns_as_user), as
    root or as user (a pwd entry)."""
    inner = list(argv)
    if user is not None:
        inner = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                 "env", "-i", "PATH=/usr/bin:/bin:/usr/sbin:/sbin", "LANG=C.UTF-8",
                 f"HOME={tempfile.gettempdir()}", *inner]
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/systemtap && exec "$@"', etc,
            *inner]


def prepare_for_staprun_48(etc):
    """What staprun 4.8 needs of its signer database ETC/staprun (README,
    "Signed modules for stapusr users"): the old file names present, the new
    files writable by group stapusr."""
    db = os.path.join(etc, "staprun")
    for legacy in ("cert8.db", "key3.db", "secmod.db"):
        open(os.path.join(db, legacy), "ab").close()
    gid = grp.getgrnam("stapusr").gr_gid
    for name in ("cert9.db", "key4.db"):
        os.chown(os.path.join(db, name), 0, gid)
        os.chmod(os.path.join(db, name), 0o664)
    os.chmod(db, 0o755)


def staprun_accepted(said):
    """Adapted "the module ran": staprun verified the module and asked the
    kernel to load it (this machine's kernel refuses: Function not implemented)."""
    return "Function not implemented" in said and "Unable to verify" not in said
