"""Interoperation with the real systemtap 4.8 peers, both directions:

1. the real client (`stap --use-server`) against our server, on 127.0.0.1;
2. our stap-client against the real `stap-serverd`, run as `nobody` inside a
   private network namespace (loopback only) and reached with nsenter.

Everything here runs the real tools; nothing leaves this machine."""

import os
import pwd
import re
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
    make_sandbox,
    need_root,
    start_server,
    stop_pid,
    wait_until,
)

pytestmark = pytest.mark.integration

STAP = shutil.which("stap") or "/usr/bin/stap"
REAL_SERVERD = "/usr/lib/systemtap/stap-serverd"
REAL_PORT = 5555  # inside a fresh network namespace every port is free
SCRIPT = "probe begin { exit() }"
BAD_SCRIPT = "probe begin { nosuchfn() }"
TIMEOUT = 300  # a first pass-4 build (kernel configuration probe) can take a minute


def need_tools(*tools):
    for tool in tools:
        if not (os.path.isabs(tool) and os.access(tool, os.X_OK)) and not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")


def run(argv, env, cwd, timeout=TIMEOUT):
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def vermagic(ko):
    return subprocess.run(["modinfo", "-F", "vermagic", ko], capture_output=True, text=True,
                          check=True, timeout=30).stdout.split()[0]


def certutil_rows(db):
    out = subprocess.run(["certutil", "-L", "-d", "sql:" + db], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [tuple(re.split(r"\s{2,}", l.strip())) for l in out.splitlines()[4:] if l.strip()]


def certutil_der(db, nickname="stap-server"):
    return subprocess.run(["certutil", "-L", "-d", "sql:" + db, "-n", nickname, "-r"],
                          capture_output=True, check=True, timeout=30).stdout


def kept_dir(stderr, prefix):
    """The temporary directory a client kept for -k (it names it on stderr)."""
    m = re.search(r'Keeping temporary directory "(/tmp/' + prefix + r'[^"]+)"', stderr)
    assert m, stderr
    return m.group(1)


@pytest.fixture(scope="module")
def local_p2(krel):
    """What the local stap prints for pass 2 of SCRIPT: the reference output."""
    need_tools(STAP)
    with tempfile.TemporaryDirectory() as home:
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
               "SYSTEMTAP_DIR": os.path.join(home, ".systemtap")}
        proc = run([STAP, "-r", krel, "-p2", "-e", SCRIPT], env, home)
    assert proc.returncode == 0, proc.stderr
    assert "begin" in proc.stdout
    return proc.stdout


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="stap-interop.")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ==========================================================================
# 1. The real client against our server
# ==========================================================================

@pytest.fixture(scope="module")
def our_server(krel, runtime, cache_dir):
    """One of our servers on 127.0.0.1 for the whole module (what the
    conftest `servers` fixture starts, kept across these tests)."""
    need_root()
    need_tools(STAP, "certutil", "signtool", "modinfo")
    box = make_sandbox()
    srv = None
    try:
        srv = start_server(box, krel, runtime, cache=cache_dir)
        yield srv
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(box.top, ignore_errors=True)


