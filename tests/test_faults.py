"""Spec section 9, faults: a server killed mid-request, a stap run over
--compile-timeout, a full disk under the request directory, and hostile
replies (tampered signed entry, unsigned extra entry, traversal path) from
a fake TLS server that the client trusts.  The server's stap is the real
one, behind a stand-in ($SYSTEMTAP_STAP) that is slow only for scripts
marked SLOWPROBE; staprun is the conftest stand-in."""

import io
import os
import signal
import subprocess
import time
import uuid
import zipfile

import pytest
import shared
from hardening_helpers import (
    NORMAL_SCRIPT,
    assert_serves,
    base_entries,
    frame,
    parse_reply,
    raw_exchange,
    request_dirs,
    request_lines,
    server_db,
    server_tmpdir,
    stand_in_program,
    wait_request_lines,
    zip_bytes,
)

import stap_server

pytestmark = pytest.mark.integration

SLOW_SCRIPT = "probe begin { /* SLOWPROBE */ exit() }"

@pytest.fixture
def slow_stap(sandbox):
    """(stand-in path, mark); whatever it left running is killed after."""
    shared.need_root()
    script = stand_in_program(sandbox, "stap_sleeping_group.sh")
    mark = script  # what it marks its processes with: its path, the sandbox's own
    yield script, mark
    shared.stop_pid(*marked_pids(mark), timeout=0)  # SIGKILL what did not end at once


