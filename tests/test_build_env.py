"""systemtap 5.x clients: the real systemtap 5.1 of Debian 13 (trixie) against our server, whose
`--build-env` holds that same Debian 13 root.

The root is made once with tools/make-build-env (mmdebstrap, a few minutes) and cached as a tarball
under $STAP_TEST_CHROOT_CACHE (default /var/cache/stap-compile-server-tests), keyed by the tool's
text, the architecture and the mirror ($STAP_TEST_MIRROR); it is unpacked once per session.  The
5.1 client runs in it (bubblewrap with the root as `/`) on host B of a two-host test network with
avahi (tests/netns.py); our servers run on host A.  The first pass 4 in the 5.1 environment probes
the kernel's configuration (a minute); the stap cache kept for the session makes later ones take
seconds.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
from netns import TestNetwork, avahi_skip_reason
from shared import (
    CLIENT,
    PYTHON,
    ROOT,
    make_sandbox,
    need_root,
    start_server,
    stop_pid,
    wait_until,
)
from test_interop import certutil_der, vermagic
from test_packaging import CACHE, remove_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIRROR = os.environ.get("STAP_TEST_MIRROR", "http://deb.debian.org/debian")
TOOL = os.path.join(ROOT, "tools", "make-build-env")
HOST_STAP = shutil.which("stap") or "/usr/bin/stap"
SCRIPT = "probe begin { exit() }"
TIMEOUT = 300  # the first pass 4 in the 5.1 environment: the kernel configuration probe
ENV_NAME = "trixie"
REFUSAL = ("this server builds modules with stap 4.8; a systemtap 5.1 client needs one built by "
           "stap 5.0 or later (its staprun cannot run the others); passes 1-3 work")


def arch():
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="session")
def trixie_tarball():
    """The Debian 13 root as a tarball: made by tools/make-build-env, or the cached one."""
    need_root()
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is not installed (tools/install-deps installs it)")
    with open(TOOL) as f:
        key = hashlib.sha256(f"{arch()} {MIRROR}\0{f.read()}".encode()).hexdigest()
    tarball = os.path.join(CACHE, f"build-env-trixie-{arch()}-{key[:12]}.tar")
    if os.path.exists(tarball):
        return tarball
    os.makedirs(CACHE, 0o755, exist_ok=True)
    work = tarball + ".tmp.tar"  # mmdebstrap picks the format from the name
    proc = subprocess.run([TOOL, "--mirror", MIRROR, work], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        with_last = (proc.stdout + proc.stderr).strip().splitlines() or ["no output"]
        pytest.skip(f"tools/make-build-env failed: {with_last[-1]}")
    os.replace(work, tarball)
    for old in glob.glob(os.path.join(CACHE, f"build-env-trixie-{arch()}-*.tar")):
        if old != tarball:
            os.unlink(old)
    return tarball


@pytest.fixture(scope="session")
def trixie_root(trixie_tarball):
    """The root unpacked for this session: owned by root, not writable by others (as the server
    wants), readable by the compile account."""
    top = tempfile.mkdtemp(prefix="stap-trixie.", dir="/var/tmp")
    os.chmod(top, 0o755)
    root = os.path.join(top, "root")
    os.mkdir(root, 0o755)
    try:
        subprocess.run(["tar", "-C", root, "-xf", trixie_tarball], check=True, timeout=600)
        yield root
    finally:
        remove_tree(top)


@pytest.fixture(scope="module")
def net():
    need_root()
    reason = avahi_skip_reason()
    if reason:
        pytest.skip(reason)
    with TestNetwork(avahi=True) as network:
        yield network


class OurServer:
    def __init__(self, host, box, pid):
        self.host, self.box, self.pid = host, box, pid
        status = json.loads(host.run(["cat", f"/run/stap-server/stap-serverd.{pid}.json"],
                                     check=True).stdout)
        self.port = status["port"]
        self.address = f"{host.address}:{self.port}"
        self.der = certutil_der(os.path.join(box.top, "server-db"))

    def logged(self, pattern):
        """The log's line matching pattern (the server writes it once the reply is sent)."""
        def find():
            with open(self.box.path("server.log")) as f:
                return re.search(pattern, f.read())
        return wait_until(find, 10, f"no log line matches {pattern}")


def start_on(host, krel, runtime, cache_dir, *extra):
    """Our server on host (every address, advertised), with its own database and log."""
    box = make_sandbox()
    srv = start_server(box, krel, runtime, "--ssl", box.path("server-db"), *extra,
                       cache=cache_dir, netns=host, timeout=120)
    return OurServer(host, box, srv.pid)


@pytest.fixture(scope="module")
def servers(net, trixie_root, krel, runtime, cache_dir):
    """On host A: `both`, with the 5.1 environment beside the host's 4.8, advertised; `host_only`,
    4.8 alone, not advertised."""
    a = net.hosts[0]
    started = []
    try:
        started.append(start_on(a, krel, runtime, cache_dir, "--build-env",
                                f"{ENV_NAME}={trixie_root}"))
        started.append(start_on(a, krel, runtime, cache_dir, "--advertise", "none"))
        yield dict(zip(["both", "host_only"], started))
    finally:
        for srv in started:
            stop_pid(srv.pid)
            shutil.rmtree(srv.box.top, ignore_errors=True)


