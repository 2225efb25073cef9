"""The foundation: certificate databases made with real certutil, trust,
permission checks, and the server's life cycle (start, status, stop)."""

import json
import os
import re
import socket
import ssl
import subprocess
import time

import pytest
from shared import (
    TEST_USER,
    make_sandbox,
    need_root,
    pid_alive,
    status_file,
    stop_pid,
    wait_until,
)

import stap_client

pytestmark = pytest.mark.integration


def certutil_list(db):
    out = subprocess.run(["certutil", "-L", "-d", "sql:" + db], capture_output=True,
                         text=True, check=True).stdout
    return [tuple(re.split(r"\s{2,}", l.strip())) for l in out.splitlines()[4:] if l.strip()]


def cert_text(der):
    return subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-text"],
                          input=der, capture_output=True, check=True).stdout.decode()


def db_paths(box):
    """(server db, client db) where this sandbox's user keeps them."""
    if box.user is None and os.geteuid() == 0:
        base = os.path.join(box.sysconfdir, "systemtap", "ssl")
    else:
        base = os.path.join(box.systemtap_dir, "ssl")
    return os.path.join(base, "server"), os.path.join(base, "client")


def read(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


def make_server_db(path, months_ago=0, serial=4242, fmt="sql"):
    """A server database whose certificate was issued months_ago months ago
    for 12 months (12: it expires now; 13: a month ago)."""
    os.makedirs(path, 0o700, exist_ok=True)
    spec = f"{fmt}:{path}"
    subprocess.run(["certutil", "-N", "-d", spec, "--empty-password"], check=True)
    noise = os.path.join(path, "noise")
    with open(noise, "wb") as f:
        f.write(os.urandom(2048))
    subprocess.run(["certutil", "-S", "-d", spec, "-n", "stap-server", "-s",
                    "CN=Systemtap Compile Server, OU=Systemtap", "-x", "-t", "P,P,P",
                    "-k", "rsa", "-g", "2048", "-Z", "SHA256", "-w", str(-months_ago),
                    "-v", "12", "-m", str(serial), "-z", noise], check=True, capture_output=True)
    os.unlink(noise)


# --------------------------------------------------------------------------
# First start, second start, never wiping trust
# --------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["root", "user"])
def test_first_start_creates_databases_and_trust(who, servers, krel, runtime):
    if who == "user":
        need_root()
    box = make_sandbox(TEST_USER if who == "user" else None)
    srv = servers.start(box, krel, runtime)
    server_db, client_db = db_paths(box)
    assert os.path.exists(os.path.join(server_db, "cert9.db"))
    assert os.stat(server_db).st_mode & 0o777 == 0o700
    der = read(os.path.join(server_db, "stap-server.cert"))
    assert stap_client.fingerprint(der) == srv.status["fingerprint"]
    # the client database trusts exactly this certificate for TLS and signing
    assert ("stap-server", "P,P,P") in certutil_list(client_db)
    assert stap_client.CertDB(client_db).certificates() == [der]
    text = cert_text(der)
    assert "Subject: OU = Systemtap, CN = Systemtap Compile Server" in text
    assert "Public-Key: (3072 bit)" in text
    assert "sha256WithRSAEncryption" in text
    short = socket.gethostname().split(".")[0]
    assert f"DNS:{short}.local" in text and "DNS:localhost" in text
    assert re.search(r"Subject Alternative Name: *\n *DNS:", text)
    if who == "root":
        # the global client database is readable by every user
        assert os.stat(os.path.join(client_db, "cert9.db")).st_mode & 0o044 == 0o044
    else:
        assert os.stat(server_db).st_uid == os.stat(box.top).st_uid != 0


def test_certificate_validity_and_serial(sandbox, user_sandbox, servers, krel, runtime):
    a = servers.start(sandbox, krel, runtime)
    b = servers.start(user_sandbox, krel, runtime)
    ders = [read(os.path.join(db_paths(box)[0], "stap-server.cert"))
            for box in (sandbox, user_sandbox)]
    # certutil's time-based serial, as real servers have: five bytes, 00 first, the form the
    # real client names a server by (two made in the same half second would share one)
    for der in ders:
        _, _, start, end = stap_client.tbs_fields(der)[0]
        assert len(der[start:end]) == 5 and der[start] == 0, der[start:end].hex()
    days = (stap_server_module().not_after(ders[0]) - time.time()) / 86400
    assert 360 < days < 370
    assert a.status["fingerprint"] != b.status["fingerprint"]


def stap_server_module():
    import stap_server
    return stap_server


def test_second_start_reuses_certificate_and_keeps_client_trust(sandbox, servers, krel, runtime):
    first = servers.start(sandbox, krel, runtime)
    server_db, client_db = db_paths(sandbox)
    # another server's certificate trusted by the same client database
    other = make_sandbox()
    other_srv = servers.start(other, krel, runtime)
    other_der = read(os.path.join(db_paths(other)[0], "stap-server.cert"))
    proc = sandbox.run("stap-add-server-cert", os.path.join(db_paths(other)[0],
                                                            "stap-server.cert"), client_db)
    assert proc.returncode == 0, proc.stderr
    first.stop()
    other_srv.stop()
    second = servers.start(sandbox, krel, runtime)
    assert second.status["fingerprint"] == first.status["fingerprint"]
    certs = stap_client.CertDB(client_db).certificates()
    assert other_der in certs and len(certs) == 2


def test_start_prints_pid_quickly_with_existing_certificate(sandbox, servers, krel, runtime):
    servers.start(sandbox, krel, runtime).stop()
    t = time.monotonic()
    srv = servers.start(sandbox, krel, runtime)
    elapsed = time.monotonic() - t
    print(f"stap-start-server with an existing certificate: {elapsed:.3f} s")
    assert pid_alive(srv.pid)


def test_renewal_of_a_certificate_about_to_expire(sandbox, servers, krel, runtime):
    server_db, client_db = db_paths(sandbox)
    make_server_db(server_db, months_ago=12, serial=4242, fmt="sql")
    old = subprocess.run(["certutil", "-L", "-d", "sql:" + server_db, "-n", "stap-server",
                          "-r"], capture_output=True, check=True).stdout
    srv = servers.start(sandbox, krel, runtime)
    new = read(os.path.join(server_db, "stap-server.cert"))
    assert new != old
    assert srv.status["fingerprint"] == stap_client.fingerprint(new)
    assert stap_client.CertDB(server_db).certificates() == [new]
    assert new in stap_client.CertDB(client_db).certificates()
    assert stap_client.fingerprint(new) in read(srv.log, "r")


# --------------------------------------------------------------------------
# TLS presents exactly the certificate file
# --------------------------------------------------------------------------

def test_tls_handshake_presents_the_certificate_file(server, sandbox):
    der = read(os.path.join(db_paths(sandbox)[0], "stap-server.cert"))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        assert tls.getpeercert(binary_form=True) == der
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(b"\0\0\0\0")  # certificate fetch: the server just closes
    # openssl's own client agrees
    out = subprocess.run(["timeout", "10", "openssl", "s_client", "-connect",
                          f"127.0.0.1:{server.port}"], input=b"", capture_output=True).stdout
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
    assert ssl.PEM_cert_to_DER_cert(pem.group(0).decode()) == der


# --------------------------------------------------------------------------
# stap-stop-server
# --------------------------------------------------------------------------

def test_stop_server_usage(sandbox):
    for args in ([], ["12x"], ["1", "2"]):
        proc = sandbox.run("stap-stop-server", *args)
        assert proc.returncode == 1
        assert b"usage: stap-stop-server PID" in proc.stderr


def test_stop_server_refuses_another_program(sandbox):
    other = subprocess.Popen(["sleep", "60"])
    try:
        proc = sandbox.run("stap-stop-server", str(other.pid))
        assert proc.returncode == 1
        assert f"{other.pid} is not a systemtap server".encode() in proc.stderr
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        stop_pid(other)


def test_stop_server_refuses_a_missing_pid(sandbox):
    proc = sandbox.run("stap-stop-server", "4194304")
    assert proc.returncode == 1 and b"is not a systemtap server" in proc.stderr


def test_stop_server_refuses_another_users_server(server, user_sandbox):
    proc = user_sandbox.run("stap-stop-server", str(server.pid))
    assert proc.returncode == 1
    assert b"is not a systemtap server" in proc.stderr and b"another user" in proc.stderr
    assert pid_alive(server.pid)


def test_stop_server_stops_a_server(server, sandbox):
    status = status_file(sandbox, server.pid)
    assert os.path.exists(status)
    proc = sandbox.run("stap-stop-server", str(server.pid))
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: not pid_alive(server.pid), 20, "the server is still running")
    assert not os.path.exists(status)


