# Ported from systemtap testsuite/systemtap.server/client.exp (cases reimplemented).
"""systemtap's client.exp: a client finds compile servers on the network,
keeps track of which it trusts for TLS and as module signers, and compiles
through them.

Upstream, as root with a clean per-user trust: list the servers already
online / trusted / trusted as signers / all (the last must be the union of
the three), start a server (it is trusted at once by the user that started
it) and see it appear online and trusted but not as a signer; compile
hello.stp through a server found automatically; revoke the trust by host
name (gone from the trusted list), reinstate it by IP address (back, and the
same as before); in a mount namespace over /etc/systemtap, trust the server
as a signer by certificate serial (a new signer there, none outside); for
--unprivileged, --privilege=stapusr and --privilege=stapsys compile
hello.stp by HOST:PORT (a stap_*.ko line, the module and its .sgn) and
run it in the namespace as the optional stapusr / stapsys users; revoke the
signer there by serial (gone from the signer list), after which the stapsys
module no longer runs (upstream marks that last load an expected failure:
the expectation is that it is refused).

Lanes: the real 4.8 client against our server (`stap --list-servers=...`,
`stap --trust-servers=...`, `stap --use-server...`); our commands against
our server (stap-find-servers --all, whose 'trust=' field says ssl and
signer; stap-add-server-cert HOST / --signer / --revoke SERIAL DB;
stap-client); the real client against the real stap-serverd 4.8.

Adaptations: no avahi may run in this machine's network namespace, so each
lane gets a private network namespace with its own avahi-daemon
(tests/netns.py), its own /etc/systemtap (a throw-away directory mounted
over it there, so that root's global trust is the lane's) and the server
inside it; the signer "namespace" is a further mount namespace inside
that.  The real stap-serverd cannot run as root, so root does not trust it
by having started it: root trusts it once it is started
(`stap --trust-servers=ssl,no-prompt`), before the "after start" lists.
Our commands name a certificate to revoke by serial (not by host name) and
fetch a signer's certificate by host name (not by serial): each is used its
own way.  Pass 5 becomes -p4 and staprun's run becomes "staprun accepted
the module and asked the kernel" (modules cannot be loaded here); scratch
users stand for upstream's optional stapusr and stapsys users; `-r KREL`."""

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile

import pytest
from netns import TestNetwork, avahi_skip_reason
from shared import (
    CLIENT,
    PYTHON,
    fixed_runtime_for,
    make_sandbox,
    read_text,
    start_server,
    stop_pid,
    wait_until,
)
from upstream_helpers import (  # noqa: F401  (stap_users: a fixture)
    REAL_PORT,
    REAL_SERVERD,
    STAP,
    complete_der,
    modules_in,
    prepare_for_staprun_48,
    real_client_env,
    stap_users,
    staprun_accepted,
    vermagic,
    with_etc,
    write_scripts,
)

pytestmark = pytest.mark.upstream

LANES = ["real-client", "our-client", "real-server"]
PRIVILEGES = ["--unprivileged", "--privilege=stapusr", "--privilege=stapsys"]


