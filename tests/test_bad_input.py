"""Spec section 9, the server's rows: garbage instead of TLS, silent
clients, bad size prefixes, hostile archives and hostile requests.  Every
bad input is followed by a normal request to the SAME server, which must
succeed; nothing may be written outside the request directory and no
request directory may be left behind."""

import os
import re
import time
import uuid
import zipfile

import pytest
import shared
from hardening_helpers import (
    ERROR_LINE,
    assert_serves,
    base_entries,
    frame,
    info,
    normal_request,
    parse_reply,
    plain_connect,
    plain_read_until_closed,
    raw_exchange,
    read_to_eof,
    request_dirs,
    request_lines,
    server_tmpdir,
    tls_open,
    wait_request_lines,
    zip_bytes,
)

pytestmark = pytest.mark.integration

IO_TIMEOUT = 2
MAX_REQUEST = 12 << 20
MAX_UNPACKED = 8 << 20


@pytest.fixture(scope="module")
def env(krel):
    """One root server for the whole module, with a short I/O timeout, small
    limits and a private --tmpdir."""
    box = shared.make_sandbox()
    tmpdir = server_tmpdir(box)
    srv = shared.start_server(box, krel, None, "--tmpdir", tmpdir,
                              "--io-timeout", str(IO_TIMEOUT),
                              "--max-compressed-request", str(MAX_REQUEST),
                              "--max-request-size", str(MAX_UNPACKED))
    yield box, srv, tmpdir
    srv.stop()
    import shutil
    shutil.rmtree(box.top, ignore_errors=True)


@pytest.fixture
def check(env, krel):
    """After the test: no request directory left, the server alive and serving."""
    box, srv, tmpdir = env
    yield env
    shared.wait_until(lambda: not request_dirs(tmpdir), 5,
                      lambda: f"request directories left behind: {request_dirs(tmpdir)}")
    assert shared.pid_alive(srv.pid), "the server died"
    assert_serves(box, srv, krel)


def last_request_line(srv, before):
    lines = wait_request_lines(srv, before + 1)
    return lines[before]


# --------------------------------------------------------------------------
# Not TLS at all; silence
# --------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n",
    bytes(range(256)) * 8,
    b"\x00\x00\x01\x00" + b"PK\x03\x04" + b"\x00" * 252,  # a plain-TCP request
], ids=["http", "binary", "plain-request"])
def test_garbage_instead_of_tls(check, garbage):
    _box, srv, _ = check
    before = len(request_lines(srv))
    s = plain_connect(srv.port)
    s.sendall(garbage)
    _seconds, got = plain_read_until_closed(s, IO_TIMEOUT + 5)
    assert b"PK" not in got  # no reply archive in the clear
    line = last_request_line(srv, before)
    assert "error=" in line and "rc=" not in line, line


def test_silent_clients_dropped_while_others_served(check, krel):
    """A TCP client that says nothing and a TLS client that sends no request
    are dropped after --io-timeout; a normal request completes meanwhile."""
    box, srv, _ = check
    before = len(request_lines(srv))
    silent_tcp = plain_connect(srv.port)
    silent_tls = tls_open(box, srv.port)
    opened = time.monotonic()
    assert_serves(box, srv, krel)  # while both are open
    served_after = time.monotonic() - opened
    assert served_after < IO_TIMEOUT, "the normal request waited for the silent ones"
    _seconds, got = plain_read_until_closed(silent_tcp, IO_TIMEOUT + 5)
    assert got == b""
    tls_reply = read_to_eof(silent_tls, timeout=IO_TIMEOUT + 5)
    assert tls_reply == b""
    assert time.monotonic() - opened < IO_TIMEOUT + 4
    lines = wait_request_lines(srv, before + 3)[before:]
    errors = [l for l in lines if "error=" in l]
    assert len(errors) == 2, lines
    print(f"silent connections dropped after {time.monotonic() - opened:.1f} s "
          f"(--io-timeout {IO_TIMEOUT}); normal request served in {served_after:.2f} s")


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------

def test_size_zero_is_a_certificate_fetch(check):
    box, srv, _ = check
    before = len(request_lines(srv))
    assert raw_exchange(box, srv.port, b"\0\0\0\0") == b""
    line = last_request_line(srv, before)
    assert "size=0" in line and "certificate fetch" in line and "rc=" not in line, line


@pytest.mark.parametrize("size", [-1, -2**31, MAX_REQUEST + 1, 2**31 - 1],
                         ids=["minus-one", "most-negative", "over-limit", "huge"])