def marked_pids(mark):
    """Host pids of the processes whose environment carries the mark."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if f"STAP_TEST_MARK={mark}".encode() in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                continue
    return [p for p in found if shared.pid_alive(p)]


def wait_for_marked(mark, count=2, timeout=150):
    """The stand-in and its sleeping child, once both run (a request for a module first waits for
    the server's warm-up of the kernel's knowledge: the stand-in is a stap of its own)."""
    return shared.wait_until(lambda: len(marked_pids(mark)) >= count and marked_pids(mark),
                             timeout, f"the stand-in stap never started ({mark})")


def start_with_stap(servers, box, krel, stap, *extra):
    """A server whose compile runs go through the stand-in stap."""
    box.env["SYSTEMTAP_STAP"] = stap
    try:
        return servers.start(box, krel, None, "--tmpdir", server_tmpdir(box), *extra)
    finally:
        del box.env["SYSTEMTAP_STAP"]


def client_tmp(box):
    path = box.path(f"client-tmp-{uuid.uuid4().hex[:6]}")
    os.makedirs(path, 0o700)
    return path


def forget_killed_server(box, srv):
    """A SIGKILLed server leaves its status file and request directory."""
    try:
        os.unlink(shared.status_file(box, srv.pid))
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------
# Server killed mid-request
# --------------------------------------------------------------------------

def run_client_killing(box, krel, srv_to_kill, mark, servers_args, env, pass_args=("-p2",)):
    """Start stap-client on a SLOWPROBE script, SIGKILL srv_to_kill once its
    compile runs, return the client's CompletedProcess-like result."""
    argv = [shared.PYTHON, shared.CLIENT, "stap-client", *servers_args,
            "-r", krel, *pass_args, "-e", SLOW_SCRIPT]
    proc = subprocess.Popen(argv, env={**box.env, **env}, cwd=box.top,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_marked(mark)
        os.kill(srv_to_kill.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        shared.stop_pid(proc, timeout=0)
    return proc.returncode, out, err.decode(errors="replace")


def test_server_killed_client_fails_over(servers, sandbox, krel, slow_stap, staprun):
    box = sandbox
    stap, mark = slow_stap
    first = start_with_stap(servers, box, krel, stap)
    second = servers.start(box, krel, None)
    tmp = client_tmp(box)
    started = time.monotonic()
    rc, out, err = run_client_killing(
        box, krel, first, mark, [f"--server={first.address}", f"--server={second.address}"],
        {"TMPDIR": tmp})
    forget_killed_server(box, first)
    assert rc == 0, err
    assert b"begin" in out  # the second server's -p2 output
    assert f"{first.address}: server closed the connection without a reply" in err \
        or f"{first.address}: transfer failed" in err, err
    assert time.monotonic() - started < 40
    assert os.listdir(tmp) == [], "stap-client left temporary files"
    assert not shared.pid_alive(first.pid)


def test_server_killed_single_server_exits_1(servers, sandbox, krel, slow_stap, staprun):
    box = sandbox
    stap, mark = slow_stap
    srv = start_with_stap(servers, box, krel, stap)
    tmp = client_tmp(box)
    env, record = staprun
    rc, _out, err = run_client_killing(box, krel, srv, mark,  # the deadline leaves room to retry
                                      [f"--server={srv.address}", "--deadline=60"],
                                      {**env, "TMPDIR": tmp}, pass_args=())
    forget_killed_server(box, srv)
    assert rc == 1, err
    assert err.strip().splitlines()[-1].startswith(
        f"stap-client: ERROR: no server could compile the script ({srv.address}: "), err
    assert "without a reply" in err or "transfer failed" in err, err
    # It tried again until its deadline: the last round found nobody listening.
    assert "Connection refused" in err.strip().splitlines()[-1], err
    assert not os.path.exists(record + ".args"), "staprun ran"
    assert os.listdir(tmp) == [], "stap-client left temporary files"


# --------------------------------------------------------------------------
# Compile timeout
# --------------------------------------------------------------------------

def test_compile_timeout_kills_the_process_group(servers, sandbox, krel, slow_stap):
    box = sandbox
    stap, mark = slow_stap
    srv = start_with_stap(servers, box, krel, stap, "--compile-timeout", "2")
    started = time.monotonic()
    proc = box.run("stap-client", f"--server={srv.address}", "-r", krel, "-p2",
                   "-e", SLOW_SCRIPT, timeout=60)
    took = time.monotonic() - started
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    assert "stap-serverd: ERROR: the compile exceeded its wall-clock limit (2 s, " \
        "--compile-timeout)" in err, err
    assert took < 20
    shared.wait_until(lambda: not marked_pids(mark), 5,
                      "the stand-in or its child (same process group) survived")
    lines = request_lines(srv)
    assert "rc=1" in lines[-1], lines[-1]
    assert request_dirs(server_tmpdir(box)) == []
    assert_serves(box, srv, krel)  # through the stand-in, to the real stap


# --------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------

def test_full_disk_for_request_directory(servers, sandbox, krel):
    shared.need_root()
    box = sandbox
    small = box.path("small-tmp")
    os.makedirs(small)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", small],
                   check=True)
    try:
        srv = servers.start(box, krel, None, "--tmpdir", small)
        big = zip_bytes(base_entries(krel) + [("tapset/big.stp", os.urandom(2 << 20))],
                        zipfile.ZIP_STORED)
        got = raw_exchange(box, srv.port, frame(big), timeout=30)
        # the request does not fit above the free-space floor: a busy reply, before it is
        # written anywhere (another server may have room), and the log says why
        rc, stderr, _ = parse_reply(got)
        assert rc == 1 and "server busy" in stderr and "bytes free" in stderr, stderr
        lines = wait_request_lines(srv, 1)  # logged once the connection is closed
        assert "--tmpdir-min-free" in lines[-1], lines[-1]
        assert request_dirs(small) == []
        assert_serves(box, srv, krel)  # the same server, same small disk
        assert request_dirs(small) == []

        # Completely full: not even a reply fits.  The connection fails
        # (or gets rc 1); once there is room again the server serves.
        filler = os.path.join(small, "filler")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        proc = box.run("stap-client", f"--server={srv.address}", "--deadline=2", "-r", krel,
                       "-p2", "-e", NORMAL_SCRIPT, timeout=60)  # it retries till then
        assert proc.returncode == 1
        assert b"stap-client: ERROR: " in proc.stderr
        assert shared.pid_alive(srv.pid)
        os.unlink(filler)
        assert request_dirs(small) == []
        assert_serves(box, srv, krel)
        srv.stop()
    finally:
        subprocess.run(["umount", small], check=True)


# --------------------------------------------------------------------------
# Hostile replies from a fake server the client trusts
# --------------------------------------------------------------------------

class FakeServer:
    """A TLS server (python-nss, in its own process: NSS state is per
    process) with the sandbox's server key, answering one request with
    fixed reply bytes."""

    def __init__(self, box, reply):
        reply_file = box.path(f"reply-{uuid.uuid4().hex[:6]}.zip")
        with open(reply_file, "wb") as f:
            f.write(reply)
        self.proc = subprocess.Popen(
            [shared.PYTHON, shared.program("fake_server"), server_db(box).path, reply_file,
             shared.ROOT],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=box.env)
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), self.proc.stderr.read().decode(errors="replace")
        self.port = int(line)
        self.requests = 0

    def close(self):
        try:
            out, _err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            shared.stop_pid(self.proc, timeout=0)
            out, _err = self.proc.communicate()
        self.requests = out.count(b"request ")


