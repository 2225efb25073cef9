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
- silent connections from one address, megabyte arguments, weak TLS,
  and every resource limit of a compile."""

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

import conftest
import pytest
from hardening_helpers import (
    assert_serves,
    base_entries,
    frame,
    parse_reply,
    raw_exchange,
    request_dirs,
    request_lines,
    server_tmpdir,
    stand_in_stap as stand_in,
    wait_request_lines,
    zip_bytes,
)

COMPILE_ACCOUNT = "stap-compile"
UNIT_ACCOUNT = "stap-server"  # what the package's unit runs as (User=stap-server)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: other accounts, root-only files")


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
# What the compile step sees: a stand-in stap reports it
# --------------------------------------------------------------------------

PROBE = """
report() {  # PATH: absent, or what it holds and whether it can be written
  p=$1
  if [ ! -e "$p" ] && [ ! -L "$p" ]; then echo "probe $p absent"; return; fi
  if [ -d "$p" ]; then n=$(ls -A "$p" 2>/dev/null | wc -l); what="entries=$n"
       w=$( (touch "$p/.probe" 2>/dev/null && echo write=yes) || echo write=no)
  else n=$(cat "$p" 2>/dev/null | wc -c); what="bytes=$n"
       w=$( (: >> "$p" 2>/dev/null && echo write=yes) || echo write=no); fi
  echo "probe $p $what $w"
}
for p in {paths}; do report "$p"; done
echo "uid=$(id -u)"
echo "pids=$(ls /proc | grep -c '^[0-9]')"
if python3 -c 'import socket; socket.create_connection(("127.0.0.1", {port}), 2)' 2>/dev/null
then echo network=yes; else echo network=no; fi
( : > /stap-probe-root ) 2>/dev/null && echo rootfs=writable || echo rootfs=readonly
( : > /usr/stap-probe ) 2>/dev/null && echo usr=writable || echo usr=readonly
( : > "$PWD/tmp/probe" ) && echo work=writable
"""


def server_paths(box, srv, tmpdir):
    """The server's own files and directories, as an attacker would aim (stap's knowledge in
    --cache-dir, and where compiles used to share stap's cache, included)."""
    db = srv.status["database"]
    cache = os.path.join(box.systemtap_dir, "compile-cache") if box.user else \
        "/var/cache/stap-server"
    return [db, os.path.join(db, "key4.db"), os.path.join(db, "cert9.db"), srv.log,
            os.path.dirname(conftest.status_file(box, srv.pid)), tmpdir,
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


@pytest.mark.parametrize("who", ["root", "staptest", "unit account"])
def test_compile_step_sees_nothing_of_the_server(who, servers, krel):
    """Root's server keeps its database under /etc (the packaged default is
    /etc/systemtap/ssl/server); the others under their own homes."""
    user = {"root": None, "staptest": conftest.TEST_USER, "unit account": UNIT_ACCOUNT}[who]
    if user == UNIT_ACCOUNT:
        ensure_unit_account()
    box = conftest.make_sandbox(user)
    etc_db = f"/etc/stap-test-{uuid.uuid4().hex[:8]}/ssl/server"
    extra = ["--ssl", etc_db] if user is None else []
    tmpdir = server_tmpdir(box)
    try:
        box.env["SYSTEMTAP_STAP"] = stand_in(box, "echo placeholder\n")
        srv = servers.start(box, krel, None, "--tmpdir", tmpdir, *extra)
        paths = server_paths(box, srv, tmpdir)
        stand_in(box, PROBE.replace("{paths}", " ".join(paths))
                 .replace("{port}", str(srv.port)))
        proc = client(box, srv, "-r", krel, "-p2", "-e", "probe begin { exit() }")
        assert proc.returncode == 0, text(proc)
        out = proc.stdout.decode()
        assert_sees_nothing(out, paths)
        uid = pwd.getpwnam(user or COMPILE_ACCOUNT).pw_uid
        assert f"uid={uid}" in out, out
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

SWAPS = """
case "$*" in
  *LINK_KO*) ln -s {secret}/secret.ko tmp/evil.ko ;;
  *LINK_TMP*) mv tmp tmp.old && ln -s {secret} tmp ;;
  *FIFO_KO*) mkfifo tmp/evil.ko ;;
  *HARD_SWAP*) ln -s {secret} sub; ln -s {secret}/f1 stdout; ln -s {attacker} response
               for i in $(seq 200); do mkdir -p "d$i"; ln -s {secret} "d$i/x"; done ;;
  *) exec /usr/bin/stap "$@" ;;
esac
echo "$PWD/tmp/evil.ko"
exit 0
"""


@pytest.mark.parametrize("swap", ["LINK_KO", "LINK_TMP", "FIFO_KO", "HARD_SWAP"])
def test_hostile_compile_cannot_reach_root_files(swap, servers, sandbox, krel, secret_dir,
                                                 attacker_dir):
    sandbox.env["SYSTEMTAP_STAP"] = stand_in(
        sandbox, SWAPS.replace("{secret}", secret_dir[0]).replace("{attacker}", attacker_dir))
    srv = servers.start(sandbox, krel, None, "--tmpdir", server_tmpdir(sandbox))
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e", f"probe begin {{ /* {swap} */ }}")
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


ATTACKER = r"""
import glob, os, sys, time
tmpdir, secret, mine, until = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
tries = swaps = 0
def swap(link, target):
    global swaps
    try:
        if os.path.lexists(link) and not os.path.isdir(link):
            os.unlink(link)
        os.symlink(target, link)
        swaps += 1
    except OSError:
        pass
while time.time() < until:
    tries += 1
    reqs = glob.glob(os.path.join(tmpdir, "stap-server.*"))
    for pid in os.listdir("/proc"):  # the compile's own view: /proc/PID/cwd
        if pid.isdigit():
            reqs.append(f"/proc/{pid}/cwd/..")
    for req in reqs:
        for name in ("stdout", "stderr", "response", "response.jar"):
            swap(os.path.join(req, name), os.path.join(secret, "f1"))
        for ko in glob.glob(os.path.join(req, "work", "tmp", "*.ko")) + \
                glob.glob(os.path.join(req, "work", "tmp", "*.ko.sgn")):
            swap(ko, os.path.join(secret, "secret.ko"))
        swap(os.path.join(req, "work", "tmp"), secret)
        swap(os.path.join(req, "work", "response"), mine)
    time.sleep(0.001)
print(f"attacker: {tries} rounds, {swaps} swaps")
"""

SLOW_MODULE = """
sleep 0.3
head -c 4096 /dev/urandom > tmp/stap_real.ko
sleep 0.3
echo "$PWD/tmp/stap_real.ko"
"""


def test_compile_account_attacking_all_along(servers, sandbox, krel, secret_dir, attacker_dir):
    """A process of the compile account, outside any sandbox, swaps every
    name it can reach in every request directory for links to root-only
    files while ten compiles run: no reply carries a root-only byte, nothing
    is chowned, root writes nothing into the attacker's directory."""
    tmpdir = server_tmpdir(sandbox)
    sandbox.env["SYSTEMTAP_STAP"] = stand_in(sandbox, SLOW_MODULE)
    srv = servers.start(sandbox, krel, None, "--tmpdir", tmpdir)
    script = sandbox.path("attacker.py")
    with open(script, "w") as f:
        f.write(ATTACKER)
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

TROJAN = b"TROJAN-MODULE-" + uuid.uuid4().hex.encode()

# Everything outside /proc, /sys, /dev and the read-only system directories (read-only binds, as
# test_compile_step_sees_nothing_of_the_server shows) that the compile can write: every module,
# C file and header is overwritten, and a module is planted in every directory.
SPREAD = """
case "$*" in
  *SPREAD*) ;;
  *) exec /usr/bin/stap "$@" ;;
esac
find / \\( -path /proc -o -path /sys -o -path /dev -o -path /usr -o -path /etc -o -path /lib \\
         -o -path /lib32 -o -path /lib64 -o -path /libx32 -o -path /bin -o -path /sbin \\) \\
     -prune -o -writable -print 2>/dev/null > /tmp/writable
while read -r p; do
  if [ -d "$p" ]; then printf '{trojan}' > "$p/stap_planted.ko" && echo "planted in $p"
  else case "$p" in *.ko|*.c|*.h) printf '{trojan}' > "$p" && echo "overwrote $p";; esac; fi
done < /tmp/writable
exit 1
"""


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
    sandbox.env["SYSTEMTAP_STAP"] = stand_in(sandbox, SPREAD.replace("{trojan}", TROJAN.decode()))
    srv = servers.start(sandbox, krel, runtime, cache=cache)
    script = 'probe begin { println("victim") exit() }'
    victim = ["-r", krel, "-p4", "--privilege=stapusr", "-e", script]
    proc = client(sandbox, srv, *victim, env={"LANG": "C.UTF-8"}, timeout=600)
    assert proc.returncode == 0, text(proc)
    knowledge = knowledge_files(cache, krel)
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e", "probe begin { /* SPREAD */ }",
                  timeout=300)
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
    """Two real -p4 compiles of new scripts succeed; at most the first waits
    for a warm-up, the second and a restarted server's compile reuse its
    knowledge: files of the server's own, read-only to the compile account."""
    srv = servers.start(sandbox, krel, runtime, cache=cache_dir)
    before = None
    for n in range(2):
        proc = client(sandbox, srv, "-r", krel, "-p4", "-m", f"fresh{n}", "-e",
                      f'probe begin {{ printf("{uuid.uuid4().hex}\\n") exit() }}', timeout=600)
        assert proc.returncode == 0, text(proc)
        assert os.path.exists(sandbox.path(f"fresh{n}.ko"))
        before = warm_ups(srv) if before is None else before
    assert before <= 1 and warm_ups(srv) == before, "the second compile warmed up again"
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
        conftest.wait_until(lambda: re.search(r"dropped \d+ connections from 127\.0\.0\.2",
                                              open(srv.log).read()), 10, "no drop logged")
    finally:
        for s in held:
            s.close()
    assert_serves(sandbox, srv, krel)