class Client51:
    """The real systemtap 5.1 client on host B: bubblewrap with the Debian 13 root as `/`, B's
    avahi reached through its D-Bus socket, a private home (its SYSTEMTAP_DIR) as /root."""

    def __init__(self, host, root):
        self.host, self.root = host, root
        self.home = tempfile.mkdtemp(prefix="stap-51-client.")
        self.db = os.path.join(self.home, ".systemtap", "ssl", "client")

    def run(self, *args, timeout=TIMEOUT):
        argv = ["bwrap", "--die-with-parent", "--ro-bind", self.root, "/", "--proc", "/proc",
                "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
                "--ro-bind", "/run/dbus", "/run/dbus", "--bind", self.home, "/root",
                "--chdir", "/root", "--clearenv", "--setenv", "HOME", "/root",
                "--setenv", "PATH", "/usr/bin:/bin:/usr/sbin:/sbin", "--setenv", "LANG", "C.UTF-8",
                "--setenv", "SYSTEMTAP_DIR", "/root/.systemtap", "stap", *args]
        return self.host.run(argv, timeout=timeout)

    def trust(self, der):
        """Our certificate in the client's database, as stap-authorize-server-cert files it (the
        5.1 client's own --trust-servers cannot: see test_real_51_trust_servers)."""
        os.makedirs(self.db, exist_ok=True)
        path = os.path.join(self.home, "server.der")
        with open(path, "wb") as f:
            f.write(der)
        if not glob.glob(os.path.join(self.db, "cert9.db")):
            subprocess.run(["certutil", "-N", "-d", "sql:" + self.db, "--empty-password"],
                           check=True, capture_output=True, timeout=30)
        subprocess.run(["certutil", "-A", "-d", "sql:" + self.db, "-n", "stap-server", "-t",
                        "P,P,P", "-i", path], check=True, capture_output=True, timeout=30)

    def file(self, name):
        return os.path.join(self.home, name)


@pytest.fixture(scope="module")
def client51(net, trixie_root, servers):
    c = Client51(net.hosts[1], trixie_root)
    try:
        for srv in servers.values():
            c.trust(srv.der)
        yield c
    finally:
        shutil.rmtree(c.home, ignore_errors=True)


@pytest.fixture(scope="module")
def warm(client51, servers, krel):
    """One pass 4 in the 5.1 environment, so that later ones need no kernel configuration probe
    (answered from the result cache when repeated verbatim)."""
    proc = client51.run(f"--use-server={servers['both'].address}", "-r", krel, "-p4", "-m",
                        "warm51", "-e", SCRIPT)
    assert proc.returncode == 0, proc.stderr
    return proc


def stap_translator(ko):
    """The translator version a module was built by (its runtime carries it, e.g. 5.1/0.192)."""
    with open(ko, "rb") as f:
        versions = set(re.findall(rb"\b(\d+\.\d+)/0\.\d+\b", f.read()))
    assert len(versions) == 1, versions
    return versions.pop().decode()


def test_real_51_trust_servers(client51, servers):
    """The 5.1 client's --trust-servers=ssl fails at the handshake: its NSS reports our
    self-signed certificate as SEC_ERROR_UNKNOWN_ISSUER, which its bad-certificate handler does not
    offer to trust (it did the same against a certificate that 5.1's own stap-gen-cert made, by
    hand); its database gains nothing, so the administrator files the certificate instead."""
    fresh = Client51(client51.host, client51.root)
    try:
        proc = fresh.run("--trust-servers=ssl,no-prompt", f"--use-server={servers['both'].address}",
                         timeout=60)
        out = proc.stdout + proc.stderr
        assert "Adding trust in the following servers" in out, out
        assert "SEC_ERROR_UNKNOWN_ISSUER" in out, out
        fresh.trust(servers["both"].der)  # what the tests do instead
        listed = fresh.run("--list-servers=trusted", timeout=60)
        assert re.search(r'certinfo="[0-9a-f:]+"', listed.stdout + listed.stderr), listed
    finally:
        shutil.rmtree(fresh.home, ignore_errors=True)


def test_real_51_list_servers_sees_ours_online_and_trusted(client51, servers):
    """Through avahi on host B: our server on A, with the version real clients read (the host's
    stap); our stap-find-servers also shows every version it builds with (TXT versions=)."""
    srv = servers["both"]

    def listed():
        proc = client51.run("--list-servers=online,trusted", timeout=60)
        out = proc.stdout + proc.stderr
        return out if f"port={srv.port}" in out else None
    out = wait_until(listed, 30, lambda: f"our server is not listed: {listed()}")
    line = next(l for l in out.splitlines() if f"port={srv.port}" in l)
    assert f"host={srv.host.hostname}.local" in line and "version=4.8" in line, line
    ours = client51.host.run([PYTHON, CLIENT, "stap-find-servers", "--all"], env=srv.box.env,
                             timeout=60).stdout
    line = next((l for l in ours.splitlines() if f" {srv.port} " in l), ours)
    assert "'version=4.8'" in line and "'versions=4.8,5.1'" in line, line