def test_bad_size_prefix(check, size, krel):
    box, srv, _ = check
    before = len(request_lines(srv))
    body = normal_request(krel)
    got = raw_exchange(box, srv.port, size.to_bytes(4, "big", signed=True) + body)
    assert got == b""
    line = last_request_line(srv, before)
    expected = f"bad request size {size}" if size < 0 else \
        f"Error size of (compressed) request file is too large: {size} bytes"
    assert expected in line and "rc=" not in line, line


def test_fewer_bytes_than_announced_then_close(check, krel):
    box, srv, _ = check
    before = len(request_lines(srv))
    body = normal_request(krel)
    got = raw_exchange(box, srv.port, len(body).to_bytes(4, "big") + body[:-10],
                       half_close=True)
    assert got == b""
    line = last_request_line(srv, before)
    assert re.search(r"error='(connection closed|read failed) after \d+ of \d+ bytes", line), line
    assert "rc=" not in line


def test_fewer_bytes_than_announced_then_silence(check, krel):
    box, srv, _ = check
    before = len(request_lines(srv))
    body = normal_request(krel)
    start = time.monotonic()
    got = raw_exchange(box, srv.port, len(body).to_bytes(4, "big") + body[:-10],
                       timeout=IO_TIMEOUT + 5)
    assert got == b""
    assert time.monotonic() - start < IO_TIMEOUT + 3
    line = last_request_line(srv, before)
    assert re.search(r"error='(timed out|read failed) after \d+ of \d+ bytes", line), line
    assert "timed out" in line and "rc=" not in line, line


def test_more_bytes_than_announced(check, krel):
    box, srv, _ = check
    before = len(request_lines(srv))
    got = raw_exchange(box, srv.port, frame(normal_request(krel)) + b"SMUGGLED" * 64)
    assert got == b""
    line = last_request_line(srv, before)
    assert "more bytes than announced" in line and "rc=" not in line, line


# --------------------------------------------------------------------------
# Hostile archives: rc 1, a clear line, nothing written outside
# --------------------------------------------------------------------------

EVIL = "hx-evil-" + uuid.uuid4().hex[:8]


def corrupt_zip(krel):
    data = bytearray(zip_bytes(base_entries(krel) + [("script/big", b"probe " * 20000)]))
    start = data.index(b"script/big") + len("script/big")
    for i in range(start + 40, start + 60):
        data[i] ^= 0x5A
    return bytes(data)


def lying_bomb(krel):
    """A 20 MiB entry whose headers claim 1000 bytes."""
    data = bytearray(zip_bytes(base_entries(krel) + [("bomb", b"\0" * (20 << 20))]))
    real = (20 << 20).to_bytes(4, "little")
    count = 0
    pos = data.find(real)
    while pos >= 0:
        data[pos:pos + 4] = (1000).to_bytes(4, "little")
        count += 1
        pos = data.find(real, pos + 4)
    assert count == 2  # the local and the central header
    return bytes(data)


def many_entries(krel, n=100_000):
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in base_entries(krel):
            zf.writestr(name, data)
        for i in range(n):
            zf.writestr(f"e{i}", b"")
    return buf.getvalue()