@pytest.fixture
def trusted_box(sandbox):
    """A sandbox whose server database exists and whose client database
    trusts it (what a first server start does), made without a server."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("STAP_SYSCONFDIR", "SYSTEMTAP_DIR", "HOME"):
            mp.setenv(k, sandbox.env[k])
        stap_server.ensure_server_certificate(server_db(sandbox))
    return sandbox


def signed_reply(box, rc=0, module=b"\x7fELF fake module", stderr=b""):
    """A reply signed by box's server key, in a process of its own: one NSS
    holding several sandboxes' databases may take two certificates made in
    the same half second (the same issuer and time-based serial) for one."""
    proc = subprocess.run([shared.PYTHON, shared.program("sign_reply"), shared.ROOT,
                           server_db(box).path],
                          input=repr((rc, stderr, module)).encode(), capture_output=True,
                          timeout=60, check=True)
    return proc.stdout


def rewrite(data, change):
    """The zip with change(name, bytes) -> bytes applied to every entry."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info)))
    return out.getvalue()


EVIL = "hx-evil-" + uuid.uuid4().hex[:8]


def tampered(box):
    data = signed_reply(box)
    return rewrite(data, lambda n, b: b"\x7fELF evil module" if n.endswith(".ko") else b)


def tampered_rc(box):
    data = signed_reply(box, rc=1, module=None, stderr=b"semantic error\n")
    return rewrite(data, lambda n, b: b"0" if n == "rc" else b)


def unsigned_extra(box):
    buf = io.BytesIO(signed_reply(box, module=None))
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("stap000000/stap_evil.ko", b"\x7fELF evil module")
    return buf.getvalue()


def with_entry(name, change):
    def make(box):
        return rewrite(signed_reply(box), lambda n, b: change(b) if n == name else b)
    return make


def flip_last_byte(data):
    return data[:-1] + bytes([data[-1] ^ 1])


def foreign_key(box):
    """Signed, with its own certificate, by a server the client never trusted."""
    other = shared.make_sandbox()
    with pytest.MonkeyPatch.context() as mp:
        for k in ("STAP_SYSCONFDIR", "SYSTEMTAP_DIR", "HOME"):
            mp.setenv(k, other.env[k])
        stap_server.ensure_server_certificate(server_db(other))
    return signed_reply(other)


def traversal(prefix):
    def make(box):
        return zip_bytes([("version", b"4.8"), ("rc", b"0"), ("stdout", b""), ("stderr", b""),
                          ("stap000000/stap_x.ko", b"\x7fELF module"),
                          (prefix + EVIL, b"evil")])
    return make