class World:
    """One lane: an avahi host, its /etc/systemtap, the server, the client."""

    def __init__(self, lane, krel, runtime, cache_dir, shared_dir):
        self.lane, self.krel, self.runtime = lane, krel, runtime
        self.cache_dir, self.shared_dir = cache_dir, shared_dir
        self.stack = contextlib.ExitStack()
        self.top = tempfile.mkdtemp(prefix=f"stap-upstream-client.{lane}.")
        os.chmod(self.top, 0o755)
        self.stack.callback(shutil.rmtree, self.top, True)
        self.net = self.stack.enter_context(TestNetwork(avahi=True, single=True))
        self.host = self.net.hosts[0]
        self.box = make_sandbox()
        self.stack.callback(shutil.rmtree, self.box.top, True)
        self.etc = os.path.join(self.box.sysconfdir, "systemtap")  # the lane's /etc/systemtap
        os.makedirs(self.etc, 0o755, exist_ok=True)
        mount = self.host.run(["mount", "--bind", self.etc, "/etc/systemtap"])
        assert mount.returncode == 0, mount.stderr
        self.ns_etc = os.path.join(self.top, "ns-etc", "systemtap")  # the signer namespace's
        os.makedirs(self.ns_etc, 0o755)
        os.chmod(os.path.dirname(self.ns_etc), 0o755)
        self.real_env = real_client_env(self.top)
        self.scripts = write_scripts(os.path.join(self.top, "scripts"))
        self.pid = self.port = None
        self.state = {}

    def close(self):
        if self.pid:
            stop_pid(self.pid)
        self.stack.close()

    # -- the server -----------------------------------------------------------

    def start_server(self):
        if self.lane == "real-server":
            home = os.path.join(self.shared_dir, "upstream-real-serverd")
            os.makedirs(home, 0o700, exist_ok=True)
            nobody = pwd.getpwnam("nobody")
            os.chown(home, nobody.pw_uid, nobody.pw_gid)
            log = os.path.join(home, f"client-exp.{os.getpid()}.log")
            self.stack.callback(lambda: os.path.exists(log) and os.unlink(log))
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env",
                    "-i", "PATH=/usr/bin:/bin", f"HOME={home}",
                    f"SYSTEMTAP_DIR={home}/.systemtap", "LANG=C.UTF-8", REAL_SERVERD,
                    "--port", str(REAL_PORT), "-r", self.krel, "--log", log]
            fixed = fixed_runtime_for(self.krel, self.shared_dir)  # ours needs no -R
            argv += ["-R", fixed] if fixed else []
            proc = self.host.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            self.pid, self.port = proc.pid, REAL_PORT
            wait_until(lambda: complete_der(f"{home}/.systemtap/ssl/server/stap.cert")
                       and "Adding Avahi service" in read_text(log), 60,
                       lambda: "the real server did not start: " + read_text(log))
            # adaptation: root did not start it, so root trusts it now
            trust = self.real(["--trust-servers=ssl,no-prompt",
                               f"--use-server=127.0.0.1:{REAL_PORT}"])
            assert trust.returncode == 0, trust.stderr
            return
        srv = start_server(self.box, self.krel, self.runtime, cache=self.cache_dir,
                           netns=self.host, advertise="avahi")
        self.pid, self.port = srv.pid, srv.port

    # -- clients --------------------------------------------------------------

    def real(self, args, ns=False, cwd=None, user=None, timeout=300):
        argv = [STAP, *args]
        if ns:
            argv = with_etc(self.ns_etc, argv, user)
        return self.host.run(["sh", "-c", 'cd "$0" && exec "$@"', cwd or self.top, *argv],
                             env=self.real_env, timeout=timeout)

    def ours(self, command, args, ns=False, cwd=None, timeout=300):
        argv = [PYTHON, CLIENT, command, *args]
        env = dict(self.box.env)
        if ns:  # inside the namespace, the sysconfdir is /etc itself
            argv = with_etc(self.ns_etc, argv)
            env["STAP_SYSCONFDIR"] = "/etc"
        return self.host.run(["sh", "-c", 'cd "$0" && exec "$@"', cwd or self.top, *argv],
                             env=env, timeout=timeout)

    def list_servers(self, kind, ns=False):
        """upstream's list_servers: the servers of KIND, one string each
        (the real client's " host=..." lines; for our stap-find-servers,
        its lines without the trust field, kept by what that field says, and without the load
        hint, which changes between two listings as compiles come and go)."""
        if self.lane != "our-client":
            proc = self.real([f"--list-servers={kind}"], ns=ns, timeout=150)
            assert proc.returncode == 0, proc.stderr
            lines = (proc.stdout + proc.stderr).splitlines()  # 4.8 writes it to stderr
            odd = [l for l in lines if not (l.startswith(" host=") or
                                            l == f"Systemtap Compile Server Status for '{kind}'"
                                            or l == "No servers found"
                                            or l.startswith("No certificate found in database"))]
            assert not odd, f"unexpected output of --list-servers={kind}: {odd}"
            return {l.strip() for l in lines if l.startswith(" host=")}
        proc = self.ours("stap-find-servers", ["--all"], ns=ns, timeout=150)
        found = set()
        for line in proc.stdout.splitlines():
            trust = (re.search(r"'trust=([^']*)'", line) or [None, ""])[1].split(",")
            kinds = set(kind.split(","))
            if ("trusted" in kinds and "ssl" not in trust) or \
                    ("signer" in kinds and "signer" not in trust):
                continue
            found.add(re.sub(r" '(?:trust|busy|compile|queued)=[^']*'", "", line))
        return found

    def field(self, entry, name):
        if self.lane == "our-client":
            host, address, port = entry.split()[:3]
            certinfo = re.search(r"'certinfo=([^']*)'", entry)[1]
            return {"host": host, "address": address, "port": port, "certinfo": certinfo}[name]
        return re.search(rf"\b{name}=\"?([^\" ]*)", entry)[1]