ARCHIVES = {
    "not-a-zip": (lambda k: b"this is not a zip archive\n" * 10, r"not a valid zip archive"),
    "truncated-zip": (lambda k: normal_request(k)[:-30], r"not a valid zip archive"),
    "corrupt-data": (corrupt_zip, r"archive entry script/big is corrupt"),
    "bomb-ratio": (lambda k: zip_bytes(base_entries(k) + [("bomb", b"\0" * (4 << 20))]),
                   r"archive entry bomb is compressed suspiciously well"),
    "bomb-size": (lambda k: zip_bytes(base_entries(k) + [("bomb", b"\0" * (40 << 20))]),
                  r"Uncompressed request size of \d+ bytes is not within the expected range"),
    "bomb-total": (lambda k: zip_bytes(base_entries(k) + [
        (f"part{i}", os.urandom(1 << 20)) for i in range(9)], zipfile.ZIP_STORED),
        r"Uncompressed request size of \d+ bytes is not within the expected range of 1 to "
        rf"{MAX_UNPACKED} bytes \(--max-request-size\)"),
    "bomb-lying-header": (lying_bomb, r"archive entry bomb is corrupt"),
    "dotdot": (lambda k: zip_bytes(base_entries(k) + [(f"../{EVIL}", b"x")]),
               r"archive entry name '\.\./hx-evil-\w+' is not a plain relative path"),
    "deep-dotdot": (lambda k: zip_bytes(base_entries(k) + [
        (f"script/../../../../../../tmp/{EVIL}", b"x")]), r"is not a plain relative path"),
    "absolute": (lambda k: zip_bytes(base_entries(k) + [(f"/etc/{EVIL}", b"x")]),
                 r"archive entry name '/etc/hx-evil-\w+' is not a plain relative path"),
    "absolute-tmp": (lambda k: zip_bytes(base_entries(k) + [(f"/tmp/{EVIL}", b"x")]),
                     r"is not a plain relative path"),
    "backslash": (lambda k: zip_bytes(base_entries(k) + [(f"..\\{EVIL}", b"x")]),
                  r"is not a plain relative path"),
    "symlink": (lambda k: zip_bytes(base_entries(k) + [(info(EVIL, 0o120777), b"/etc/passwd")]),
                r"archive entry hx-evil-\w+ is not a regular file or directory"),
    "symlink-then-write": (lambda k: zip_bytes(base_entries(k) + [
        (info("tapset", 0o120777), b"/tmp"), (f"tapset/{EVIL}", b"x")]),
        r"archive entry tapset is not a regular file or directory"),
    "char-device": (lambda k: zip_bytes(base_entries(k) + [(info(EVIL, 0o020666), b"")]),
                    r"is not a regular file or directory"),
    "block-device": (lambda k: zip_bytes(base_entries(k) + [(info(EVIL, 0o060666), b"")]),
                     r"is not a regular file or directory"),
    "fifo": (lambda k: zip_bytes(base_entries(k) + [(info(EVIL, 0o010644), b"")]),
             r"is not a regular file or directory"),
    "100000-entries": (many_entries, r"archive has 100\d{3} entries \(limit \d+\)"),
}


def evil_places(tmpdir):
    places = {"/", "/tmp", "/etc", "/root", tmpdir, os.getcwd()}
    d = tmpdir
    while d != "/":
        d = os.path.dirname(d)
        places.add(d)
    return [os.path.join(p, EVIL) for p in places]


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_hostile_archive(check, krel, case):
    box, srv, tmpdir = check
    make, expected = ARCHIVES[case]
    data = make(krel)
    assert len(data) < MAX_REQUEST
    before = len(request_lines(srv))
    rc, stderr, _names = parse_reply(raw_exchange(box, srv.port, frame(data), timeout=60))
    assert rc == 1
    assert re.search(expected, stderr), stderr
    assert ERROR_LINE.search(stderr), stderr
    line = last_request_line(srv, before)
    assert "rc=1" in line and "error=" in line and "options=" not in line, line
    for path in evil_places(tmpdir):
        assert not os.path.lexists(path), f"{path} was created"


# --------------------------------------------------------------------------
# Hostile requests: rc 1, a clear line, stap never runs on them
# --------------------------------------------------------------------------

def without(entries, name):
    return [(n, d) for n, d in entries if n != name]


def with_args(krel, *args, extra=()):
    return base_entries(krel, *args) + list(extra)