@pytest.fixture(scope="module")
def real_client(our_server):
    """(env, client database) of a real stap client that trusts our server
    through `stap --trust-servers`, with a private SYSTEMTAP_DIR."""
    home = tempfile.mkdtemp(prefix="stap-real-client.")
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home, "LANG": "C.UTF-8",
           "SYSTEMTAP_DIR": os.path.join(home, ".systemtap")}
    try:
        proc = run([STAP, "--trust-servers=ssl,no-prompt",
                    f"--use-server={our_server.address}"], env, home, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "Adding trust" in proc.stdout + proc.stderr
        yield env, os.path.join(env["SYSTEMTAP_DIR"], "ssl", "client")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def our_cert(srv):
    with open(os.path.join(srv.status["database"], "stap-server.cert"), "rb") as f:
        return f.read()


def use_server(srv):
    return f"--use-server={srv.address}"


def test_real_client_trusts_our_server(our_server, real_client):
    env, db = real_client
    assert ("stap-server", "P,P,P") in certutil_rows(db)
    assert certutil_der(db) == our_cert(our_server)


def test_real_client_pass2(our_server, real_client, krel, local_p2, workdir):
    env, _ = real_client
    proc = run([STAP, use_server(our_server), "-r", krel, "-p2", "-e", SCRIPT], env, workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == local_p2


def test_real_client_pass4_module_signed_reply(our_server, real_client, krel, workdir):
    """-p4 -m NAME: NAME.ko for KREL arrives in cwd; the reply the real client
    unpacked was our signed JAR (META-INF/ entries), and it took it."""
    env, _ = real_client
    proc = run([STAP, use_server(our_server), "-r", krel, "-p4", "-m", "interop_p4", "-k",
                "-e", SCRIPT], env, workdir)
    kept = kept_dir(proc.stderr, "stap")
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "interop_p4.ko\n"
        ko = os.path.join(workdir, "interop_p4.ko")
        assert os.path.isfile(ko) and not os.path.islink(ko)
        assert vermagic(ko) == krel
        with zipfile.ZipFile(os.path.join(kept, "server.zip")) as zf:
            names = zf.namelist()
            assert zf.read("rc").strip() == b"0"
            assert re.fullmatch(rb"\d+(\.\d+)*", zf.read("version").strip())
        assert any(n.upper() == "META-INF/MANIFEST.MF" for n in names), names
        assert any(re.match(r"META-INF/.*\.(rsa|RSA)$", n) for n in names), names
        modules = [n for n in names if re.fullmatch(r"stap\w{6}/interop_p4\.ko", n)]
        assert len(modules) == 1, names
        # The real client used what it unpacked: the module it copied is ours.
        with zipfile.ZipFile(os.path.join(kept, "server.zip")) as zf, open(ko, "rb") as f:
            assert zf.read(modules[0]) == f.read()
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_real_client_pass4_cache_hit(our_server, real_client, krel, workdir):
    """Without -m: the server-named module; twice, the second a result-cache hit."""
    env, _ = real_client
    for _ in range(2):
        proc = run([STAP, use_server(our_server), "-r", krel, "-p4", "-e", SCRIPT], env, workdir)
        assert proc.returncode == 0, proc.stderr
        name = proc.stdout.strip()
        assert re.fullmatch(r"stap_[0-9a-f]+_\d+\.ko", name), proc.stdout
        assert "<server>" not in proc.stdout
        assert vermagic(os.path.join(workdir, name)) == krel


def test_real_client_pass5(our_server, real_client, krel, workdir, staprun):
    """Pass 5 through the real client.  It runs staprun only for the running
    kernel; for another -r it stops after pass 4 (with a warning) and keeps
    the module in cwd.  Either way our server got a request without -p and
    compiled it (pass 5 is the client's)."""
    env, _ = real_client
    run_env, record = staprun
    proc = run([STAP, use_server(our_server), "-r", krel, "-m", "interop_p5", "-e", SCRIPT],
               {**env, **run_env}, workdir)
    assert proc.returncode == 0, proc.stderr
    ko = os.path.join(workdir, "interop_p5.ko")
    if krel == os.uname().release:
        with open(record + ".args") as f:
            args = f.read().split()
        assert args[-1].endswith("interop_p5.ko")
        assert vermagic(record + ".ko") == krel
    else:
        assert "last-pass 4" in proc.stderr
        assert not os.path.exists(record + ".args"), "staprun ran for a foreign release"
        assert vermagic(ko) == krel
    with open(our_server.log) as f:
        lines = [l for l in f if "interop_p5" in l]
    assert lines and "-p4" in lines[-1], lines  # no -p sent: lowered to pass 4


def test_real_client_semantic_error(our_server, real_client, krel, workdir):
    env, _ = real_client
    proc = run([STAP, use_server(our_server), "-r", krel, "-p2", "-e", BAD_SCRIPT], env, workdir)
    assert proc.returncode == 1
    assert "semantic error: unresolved function nosuchfn" in proc.stderr
    assert "Passes: via server failed" in proc.stderr


def test_real_client_unserved_release(our_server, real_client, workdir):
    """Our refusal (rc 1, one stderr line) reaches the real client's user."""
    env, _ = real_client
    proc = run([STAP, use_server(our_server), "-r", "0.0.0-interop-none", "-p2", "-e", SCRIPT],
               env, workdir)
    assert proc.returncode == 1
    assert "does not serve 0.0.0-interop-none" in proc.stderr


def test_real_client_script_file_tapset_args(our_server, real_client, krel, workdir):
    """The real client's layout: script/<path> first, `-I` and `tapset/<dir>`
    as two argv entries, `--` and script arguments: same output as local."""
    env, _ = real_client
    argv = interop_script(workdir)
    proc = run([STAP, use_server(our_server), "-r", krel, "-p2", *argv], env, workdir)
    local = run([STAP, "-r", krel, "-p2", *argv], env, workdir)
    assert local.returncode == 0, local.stderr
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == local.stdout and "interop_fn" in proc.stdout


def interop_script(top):
    """-I DIR SCRIPT ARG: a small tapset, a script using it and an argument."""
    ts = os.path.join(top, "tapset")
    os.makedirs(ts, exist_ok=True)
    with open(os.path.join(ts, "interop.stp"), "w") as f:
        f.write("function interop_fn() { return 42 }\n")
    script = os.path.join(top, "interop.stp")
    with open(script, "w") as f:
        f.write('probe begin { printf("%d %s\\n", interop_fn(), @1); exit() }\n')
    return ["-I", ts, script, "hello"]


# ==========================================================================
# 2. Our client against the real stap-serverd
# ==========================================================================

class RealServer:
    def __init__(self, pid, home, log, netns):
        self.pid, self.home, self.log, self.netns = pid, home, log, netns

    @property
    def cert(self):
        return os.path.join(self.home, ".systemtap", "ssl", "server", "stap.cert")

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()


def listening(pid, port):
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ss", "-Hltn"], capture_output=True,
                         text=True, timeout=10).stdout
    return any(l.split()[3].endswith(f":{port}") for l in out.splitlines() if len(l.split()) > 3)


def netns_pids(netns):
    """Processes in the network namespace (by its /proc ns link)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/ns/net") == netns:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def real_serverd(krel, fixed_runtime, shared_dir):
    """The real stap-serverd as nobody in a new network namespace (loopback
    up), serving KREL with our fixed runtime.  Its home (certificate
    database and stap cache) is kept in the shared test directory so that
    later sessions hit stap's cache; it is killed by pid at the end, and so
    is anything else left in its namespace."""
    need_root()
    need_tools(REAL_SERVERD, "unshare", "nsenter", "setpriv", "ss", "ip", "certutil",
               "modinfo", STAP)
    home = os.path.join(shared_dir, "interop-real-serverd")
    os.makedirs(home, 0o700, exist_ok=True)
    nobody = pwd.getpwnam("nobody")
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    os.chmod(home, 0o700)
    log = os.path.join(home, "log")
    if os.path.exists(log):
        os.unlink(log)  # one session's log, not every session's
    cert = os.path.join(home, ".systemtap", "ssl", "server", "stap.cert")
    inner = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}",
             f"SYSTEMTAP_DIR={home}/.systemtap", "LANG=C.UTF-8",
             REAL_SERVERD, "--port", str(REAL_PORT), "-r", krel]
    if fixed_runtime:
        inner += ["-R", fixed_runtime]
    inner += ["--log", log]
    script = 'ip link set lo up && exec "$@"'
    out = open(os.path.join(tempfile.gettempdir(), f"interop-serverd.{os.getpid()}.out"), "w+")
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", script, "sh", *inner],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            start_new_session=True)
    netns = None

    def ready():
        nonlocal netns
        if proc.poll() is not None:
            out.seek(0)
            pytest.fail(f"stap-serverd exited with {proc.returncode}: {out.read()}")
        if netns is None:
            try:
                link = os.readlink(f"/proc/{proc.pid}/ns/net")
                if link != os.readlink("/proc/self/ns/net"):
                    netns = link
            except OSError:
                pass
        # it listens before it makes its certificate on a first start
        return netns and complete_der(cert) and listening(proc.pid, REAL_PORT)

    try:
        wait_until(ready, 30, "stap-serverd was not ready within 30 s", interval=0.1)
        assert os.path.realpath(f"/proc/{proc.pid}/exe") == os.path.realpath(REAL_SERVERD)
        assert os.stat(f"/proc/{proc.pid}").st_uid == nobody.pw_uid
        yield RealServer(proc.pid, home, log, netns)
    finally:
        stop_pid(proc, timeout=10)
        if netns:
            stop_pid(*netns_pids(netns), timeout=5)
        out.close()
        os.unlink(out.name)


@pytest.fixture(scope="module")
def our_client(real_serverd):
    """(run, client database): our stap-client, trusting the real server via
    stap-add-server-cert of its DER stap.cert, run inside its namespace."""
    box = make_sandbox()
    db = box.path("trusted")
    try:
        proc = box.run("stap-add-server-cert", real_serverd.cert, db, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()

        def client(*args, cwd, env=None, timeout=TIMEOUT, host="127.0.0.1"):
            argv = ["nsenter", "-t", str(real_serverd.pid), "-n", PYTHON, CLIENT,
                    "stap-client", f"--server={host}:{REAL_PORT}", f"--ssl={db}", *args]
            return run(argv, {**box.env, **(env or {})}, cwd, timeout)

        yield client, db
    finally:
        shutil.rmtree(box.top, ignore_errors=True)


def test_our_client_trusts_real_der_certificate(real_serverd, our_client):
    _, db = our_client
    with open(real_serverd.cert, "rb") as f:
        der = f.read()
    assert der[:1] == b"\x30"  # the real server writes DER
    assert ("stap-server", "P,P,P") in certutil_rows(db)
    assert certutil_der(db) == der


def test_our_client_real_server_pass2(real_serverd, our_client, krel, local_p2, workdir):
    client, _ = our_client
    before = len(real_serverd.log_text())
    proc = client("-r", krel, "-p2", "-e", SCRIPT, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == local_p2
    # Named by IP address, the server gets no host-name warning (trust comes
    # from the database alone, as with the real client) ...
    assert "trusted by the database anyway" not in proc.stderr, proc.stderr
    log = real_serverd.log_text()[before:]
    assert "Client version is 4.8" in log
    assert f"Options passed from the client: -r{krel} -p2 -e{SCRIPT}" in log
    # ... named by a host name its certificate lacks: a warning, no failure.
    proc = client("-r", krel, "-p2", "-e", SCRIPT, cwd=workdir, host="localhost")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: server localhost:" in proc.stderr, proc.stderr
    assert "trusted by the database anyway" in proc.stderr, proc.stderr


def test_our_client_real_server_pass4_module(real_serverd, our_client, krel, workdir):
    """-p4 -m NAME: the real server returns its whole build directory in
    stap000000/, unsigned; our client takes the one top-level NAME.ko."""
    client, _ = our_client
    proc = client("-k", "-r", krel, "-p4", "-m", "interop_rs", "-e", SCRIPT, cwd=workdir)
    kept = kept_dir(proc.stderr, "stap-client.")
    try:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "interop_rs.ko\n"
        ko = os.path.join(workdir, "interop_rs.ko")
        assert vermagic(ko) == krel
        reply = os.path.join(kept, "server0", "reply")
        entries = sorted(os.listdir(reply))
        assert "META-INF" not in entries  # the real server does not sign
        assert {"rc", "stdout", "stderr", "version", "stap000000"} <= set(entries)
        build = os.listdir(os.path.join(reply, "stap000000"))
        assert "interop_rs.ko" in build and len(build) > 5, build  # a whole build dir
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_our_client_real_server_cache_hit_stdout(real_serverd, our_client, krel, workdir):
    """Without -m, twice (the second a stap cache hit on the real server,
    whose stdout names <server>/.systemtap/cache/...ko): our client drops the
    server's module line and prints the delivered module's name."""
    client, _ = our_client
    for _attempt in range(2):
        proc = client("-k", "-r", krel, "-p4", "-e", SCRIPT, cwd=workdir)
        kept = kept_dir(proc.stderr, "stap-client.")
        try:
            assert proc.returncode == 0, proc.stderr
            name = proc.stdout.strip()
            assert re.fullmatch(r"stap_[0-9a-f]+_\d+\.ko", name), proc.stdout
            assert proc.stdout == name + "\n"
            assert vermagic(os.path.join(workdir, name)) == krel
            with open(os.path.join(kept, "server0", "reply", "stdout")) as f:
                raw = f.read()
        finally:
            shutil.rmtree(kept, ignore_errors=True)
    assert re.search(r"^<server>/\.systemtap/cache/.*/" + re.escape(name) + "$", raw, re.M), raw


def test_our_client_real_server_pass5(real_serverd, our_client, krel, workdir, staprun):
    """No -p: the real server stops at pass 4 for us, our client runs the
    staprun stand-in on the module (-R: stap's automatic module name)."""
    client, _ = our_client
    run_env, record = staprun
    proc = client("-r", krel, "-e", SCRIPT, cwd=workdir, env=run_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    with open(record + ".args") as f:
        args = f.read().split()
    assert args[0] == "-R" and args[-1].endswith(".ko") and len(args) == 2, args
    assert vermagic(record + ".ko") == krel
    # staprun's failure is ours
    proc = client("-r", krel, "-e", SCRIPT, cwd=workdir, env={**run_env, "STAPRUN_RC": "3"})
    assert proc.returncode == 1
    assert "exited with status 3" in proc.stderr


def test_our_client_real_server_semantic_error(real_serverd, our_client, krel, workdir):
    client, _ = our_client
    proc = client("-r", krel, "-p2", "-e", BAD_SCRIPT, cwd=workdir)
    assert proc.returncode == 1
    assert "semantic error: unresolved function nosuchfn" in proc.stderr
    assert not [n for n in os.listdir(workdir) if n.endswith(".ko")]


def test_our_client_real_server_script_file_tapset_args(real_serverd, our_client, krel,
                                                         workdir):
    """Our layout (-Itapset/DIR as one argv, script/<path>, -- ARG) is
    accepted by the real server and gives the local output."""
    client, _ = our_client
    argv = interop_script(workdir)
    proc = client("-r", krel, "-p2", *argv, cwd=workdir)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
    local = run([STAP, "-r", krel, "-p2", *argv], env, workdir)
    assert local.returncode == 0, local.stderr
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == local.stdout and "interop_fn" in proc.stdout


def test_our_client_real_server_ipv6(real_serverd, our_client, krel, local_p2, workdir):
    """The real server listens on [::]; our client reaches it as [::1]:PORT."""
    client, _ = our_client
    proc = run(["nsenter", "-t", str(real_serverd.pid), "-n", "ip", "-6", "addr", "show", "lo"],
               None, workdir, timeout=10)
    if "::1" not in proc.stdout:
        pytest.skip("no IPv6 loopback in the namespace")
    proc = client(f"--server=[::1]:{REAL_PORT}", "-r", krel, "-p2", "-e", SCRIPT, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == local_p2


def test_our_client_real_server_request_too_large(real_serverd, our_client, krel, workdir):
    """Over the real server's small default request limit (5000 compressed
    bytes) it hangs up without a reply: our client fails cleanly and quickly."""
    client, _ = our_client
    noise = os.urandom(6000).hex()  # incompressible enough
    before = len(real_serverd.log_text())
    started = time.monotonic()
    proc = client("-r", krel, "-p2", "-e", f"probe begin {{ exit() }} /* {noise} */",
                  cwd=workdir, timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 1
    assert "stap-client: ERROR:" in proc.stderr
    assert f"127.0.0.1:{REAL_PORT}: server closed the connection without a reply" \
        in proc.stderr
    assert not os.listdir(workdir)
    assert "request file is too large" in real_serverd.log_text()[before:]