def test_user_may_stop_own_server(user_sandbox, servers, krel, runtime):
    srv = servers.start(user_sandbox, krel, runtime)
    proc = user_sandbox.run("stap-stop-server", str(srv.pid))
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: not pid_alive(srv.pid), 20, "the server is still running")


def test_start_failure_prints_nothing_and_leaves_no_server(sandbox):
    proc = sandbox.run("stap-start-server", "--listen", "127.0.0.1", "-r", "0.0-no-such-kernel")
    assert proc.returncode == 1 and proc.stdout == b""
    assert b"no kernel build tree for 0.0-no-such-kernel" in proc.stderr
    proc = sandbox.run("stap-start-server", "--listen", "192.0.2.1", "-r",
                       stap_client_release(), "--log", sandbox.path("log"))
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode().startswith(
        "stap-start-server: ERROR: cannot listen on 192.0.2.1 port 0: ")


def stap_client_release():
    from shared import headers_release
    rel = headers_release()
    if not rel:
        pytest.skip("no kernel headers installed")
    return rel


# --------------------------------------------------------------------------
# Permission checks
# --------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["group-writable dir", "other-writable dir",
                                   "readable key", "foreign owner"])
def test_server_refuses_unsafe_database(fault, sandbox, servers, krel, runtime):
    servers.start(sandbox, krel, runtime).stop()
    server_db, _ = db_paths(sandbox)
    if fault == "group-writable dir":
        os.chmod(server_db, 0o770)
    elif fault == "other-writable dir":
        os.chmod(server_db, 0o702)
    elif fault == "readable key":
        os.chmod(os.path.join(server_db, "key4.db"), 0o644)
    else:
        need_root()
        os.chown(os.path.join(server_db, "cert9.db"), 65534, 65534)
    proc = sandbox.run("stap-start-server", "--listen", "127.0.0.1", "-r", krel,
                       "--log", sandbox.path("log2"))
    assert proc.returncode == 1 and proc.stdout == b""
    log = read(sandbox.path("log2"), "r")
    expected = {"group-writable dir": "writable by group or others",
                "other-writable dir": "writable by group or others",
                "readable key": "readable by group or others",
                "foreign owner": "is owned by uid 65534"}[fault]
    assert expected in log and server_db in log