@pytest.fixture(scope="module")
def worlds(krel, runtime, cache_dir, shared_dir):
    reason = avahi_skip_reason()
    if reason:
        pytest.skip(reason)
    made = {}

    def get(lane):
        if lane not in made:
            made[lane] = World(lane, krel, runtime, cache_dir, shared_dir)
        return made[lane]

    yield get
    for world in made.values():
        world.close()


def stable(world, kind):
    """upstream lists the online servers until two lists agree (at most 10)."""
    last = world.list_servers(kind)
    for _ in range(10):
        now = world.list_servers(kind)
        if now == last:
            return now
        last = now
    pytest.fail(f"List existing {kind} servers: never got stable")


def need(world, *keys):
    missing = [k for k in keys if k not in world.state]
    if missing:
        pytest.skip(f"an earlier step did not get {', '.join(missing)}")
    return [world.state[k] for k in keys]


@pytest.mark.parametrize("lane", LANES)
def test_existing_servers(worlds, lane):
    """Before our server: the existing online / trusted / signer / all lists;
    all must be the union of the other three."""
    w = worlds(lane)
    online = stable(w, "online")
    trusted = w.list_servers("trusted")
    signers = w.list_servers("signer")
    every = w.list_servers("all")
    assert every == online | trusted | signers, (every, online, trusted, signers)
    w.state.update(online=w.list_servers("online"), trusted=trusted, signers=signers)


@pytest.mark.parametrize("lane", LANES)
def test_new_server_online_and_trusted(worlds, lane):
    w = worlds(lane)
    existing_online, existing_trusted, existing_signers = need(w, "online", "trusted",
                                                                "signers")
    w.start_server()
    new_online = wait_until(lambda: w.list_servers("online") - existing_online, 15,
                            "New online servers: none")
    new_trusted = w.list_servers("online,trusted") - existing_trusted
    assert new_trusted, "New trusted servers: none"
    assert new_trusted <= new_online, ("Verify new trusted server list", new_trusted,
                                       new_online)
    assert w.list_servers("signer") == existing_signers, "No new signing servers"
    ours = sorted(new_trusted)[0]
    assert re.match(r"^\S+", w.field(ours, "host")), "Server has host name"
    w.state.update(ours=new_trusted, entry=ours, port=w.field(ours, "port"))


