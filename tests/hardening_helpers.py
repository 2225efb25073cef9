"""Helpers shared by the hardening tests (test_bad_input, test_fuzz,
test_load, test_faults): raw protocol traffic to a running server, request
and reply archives built by hand, and checks that a server still serves."""

import base64
import contextlib
import io
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
import zipfile

from shared import copy_program, wait_until

import stap_client

NORMAL_SCRIPT = "probe begin { exit() }"


def stand_in_stap(box, body, name="stap-standin"):
    """A stap stand-in (for SYSTEMTAP_STAP) that runs body for compiles;
    stap -V (the server asks it once) goes to the real stap."""
    path = box.path(name)
    with open(path, "w") as f:
        f.write('#!/bin/sh\ncase "$*" in *" -V"*|-V*) exec /usr/bin/stap -V;; esac\n' + body)
    os.chmod(path, 0o755)
    return path


def stand_in_program(box, name):
    """A copy in the box of tests/programs/NAME, a stap stand-in for SYSTEMTAP_STAP (each says at
    its top what it does), executable: a path of the box's own, which the sandbox shows at it."""
    return copy_program(name, box.path(name))


def server_tmpdir(box):
    """A private --tmpdir for a server: request directories go there."""
    path = box.path("server-tmp")
    os.makedirs(path, 0o755, exist_ok=True)
    if box.user:
        pw = pwd.getpwnam(box.user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def request_dirs(tmpdir):
    return sorted(n for n in os.listdir(tmpdir) if n.startswith("stap-server."))


def client_db(box):
    """The client database a root server trusts itself in."""
    return stap_client.CertDB(os.path.join(box.sysconfdir, "systemtap", "ssl", "client"))


def server_db(box):
    return stap_client.CertDB(os.path.join(box.sysconfdir, "systemtap", "ssl", "server"))


def tls_open(box, port, timeout=10):
    """A TLS socket (python-nss, in this process) to 127.0.0.1:port, trusting
    the server through the sandbox's client database."""
    stap_client.open_databases([client_db(box)])
    sock, _ = stap_client.tls_connect(stap_client.Peer("127.0.0.1", port), timeout=timeout)
    return sock


def read_to_eof(sock, timeout=20):
    """Everything the peer sends until it closes (b"" when it sends nothing)."""
    nerror = stap_client.nss_modules()[3]
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(1 << 16, stap_client.nss_interval(deadline - time.monotonic()))
            except nerror.NSPRError as e:
                if e.errno == nerror.PR_IO_TIMEOUT_ERROR:
                    raise AssertionError(f"server sent no EOF within {timeout} s") from None
                break  # reset / EOF without close_notify: the connection is closed
            if not chunk:
                break
            chunks.append(chunk)
        else:
            raise AssertionError(f"server sent no EOF within {timeout} s")
    finally:
        sock.close()
    return b"".join(chunks)


def raw_exchange(box, port, payload, timeout=20, half_close=False):
    """Send payload bytes (framing included) over TLS; return what comes back."""
    _, _, nio, nerror = stap_client.nss_modules()
    sock = tls_open(box, port)
    try:
        sock.sendall(payload, stap_client.nss_interval(10))
        if half_close:
            sock.shutdown(nio.PR_SHUTDOWN_SEND)
    except nerror.NSPRError:
        pass  # the server may already have hung up
    return read_to_eof(sock, timeout)


def frame(data):
    return len(data).to_bytes(4, "big", signed=True) + data


def zip_bytes(entries, compression=zipfile.ZIP_DEFLATED):
    """entries: list of (name or ZipInfo, bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def base_entries(krel, *args, script=NORMAL_SCRIPT, arch=None):
    """The entries of a normal -p2 request, as the real 4.8 client lays them out."""
    args = args or ("-p2", "-e" + script)
    entries = [("version", b"4.8"),
               ("sysinfo", f"sysinfo: {krel} {arch or os.uname().machine}".encode())]
    entries += [(f"argv{n}", a.encode()) for n, a in enumerate(args, 1)]
    entries.append(("locale", b"LANG=C.UTF-8\n"))
    return entries


def normal_request(krel):
    return zip_bytes(base_entries(krel))


def info(name, mode=None, compress=zipfile.ZIP_DEFLATED):
    zi = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    zi.compress_type = compress
    if mode is not None:
        zi.external_attr = mode << 16
        zi.create_system = 3  # Unix
    return zi


def parse_reply(data):
    """(rc, stderr text, names) of a reply zip; fails the test if it is not one."""
    assert data, "server sent no reply"
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        assert "rc" in names, f"reply without rc: {names}"
        rc = int(zf.read("rc").strip())
        stderr = zf.read("stderr").decode(errors="replace") if "stderr" in names else ""
    return rc, stderr, names


def log_text(srv):
    with open(srv.log, errors="replace") as f:
        return f.read()


def request_lines(srv):
    return [l for l in log_text(srv).splitlines() if " request client=" in l]


def wait_request_lines(srv, count, timeout=10):
    """The log's request lines once there are at least count of them."""
    return wait_until(lambda: len(lines := request_lines(srv)) >= count and lines, timeout,
                      lambda: f"expected {count} request lines in {srv.log}; got:\n"
                      + "\n".join(request_lines(srv)))


def client_p2(box, srv, krel, *extra, env=None, timeout=60):
    """A normal stap-client -p2 request through srv."""
    return box.run("stap-client", f"--server=127.0.0.1:{srv.port}", *extra, "-r", krel, "-p2",
                   "-e", NORMAL_SCRIPT, env=env, timeout=timeout)


def assert_serves(box, srv, krel):
    """The SAME server still answers a normal request with rc 0."""
    proc = client_p2(box, srv, krel)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"begin" in proc.stdout


def plain_connect(port, timeout=5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s


def plain_read_until_closed(s, timeout):
    """Seconds until the server closes a plain TCP connection, and what it sent."""
    s.settimeout(timeout)
    start, got = time.monotonic(), b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(
            f"server kept the connection open for more than {timeout} s") from None
    finally:
        s.close()
    return time.monotonic() - start, got


def files_under(path):
    out = set()
    for root, dirs, names in os.walk(path):
        for n in dirs + names:
            out.add(os.path.join(root, n))
    return out


def is_regular_or_dir(path):
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)


ERROR_LINE = re.compile(r"^stap-serverd: ERROR: .+", re.MULTILINE)


def write_tsig_key(path, name):
    """A BIND key statement made the documented way, with tsig-keygen under umask 077 (written by
    hand where BIND's tools are missing): mode 0600, the caller's.  Returns its secret."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        if shutil.which("tsig-keygen"):
            f.flush()
            subprocess.run(["tsig-keygen", name], stdout=f, check=True)
        else:
            secret = base64.b64encode(os.urandom(32)).decode()
            f.write(f'key "{name}" {{ algorithm hmac-sha256; secret "{secret}"; }};\n')
    with open(path) as f:
        return re.search(r'secret "([^"]+)"', f.read()).group(1)


def write_named_conf(workdir, zone, keyfile, key_name, listen, ns_address, port=53):
    """named.conf (returned) and the zone file for a BIND 9 in workdir: it serves zone as its
    primary on the listen addresses, updatable with the key, and says "browse this domain"."""
    with open(os.path.join(workdir, f"{zone}.zone"), "w") as f:
        f.write(f"$TTL 60\n@ IN SOA ns.{zone}. admin.{zone}. 1 60 60 600 60\n"
                f"@ IN NS ns.{zone}.\nns IN A {ns_address}\n"
                "b._dns-sd._udp IN PTR @\n")  # "browse this domain" (RFC 6763 11)
    conf = os.path.join(workdir, "named.conf")
    with open(conf, "w") as f:
        f.write(f'include "{keyfile}";\ncontrols {{ }};\n'
                f'options {{ directory "{workdir}"; pid-file "{workdir}/named.pid"; '
                f'session-keyfile "{workdir}/session.key"; '
                f'listen-on port {port} {{ {"; ".join(listen)}; }}; '
                'listen-on-v6 { none; }; recursion no; dnssec-validation no; };\n'
                f'zone "{zone}" {{ type primary; file "{workdir}/{zone}.zone"; '
                f'allow-update {{ key "{key_name}"; }}; }};\n')
    return conf


@contextlib.contextmanager
def small_tmpfs(path, size="64k", full=False, readonly=False):
    """A tmpfs of size at path (made), mounted for the block; full: filled to the last byte."""
    os.makedirs(path, 0o755)
    options = f"size={size},mode=0755" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)
    try:
        if full:
            fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * 4096):
                    pass
            os.close(fd)
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