def test_client_skips_unsafe_databases(server, sandbox):
    _, client_db = db_paths(sandbox)
    bad = sandbox.path("bad-db")
    proc = sandbox.run("stap-add-server-cert",
                       os.path.join(db_paths(sandbox)[0], "stap-server.cert"), bad)
    assert proc.returncode == 0
    os.chmod(bad, 0o777)
    # the global database is fine, so the compile goes through with a warning
    proc = sandbox.run("stap-client", f"--server={server.address}", f"--ssl={bad}",
                       "-r", server.status["releases"][0], "-p1", "-e", "probe begin {}")
    assert proc.returncode == 0, proc.stderr
    assert f"skipping certificate database {bad}: {bad} is writable by group or others" \
        in proc.stderr.decode()
    # the global database made group-writable too: nothing is left
    os.chmod(client_db, 0o775)
    proc = sandbox.run("stap-client", f"--server={server.address}", f"--ssl={bad}",
                       "-p1", "-e", "probe begin {}")
    assert proc.returncode == 1
    assert b"stap-client: ERROR: no usable client certificate database" in proc.stderr


def test_client_skips_a_foreign_user_database(server, user_sandbox, sandbox):
    """A per-user client database must be owned by that user."""
    user_db = os.path.join(user_sandbox.systemtap_dir, "ssl", "client")
    proc = sandbox.run("stap-add-server-cert",
                       os.path.join(db_paths(sandbox)[0], "stap-server.cert"), user_db)
    assert proc.returncode == 0  # made by root, so owned by root
    proc = user_sandbox.run("stap-client", f"--server={server.address}",
                            "-r", server.status["releases"][0], "-p1", "-e", "probe begin {}")
    assert f"skipping certificate database {user_db}: {user_db} is owned by uid 0" \
        in proc.stderr.decode()


# --------------------------------------------------------------------------
# stap-add-server-cert
# --------------------------------------------------------------------------

def test_add_server_cert_der_and_pem(server, sandbox):
    der = read(os.path.join(db_paths(sandbox)[0], "stap-server.cert"))
    pem_file = sandbox.path("cert.pem")
    with open(pem_file, "w") as f:
        f.write(ssl.DER_cert_to_PEM_cert(der))
    target = sandbox.path("new", "client")
    proc = sandbox.run("stap-add-server-cert", pem_file, target)
    assert proc.returncode == 0, proc.stderr
    assert os.stat(target).st_mode & 0o777 == 0o755
    assert ("stap-server", "P,P,P") in certutil_list(target)
    assert stap_client.CertDB(target).certificates() == [der]