REPLIES = {
    "tampered-module": (tampered, r"reply signature does not verify"),
    "tampered-rc": (tampered_rc, r"reply signature does not verify"),
    # The signature block's last bytes are the RSA signature itself.
    "forged-signature": (with_entry("META-INF/zigbert.rsa", flip_last_byte),
                         r"reply signature does not verify \(bad signature\)"),
    "altered-signature-file": (with_entry("META-INF/zigbert.sf", lambda b: b + b"\n"),
                               r"reply signature does not verify \(signature file altered\)"),
    "altered-manifest": (with_entry("META-INF/manifest.mf", lambda b: b.replace(
                             b"Name: rc\n", b"Name: rc \n")), r"reply signature does not verify"),
    "foreign-key": (foreign_key, r"reply is signed by a certificate other than the server's"),
    "unsigned-extra-entry": (unsigned_extra,
                             (r"reply entry stap000000/stap_evil.ko is not covered by the "
                              r"server's signature")),
    "dotdot": (traversal("../"), r"archive entry name '\.\./hx-evil-\w+' is not a plain"),
    "deep-dotdot": (traversal("stap000000/../../../"), r"is not a plain relative path"),
    "absolute": (traversal("/tmp/"), r"archive entry name '/tmp/hx-evil-\w+' is not a plain"),
}


@pytest.mark.parametrize("case", list(REPLIES))
def test_hostile_reply_refused(trusted_box, krel, staprun, case):
    import re
    box = trusted_box
    make, expected = REPLIES[case]
    fake = FakeServer(box, make(box))
    env, record = staprun
    tmp = client_tmp(box)
    cwd = box.path("work", "here")
    os.makedirs(cwd)
    try:
        proc = box.run("stap-client", f"--server=127.0.0.1:{fake.port}", "-r", krel,
                       "-e", NORMAL_SCRIPT, env={**env, "TMPDIR": tmp}, cwd=cwd, timeout=60)
    finally:
        fake.close()
    err = proc.stderr.decode(errors="replace")
    assert fake.requests == 1, "the client never asked the fake server"
    assert proc.returncode == 1, err
    assert re.search(expected, err), err
    assert err.strip().splitlines()[-1].startswith("stap-client: ERROR: "), err
    assert not os.path.exists(record + ".args"), "staprun ran"
    assert os.listdir(tmp) == [], "stap-client left temporary files"
    assert os.listdir(cwd) == [], "stap-client wrote into its cwd"
    for place in (cwd, box.path("work"), box.top, "/tmp", tmp):
        assert not os.path.lexists(os.path.join(place, EVIL)), f"{place}/{EVIL} created"


def test_reply_signature_is_signtools(trusted_box):
    """What the server signs in-process, signtool -v (NSS's own JAR
    verifier) accepts entry by entry: the format stays signtool's."""
    box = trusted_box
    jar = box.path("reply.jar")
    with open(jar, "wb") as f:
        f.write(signed_reply(box, stderr=b"a warning\n"))
    proc = subprocess.run(["signtool", "-d", server_db(box).spec, "-v", jar],
                          capture_output=True, text=True, timeout=60, cwd=box.top)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed crypto verification" in proc.stdout, proc.stdout
    verified = {line.split()[1] for line in proc.stdout.splitlines()
                if line.strip().startswith("verified ")}
    assert verified == {"version", "rc", "stdout", "stderr", "stap000000/stap_fake.ko"}


def test_genuine_reply_accepted(trusted_box, krel, staprun):
    """The control case: the same fake server with an untouched signed reply
    gets staprun run on the module."""
    box = trusted_box
    fake = FakeServer(box, signed_reply(box))
    env, record = staprun
    try:
        proc = box.run("stap-client", f"--server=127.0.0.1:{fake.port}", "-r", krel,
                       "-e", NORMAL_SCRIPT, env=env, timeout=60)
    finally:
        fake.close()
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    with open(record + ".ko", "rb") as f:
        assert f.read() == b"\x7fELF fake module"