REQUESTS = {
    "no-sysinfo": (lambda k: without(base_entries(k), "sysinfo"), r"no valid sysinfo"),
    "bad-sysinfo": (lambda k: without(base_entries(k), "sysinfo") + [("sysinfo", b"hello")],
                    r"no valid sysinfo"),
    "no-argv1": (lambda k: without(base_entries(k), "argv1") + [("argv5", b"-p2")],
                 r"no argv1"),
    "no-args-at-all": (lambda k: [("version", b"4.8"),
                                  ("sysinfo", f"sysinfo: {k} x86_64".encode())],
                       r"no argv1"),
    "unknown-release": (lambda k: base_entries("9.9.9-unknown"),
                        r"does not serve 9\.9\.9-unknown"),
    "unknown-release-r": (lambda k: with_args(k, "-r9.9.9-other", "-p2", "-eprobe begin{}"),
                          r"does not serve 9\.9\.9-other"),
    "build-tree-r": (lambda k: with_args(k, f"-r/lib/modules/{k}/build", "-p2",
                                         "-eprobe begin{}"),
                     r"a build tree path is not allowed"),
    "release-shell": (lambda k: base_entries("6.1.0;id"),
                      r"release '6\.1\.0;id' is not a kernel release name"),
    "release-dotdot-r": (lambda k: with_args(k, "-r..", "-p2", "-eprobe begin{}"),
                         r"-r '\.\.' is not a kernel release name"),
    "release-dash-r": (lambda k: with_args(k, "-r-oDebug::pkg", "-p2", "-eprobe begin{}"),
                       r"-r '-oDebug::pkg' is not a kernel release name"),
    # another arch: stap parses for it, but no module can be built for it here
    "wrong-arch": (lambda k: base_entries(k, "-p4", "-eprobe begin{}", arch="s390x"),
                   r"builds x86_64 modules only: stap cannot build for s390x here"),
    "wrong-release": (lambda k: base_entries("5.10.0-99-amd64"), r"does not serve 5\.10\.0-99"),
    "forbid-R": (lambda k: with_args(k, "-R/tmp", "-p2", "-eprobe begin{}"),
                 r"option -R is not allowed"),
    "forbid-R-cluster": (lambda k: with_args(k, "-vR/tmp", "-p2", "-eprobe begin{}"),
                         r"option -R is not allowed"),
    "forbid-tmpdir": (lambda k: with_args(k, "--tmpdir=/tmp", "-p2", "-eprobe begin{}"),
                      r"option --tmpdir is not allowed"),
    "forbid-remote": (lambda k: with_args(k, "--remote", "ssh://x", "-p2", "-eprobe begin{}"),
                      r"option --remote is not allowed"),
    "forbid-use-server": (lambda k: with_args(k, "--use-server=1.2.3.4", "-p2",
                                              "-eprobe begin{}"),
                          r"option --use-server is not allowed"),
    "forbid-client-options": (lambda k: with_args(k, "--client-options", "-p2",
                                                  "-eprobe begin{}"),
                              r"option --client-options is not allowed"),
    "forbid-sysroot": (lambda k: with_args(k, "--sysroot=/", "-p2", "-eprobe begin{}"),
                       r"option --sysroot is not allowed"),
    "forbid-clean-cache": (lambda k: with_args(k, "--clean-cache", "-p2", "-eprobe begin{}"),
                           r"option --clean-cache is not allowed"),
    # getopt takes a unique prefix of a long option: so does the server's check.
    "abbreviated-tmpdir": (lambda k: with_args(k, "--tmp=/tmp", "-p2", "-eprobe begin{}"),
                           r"option --tmpdir is not allowed: it names a directory"),
    "include-etc": (lambda k: with_args(k, "-I/etc", "-p2", "-eprobe begin{}"),
                    r"-I path /etc is not inside the request"),
    "include-dotdot": (lambda k: with_args(k, "-I", "../../../etc", "-p2", "-eprobe begin{}"),
                       r"-I path \.\./\.\./\.\./etc is not inside the request"),
    "script-dotdot": (lambda k: with_args(k, "-p2", "../../etc/passwd"),
                      r"script path \.\./\.\./etc/passwd is not inside the request"),
    "script-absolute": (lambda k: with_args(k, "-p2", "/etc/passwd"),
                        r"script path /etc/passwd is not inside the request"),
    # Inside the request but missing: stap says so in its own words, as
    # through the real server.
    "script-missing": (lambda k: with_args(k, "-p2", "script/nothing.stp"),
                       r"Input file 'script/nothing\.stp' is missing\."),
    "debuginfo-outside": (lambda k: with_args(k, "-d", "/bin/ls", "-p2", "-eprobe begin{}"),
                          r"-d path /bin/ls is not inside the request"),
    "module-name": (lambda k: with_args(k, "-m../../evil", "-p2", "-eprobe begin{}"),
                    r"-m \.\./\.\./evil: a module name is"),
    "missing-value": (lambda k: with_args(k, "-p2", "-e"),
                      r"option requires an argument -- 'e'"),
    "abbreviated-option": (lambda k: with_args(k, "--sign-mod=/etc", "-p2", "-eprobe begin{}"),
                           r"option --sign-module is not allowed: it names a key directory"),
}


@pytest.mark.parametrize("case", list(REQUESTS))
def test_hostile_request(check, krel, case):
    box, srv, _tmpdir = check
    make, expected = REQUESTS[case]
    before = len(request_lines(srv))
    rc, stderr, _names = parse_reply(raw_exchange(box, srv.port, frame(zip_bytes(make(krel)))))
    assert rc == 1, stderr
    assert re.search(expected, stderr), stderr
    line = last_request_line(srv, before)
    assert "rc=1" in line, line


def test_script_inside_request_is_fine(check, krel):
    """The control case: a shipped script inside the request compiles."""
    box, srv, _ = check
    entries = base_entries(krel, "-p2", "script/tmp/x.stp") + [
        ("script/tmp/x.stp", b"probe begin { exit() }\n")]
    rc, stderr, _names = parse_reply(raw_exchange(box, srv.port, frame(zip_bytes(entries))))
    assert rc == 0, stderr