def test_add_server_cert_errors(sandbox):
    proc = sandbox.run("stap-add-server-cert", sandbox.path("missing.cert"), sandbox.path("db"))
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == (
        f"stap-add-server-cert: ERROR: certificate file {sandbox.path('missing.cert')} "
        "does not exist")
    junk = sandbox.path("junk.cert")
    with open(junk, "w") as f:
        f.write("hello")
    proc = sandbox.run("stap-add-server-cert", junk, sandbox.path("db"))
    assert proc.returncode == 1 and b"is not a certificate" in proc.stderr
    proc = sandbox.run("stap-add-server-cert", junk)
    assert proc.returncode == 1 and b"usage: stap-add-server-cert CERTFILE DIRNAME" in proc.stderr


def test_status_file_contents(server, sandbox):
    with open(status_file(sandbox, server.pid)) as f:
        status = json.load(f)
    assert status["pid"] == server.pid and status["port"] == server.port
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", status["fingerprint"]), status
    assert re.fullmatch(r"([0-9a-f]{2}:)*[0-9a-f]{2}", status["serial"]), status


def test_renewal_while_running(sandbox, krel):
    """A running server whose certificate nears expiry renews it; new
    connections get the new certificate and the client database trusts it."""
    server_db, client_db = db_paths(sandbox)
    make_server_db(server_db, months_ago=12, serial=4243, fmt="sql")
    import sys

    from shared import ROOT, program
    proc = subprocess.run([sys.executable, program("renew_while_running"), ROOT, server_db, krel,
                           sandbox.path("log")], env=sandbox.env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {**result, "old": True, "renewed": True, "changed": True}
    new = bytes.fromhex(result["new"])
    assert read(os.path.join(server_db, "stap-server.cert")) == new
    assert new in stap_client.CertDB(client_db).certificates()
    assert "renewed the server certificate while running" in read(sandbox.path("log"), "r")


def test_client_refuses_an_expired_certificate(sandbox, krel):
    server_db = sandbox.path("expired-server")
    make_server_db(server_db, months_ago=13, serial=4244, fmt="sql")
    der = subprocess.run(["certutil", "-L", "-d", "sql:" + server_db, "-n", "stap-server", "-r"],
                         capture_output=True, check=True).stdout
    certfile = sandbox.path("expired.cert")
    with open(certfile, "wb") as f:
        f.write(der)
    trusted = sandbox.path("trusted")
    assert sandbox.run("stap-add-server-cert", certfile, trusted).returncode == 0
    import sys

    from shared import ROOT, program
    server = subprocess.Popen([sys.executable, program("serve_as_is"), ROOT, server_db, krel,
                               sandbox.path("log")], env=sandbox.env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        proc = sandbox.run("stap-client", f"--server=127.0.0.1:{port}", f"--ssl={trusted}",
                           "-r", krel, "-p1", "-e", "probe begin {}")
    finally:
        server.stdin.close()
        server.wait(10)
    assert proc.returncode == 1
    assert f"server 127.0.0.1:{port} refused: its certificate expired on" in proc.stderr.decode()


def test_legacy_dbm_databases_still_work(sandbox, servers, krel, runtime):
    """cert8.db/key3.db databases: a server keeps using its own, and a client
    trusts a server through one given with --ssl."""
    server_db = sandbox.path("legacy-server")
    make_server_db(server_db, months_ago=0, serial=4245, fmt="dbm")
    assert stap_client.CertDB(server_db).spec == "dbm:" + server_db
    srv = servers.start(sandbox, krel, runtime, "--ssl", server_db)
    assert not os.path.exists(os.path.join(server_db, "cert9.db"))  # not converted
    client_db = sandbox.path("legacy-client")
    os.makedirs(client_db)
    subprocess.run(["certutil", "-N", "-d", "dbm:" + client_db, "--empty-password"], check=True)
    subprocess.run(["certutil", "-A", "-d", "dbm:" + client_db, "-n", "stap-server", "-t",
                    "P,P,P", "-i", os.path.join(server_db, "stap-server.cert")], check=True)
    stranger = make_sandbox()  # no other database trusts the server
    proc = stranger.run("stap-client", f"--server={srv.address}", f"--ssl={client_db}",
                        "-r", krel, "-p2", "-e", "probe begin { exit() }")
    assert proc.returncode == 0, proc.stderr  # TLS and the signed reply, both via dbm:
    assert b"begin" in proc.stdout


def test_a_starting_server_removes_status_files_of_killed_servers(sandbox, servers, krel):
    run = os.path.dirname(status_file(sandbox, 1))
    os.makedirs(run, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(run, f"stap-serverd.{dead.pid}.json")
    with open(stale, "w") as f:
        f.write("{}")
    srv = servers.start(sandbox, krel)
    assert not os.path.exists(stale)
    assert os.path.exists(status_file(sandbox, srv.pid))