@pytest.mark.parametrize("lane", LANES)
def test_hello_from_server(worlds, lane, krel):
    """hello.stp (pass 5, here -p4) through a server found automatically."""
    w = worlds(lane)
    need(w, "entry")
    cwd = tempfile.mkdtemp(dir=w.top)
    hello = os.path.join(w.scripts, "hello.stp")
    if lane == "our-client":
        proc = w.ours("stap-client", ["-r", krel, "-p4", hello], cwd=cwd)
    else:
        proc = w.real(["-r", krel, "-p4", hello, "--use-server"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    mods = modules_in(cwd)
    assert len(mods) == 1 and vermagic(os.path.join(cwd, mods[0])) == krel, mods


@pytest.mark.parametrize("lane", [
    pytest.param("real-client", marks=pytest.mark.xfail(strict=True, reason=(
        "SPEC section 3: a root server trusts itself in the global client database, so every "
        "user's clients trust it at once; the real client's per-user revocation leaves that "
        "trust (the real server trusts itself in its user's own database only)"))),
    "our-client", "real-server"])
def test_revoke_and_reinstate(worlds, lane):
    """Revoke trust by host name (ours: by serial), then reinstate it by IP
    address: the trusted list goes back to the existing one, then gains the
    server again, the same as before."""
    w = worlds(lane)
    existing_trusted, ours, entry = need(w, "trusted", "ours", "entry")
    if lane == "our-client":
        db = os.path.join(w.box.sysconfdir, "systemtap", "ssl", "client")
        proc = w.ours("stap-add-server-cert", ["--revoke", w.field(entry, "certinfo"), db])
    else:
        proc = w.real(["--trust-servers=ssl,revoke,no-prompt",
                       f"--use-server={w.field(entry, 'host')}"], timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # upstream's subtests go on after a failure: the reinstatement runs anyway
    after_revoke = w.list_servers("trusted")
    address = w.field(entry, "address")
    assert address, "Server has ip address"
    if lane == "our-client":
        proc = w.ours("stap-add-server-cert", ["--yes", address])
    else:
        proc = w.real(["--trust-servers=no-prompt", f"--use-server={address}"], timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new_trusted = w.list_servers("online,trusted") - existing_trusted
    assert after_revoke == existing_trusted, \
        f"No longer trusted after revocation by host name: still {after_revoke - existing_trusted}"
    assert new_trusted, "New trusted servers after reinstatement by ip address: none"
    assert new_trusted == ours, "New trusted servers matches after reinstatement by ip address"


@pytest.mark.parametrize("lane", LANES)
def test_signer_in_a_namespace(worlds, lane):
    """Trust the server as a signer by certificate serial (ours: by host
    name) in a mount namespace: a new signer there, none outside."""
    w = worlds(lane)
    existing_signers, entry = need(w, "signers", "entry")
    serial = w.field(entry, "certinfo")
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2})*", serial), "Server has certificate serial"
    ns_existing = w.list_servers("signer", ns=True)
    assert ns_existing == set(), "Namespace existing signer servers"
    if lane == "our-client":
        proc = w.ours("stap-add-server-cert", ["--signer", "--yes", w.field(entry, "host")],
                      ns=True)
    else:
        proc = w.real(["--trust-servers=signer,no-prompt", f"--use-server={serial}"],
                      ns=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # Adding trusted signer
    assert os.path.isdir(os.path.join(w.ns_etc, "staprun")), \
        f"New namespace signing servers: none; the client said: {proc.stdout + proc.stderr}"
    prepare_for_staprun_48(w.ns_etc)
    ns_new = w.list_servers("online,signer", ns=True) - ns_existing
    assert ns_new, "New namespace signing servers: none"
    assert w.list_servers("online,signer") - existing_signers == set(), "New signing servers"
    port = w.field(sorted(ns_new)[0], "port")
    assert port.isdigit(), "Server has port number"
    w.state.update(port=port, serial=serial, signer=True)


@pytest.mark.parametrize("privilege", PRIVILEGES)
@pytest.mark.parametrize("lane", LANES)
def test_compile_with_privilege(worlds, stap_users, lane, privilege, krel):
    """-p4 PRIVILEGE hello.stp by HOST:PORT: a stap_*.ko line, the module and
    its .sgn; then (in the namespace) staprun as the stapusr user (the
    stapsys user for --privilege=stapsys) accepts it."""
    w = worlds(lane)
    entry, port = need(w, "entry", "port")
    server = f"{w.field(entry, 'host')}:{port}"
    cwd = tempfile.mkdtemp(dir=w.top)
    os.chmod(cwd, 0o755)
    hello = os.path.join(w.scripts, "hello.stp")
    if lane == "our-client":
        proc = w.ours("stap-client", [f"--server={server}", "-r", krel, "-p4", privilege,
                                      hello], cwd=cwd)
    else:
        proc = w.real(["-r", krel, "-p4", privilege, hello, f"--use-server={server}"],
                      cwd=cwd)
    names = re.findall(r"^(stap_\S*\.ko)$", proc.stdout, re.M)
    assert proc.returncode == 0 and names, proc.stdout + proc.stderr
    module = os.path.join(cwd, names[0])
    assert os.path.isfile(module), "Module was created"
    assert os.path.isfile(module + ".sgn"), "Module was signed"
    for name in os.listdir(cwd):
        os.chmod(os.path.join(cwd, name), 0o644)
    w.state["module", privilege] = module
    if not w.state.get("signer"):
        pytest.fail("Load and run signed module when trusted: the server is not a trusted "
                    "signer in the namespace (the signer step failed in this lane)")
    user = stap_users["stapsys" if privilege == "--privilege=stapsys" else "stapusr"]
    run = w.host.run(with_etc(w.ns_etc, ["staprun", module], user), timeout=60)
    said = run.stdout + run.stderr
    assert staprun_accepted(said), f"Load and run signed module when trusted: {said}"


@pytest.mark.parametrize("lane", LANES)
def test_revoke_signer(worlds, stap_users, lane):
    """Revoke the signer by serial in the namespace: gone from the signer
    list there, and the stapsys module is refused."""
    w = worlds(lane)
    serial, entry, _ = need(w, "serial", "entry", "signer")
    if lane == "our-client":
        proc = w.ours("stap-add-server-cert", ["--revoke", serial, "/etc/systemtap/staprun"],
                      ns=True)
    else:
        proc = w.real(["--trust-servers=revoke,signer,no-prompt", f"--use-server={serial}"],
                      ns=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # Revoking trusted signer
    assert w.list_servers("signer", ns=True) == set(), \
        "No longer trusted as a signer after revocation"
    module = w.state.get(("module", "--privilege=stapsys"))
    if not module:
        pytest.skip("no stapsys module was built in this lane")
    run = w.host.run(with_etc(w.ns_etc, ["staprun", module], stap_users["stapsys"]),
                     timeout=60)
    said = run.stdout + run.stderr
    assert not staprun_accepted(said), f"Load and run signed module when not trusted: {said}"