def test_real_51_pass2(client51, servers, krel):
    proc = client51.run(f"--use-server={servers['both'].address}", "-r", krel, "-p2", "-e",
                        SCRIPT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "begin" in proc.stdout
    servers["both"].logged(r"version='5\.1' release='[^']+' env='trixie' options='-p2 ")


def test_real_51_pass4_gets_a_module_built_by_stap_51(client51, servers, krel, warm):
    proc = client51.run(f"--use-server={servers['both'].address}", "-r", krel, "-p4", "-m",
                        "m51", "-e", 'probe begin { printf("5.x\\n"); exit() }')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "m51.ko"
    ko = client51.file("m51.ko")
    assert stap_translator(ko).startswith("5.")
    assert vermagic(ko) == krel
    servers["both"].logged(r"version='5\.1' release='[^']+' env='trixie' options='-p4 -mm51 ")


def test_real_51_pass4_refused_in_one_line_without_a_5x_environment(client51, servers, krel):
    srv = servers["host_only"]
    proc = client51.run(f"--use-server={srv.address}", "-r", krel, "-p4", "-e", SCRIPT,
                        timeout=120)
    assert proc.returncode != 0
    assert REFUSAL in proc.stderr, proc.stderr
    assert [l for l in proc.stderr.splitlines() if "stap 5.0 or later" in l] == \
        [l for l in proc.stderr.splitlines() if REFUSAL in l]  # one line says it
    p2 = client51.run(f"--use-server={srv.address}", "-r", krel, "-p2", "-e", SCRIPT,
                      timeout=120)  # passes 1-3: any stap will do
    assert p2.returncode == 0, p2.stderr
    assert "begin" in p2.stdout


def test_real_48_client_still_gets_a_module_built_by_stap_48(net, servers, krel):
    """The same server that gives the 5.1 client its 5.1 module gives the host's 4.8 client a 4.8
    one."""
    b, srv = net.hosts[1], servers["both"]
    home = tempfile.mkdtemp(prefix="stap-48-client.")
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home, "LANG": "C.UTF-8",
           "SYSTEMTAP_DIR": os.path.join(home, ".systemtap")}
    try:
        trust = b.run([HOST_STAP, "--trust-servers=ssl,no-prompt", f"--use-server={srv.address}"],
                      env=env, cwd=home, timeout=60)
        assert trust.returncode == 0, trust.stderr
        proc = b.run(["nsenter", f"--wd={home}", HOST_STAP, f"--use-server={srv.address}", "-r",
                      krel, "-p4", "-m", "m48", "-e", SCRIPT], env=env, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "m48.ko"
        assert stap_translator(os.path.join(home, "m48.ko")) == "4.8"
        srv.logged(r"version='4\.8' release='[^']+' env='host' options='-p4 -mm48 ")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_real_51_client_finds_our_server_by_itself(client51, servers, krel, warm):
    """`--use-server` with no address: the 5.1 client picks our advertised server (its TXT says
    version=4.8, the host's) and gets a 5.1 module all the same (once it sees the advertisement:
    avahi takes its time on a loaded machine)."""
    def listed():
        proc = client51.run("--list-servers=online,trusted", timeout=60)
        return f"port={servers['both'].port}" in proc.stdout + proc.stderr
    wait_until(listed, 60, "the 5.1 client never saw our server advertised")
    proc = client51.run("--use-server", "-r", krel, "-p4", "-m", "found51", "-e", SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert stap_translator(client51.file("found51.ko")).startswith("5.")


def test_a_build_env_without_a_working_stap_or_writable_by_others_refuses_the_start(krel):
    """Each in one line: a root whose stap cannot run (here: an empty one), a root others may
    write."""
    need_root()
    box = make_sandbox()
    bare = tempfile.mkdtemp(prefix="stap-bare-root.", dir="/var/tmp")
    os.chmod(bare, 0o755)
    try:
        def start():
            proc = box.run("stap-start-server", "--listen", "127.0.0.1", "-r", krel, "--log",
                           box.path("server.log"), "--advertise", "none", "--build-env",
                           f"bare={bare}", timeout=60)
            assert proc.returncode != 0
            lines = proc.stderr.decode().strip().splitlines()
            assert len(lines) == 1, lines
            return lines[0]
        assert re.fullmatch(rf"stap-start-server: ERROR: --build-env bare: `stap -V` in {bare} "
                            r"failed: .+", start())
        os.chmod(bare, 0o777)
        assert start() == (f"stap-start-server: ERROR: --build-env bare={bare}: {bare} must be a "
                           "directory (not a link) owned by root or uid 0 that group and others "
                           "cannot write")
    finally:
        shutil.rmtree(bare, ignore_errors=True)
        shutil.rmtree(box.top, ignore_errors=True)