def test_megabyte_arguments_get_rc_1_and_a_short_log_line(servers, sandbox, krel):
    """16 arguments of 1 MiB (18 KB compressed): a signed rc 1 reply that
    says why.  Six of 100 KB, which stap takes: the log line is cut to
    under 2 KB with the original length noted.  The log barely grows."""
    srv = servers.start(sandbox, krel, None)
    before = os.path.getsize(srv.log)
    huge = [f"-D{'a' * ((1 << 20) - 16)}=1" for _ in range(16)]
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

BREACHES = """
case "$*" in
  *FILE_SIZE*) head -c 3000000 /dev/zero > tmp/big ;;
  *MEMORY*) python3 -c 'bytearray(600 << 20)' ;;
  *PROCESSES*) for i in $(seq 40); do sleep 3 & done; wait ;;
  *CPU*) while :; do :; done ;;
  *DISK*) for i in $(seq 60); do head -c 900000 /dev/zero > tmp/f$i; sleep 0.05; done ;;
esac
exit 1
"""

LIMITS = {"FILE_SIZE": ("file size", "--compile-file-size", 2 << 20, " bytes"),
          "MEMORY": ("memory", "--compile-memory", 256 << 20, " bytes"),
          "PROCESSES": ("processes", "--compile-processes", 16, ""),
          "CPU": ("cpu", "--compile-cpu", 1, " s"),
          "DISK": ("disk", "--compile-disk", 8 << 20, " bytes")}


@pytest.fixture(scope="module")
def limited_server(krel):
    box = conftest.make_sandbox()
    box.env["SYSTEMTAP_STAP"] = stand_in(box, BREACHES)
    args = [x for _, option, value, _ in LIMITS.values() for x in (option, str(value))]
    srv = conftest.start_server(box, krel, None, "--tmpdir", server_tmpdir(box), *args)
    yield box, srv
    srv.stop()
    shutil.rmtree(box.top, ignore_errors=True)


@pytest.mark.parametrize("breach", list(LIMITS))
def test_each_resource_limit_is_named(breach, limited_server, krel):
    box, srv = limited_server
    name, option, value, unit = LIMITS[breach]
    started = time.monotonic()
    proc = client(box, srv, "-r", krel, "-p2", "-e", f"probe begin {{ /* {breach} */ }}")
    assert proc.returncode == 1, text(proc)
    assert (f"stap-serverd: ERROR: the compile exceeded its {name} limit ({value}{unit}, {option})"
            in proc.stderr.decode()), text(proc)
    assert time.monotonic() - started < 30
    assert request_dirs(server_tmpdir(box)) == []


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
    staptest = conftest.ensure_test_user()

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
