"""Signed modules for stapusr (issue 12): a server signs each module built
at --privilege=stapusr or stapsys into NAME.ko.sgn (RSA PKCS#1 v1.5,
SHA-256, made inside NSS: the key never leaves the database), the real 4.8
client and ours deliver it, openssl verifies it against the server's
certificate, and the real setuid staprun, run as a scratch stapusr user,
checks it before it asks the kernel: a valid signature gets to "inserted"
(then this kernel's refusal), one altered byte gets "altered", a server that
is not a trusted signer gets "Unable to verify".

staprun reads its signers from the compiled-in /etc/systemtap/staprun: the
tests lay a throw-away /etc/systemtap over the real one in a private mount
namespace, so the host's /etc is never touched.  staprun 4.8 needs two
things of that database (README: "Signed modules for stapusr users"):
the old file names to exist, and its files writable by group stapusr."""

import grp
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest
import shared

import stap_client

STAPUSR = "stapusrtest"  # a scratch user in group stapusr only
SCRIPT = "probe begin { exit() }"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0,
                                 reason="needs root: a stapusr account, mount namespaces")]


@pytest.fixture(scope="module")
def stapusr():
    try:
        pwd.getpwnam(STAPUSR)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", "-G", "stapusr", STAPUSR], check=True)
    return pwd.getpwnam(STAPUSR)


@pytest.fixture
def home(stapusr):
    """A private home and working directory for the stapusr user."""
    path = tempfile.mkdtemp(prefix="stapusr.")
    os.chown(path, stapusr.pw_uid, stapusr.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def server_der(srv):
    with open(os.path.join(srv.status["database"], stap_client.SERVER_CERT_FILE), "rb") as f:
        return f.read()


def signer_etc(top, *ders):
    """TOP/systemtap, to lay over /etc/systemtap: staprun's signer database
    trusting ders, made the normal way, plus what staprun 4.8 needs."""
    etc = os.path.join(top, "systemtap")
    db = stap_client.CertDB(os.path.join(etc, "staprun"))
    os.makedirs(os.path.join(etc, "ssl"))
    db.create(mode=0o755, world_readable=True)
    for der in ders:
        db.add_trusted_server(der)
    for legacy in ("cert8.db", "key3.db", "secmod.db"):  # 4.8 checks these names
        with open(os.path.join(db.path, legacy), "wb"):
            pass
    gid = grp.getgrnam("stapusr").gr_gid
    for name in ("cert9.db", "key4.db"):  # 4.8 opens it read-write as the user
        os.chown(os.path.join(db.path, name), 0, gid)
        os.chmod(os.path.join(db.path, name), 0o664)
    return etc


def as_stapusr(user, home, argv, etc=None, env=None, timeout=300):
    """argv as the stapusr user, in a private mount namespace where etc (if
    given) is /etc/systemtap."""
    mount = f"mount --bind {etc} /etc/systemtap && " if etc else ""
    inner = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
             "env", "-i", "PATH=/usr/bin:/bin", f"HOME={home}", "LANG=C.UTF-8",
             *[f"{k}={v}" for k, v in (env or {}).items()], *argv]
    return subprocess.run(["unshare", "-m", "sh", "-c", mount + 'exec "$@"', "sh", *inner],
                          cwd=home, capture_output=True, text=True, timeout=timeout)


def verify_sgn(srv, module, workdir):
    pub = os.path.join(workdir, "server-pub.pem")
    cert = os.path.join(srv.status["database"], stap_client.SERVER_CERT_FILE)
    with open(pub, "w") as f:
        subprocess.run(["openssl", "x509", "-inform", "DER", "-in", cert, "-pubkey", "-noout"],
                       stdout=f, check=True)
    return subprocess.run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature",
                           module + ".sgn", module], capture_output=True, text=True)


def signed_module(box, srv, krel):
    """stap-client -p4 at stapusr through srv: the delivered module's path."""
    proc = box.run("stap-client", f"--server={srv.address}", "-r", krel,
                   "--privilege=stapusr", "-p4", "-e", SCRIPT)
    assert proc.returncode == 0, proc.stderr
    return module_in(box.top)


def module_in(directory):
    mods = [n for n in os.listdir(directory) if n.endswith(".ko")]
    assert len(mods) == 1, os.listdir(directory)
    return os.path.join(directory, mods[0])


def test_real_client_at_stapusr_gets_a_signed_module(server, krel, stapusr, home):
    proc = as_stapusr(stapusr, home, ["stap", "--trust-servers=ssl,no-prompt",
                                      f"--use-server={server.address}"])
    assert proc.returncode == 0, proc.stderr
    proc = as_stapusr(stapusr, home, ["stap", f"--use-server={server.address}", "-r", krel,
                                      "--privilege=stapusr", "-p4", "-e", SCRIPT])
    assert proc.returncode == 0, proc.stderr
    module = module_in(home)
    check = verify_sgn(server, module, home)
    assert check.stdout.strip() == "Verified OK", check.stdout + check.stderr
    assert os.path.getsize(module + ".sgn") == 384  # RSA-3072


def test_our_client_at_stapusr_gets_a_signed_module(server, sandbox, krel):
    module = signed_module(sandbox, server, krel)
    check = verify_sgn(server, module, sandbox.top)
    assert check.stdout.strip() == "Verified OK", check.stdout + check.stderr
    # stapdev (the default) gets no signature: staprun needs none there
    for name in os.listdir(sandbox.top):
        if name.endswith((".ko", ".sgn")):
            os.unlink(os.path.join(sandbox.top, name))
    proc = sandbox.run("stap-client", f"--server={server.address}", "-r", krel, "-p4",
                       "-e", SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(module_in(sandbox.top) + ".sgn")


def test_real_staprun_checks_the_signature(servers, server, sandbox, krel, runtime,
                                           cache_dir, stapusr, home):
    """valid: inserted (then the kernel's refusal); one byte altered:
    altered; signed by a server that is no trusted signer: unable to verify."""
    signed = signed_module(sandbox, server, krel)
    for suffix in ("", ".sgn"):
        shutil.copy(signed + suffix, os.path.join(home, "valid.ko" + suffix))
        shutil.copy(signed + suffix, os.path.join(home, "altered.ko" + suffix))
    with open(os.path.join(home, "altered.ko"), "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    other_box = shared.make_sandbox()
    other = servers.start(other_box, krel, runtime, cache=cache_dir)
    foreign = signed_module(other_box, other, krel)
    for suffix in ("", ".sgn"):
        shutil.copy(foreign + suffix, os.path.join(home, "foreign.ko" + suffix))
    for name in os.listdir(home):
        os.chmod(os.path.join(home, name), 0o644)
    etc = signer_etc(sandbox.path("signers"), server_der(server))
    said = {}
    for name in ("valid", "altered", "foreign"):
        run = as_stapusr(stapusr, home, ["staprun", "-v", os.path.join(home, f"{name}.ko")],
                         etc=etc)
        said[name] = run.stderr + run.stdout
        print(f"staprun {name}.ko:\n{said[name]}")
        assert run.returncode != 0  # the kernel here loads nothing
    assert f"Module valid inserted from file {home}/valid.ko" in said["valid"], said["valid"]
    assert "Function not implemented" in said["valid"]
    assert (f"Unable to verify the signed module {home}/altered.ko. It may have been altered "
            "since it was created.") in said["altered"], said["altered"]
    assert "Unable to verify" in said["foreign"] and "inserted" not in said["foreign"], \
        said["foreign"]
    shutil.rmtree(other_box.top, ignore_errors=True)


def test_our_client_for_a_stapusr_user_runs_pass_5_signed(server, krel, stapusr, home):
    """A stapusr user's stap-client adds --privilege=stapusr (saying so) and
    hands the real staprun the module with its signature beside it."""
    box = shared.make_sandbox(STAPUSR)
    try:
        db, cert = os.path.join(home, "trusted"), os.path.join(home, "server.cert")
        shutil.copy(os.path.join(server.status["database"], stap_client.SERVER_CERT_FILE), cert)
        os.chown(cert, stapusr.pw_uid, stapusr.pw_gid)
        proc = box.run("stap-add-server-cert", cert, db)
        assert proc.returncode == 0, proc.stderr
        etc = signer_etc(box.path("signers"), server_der(server))
        run = as_stapusr(stapusr, home, [shared.PYTHON, shared.CLIENT, "stap-client",
                                         f"--server={server.address}", f"--ssl={db}", "-v",
                                         "-r", krel, "-e", SCRIPT],
                         etc=etc, env={"SYSTEMTAP_DIR": box.systemtap_dir})
        out = run.stdout + run.stderr
        print(out)
        assert ("--privilege=stapusr was automatically selected because you are a member of "
                "the group stapusr.") in out
        assert "Function not implemented" in out, out  # staprun verified, the kernel refused
        assert "Unable to verify" not in out, out
        assert run.returncode == 1
    finally:
        shutil.rmtree(box.top, ignore_errors=True)


# --------------------------------------------------------------------------
# Trust that is easy to grant and to revoke: stap-add-server-cert
# --------------------------------------------------------------------------

def test_add_server_cert_from_the_server_after_a_look(server, sandbox):
    der = server_der(server)
    db = sandbox.path("fetched")
    refused = sandbox.run("stap-add-server-cert", server.address, db, input=b"n\n")
    out = refused.stdout.decode()
    assert refused.returncode == 1
    assert f"SHA-256:     {stap_client.fingerprint(der)}" in out, out
    assert f"serial:      {stap_client.serial_text(stap_client.certificate_serial(der))}" in out
    assert "subject:     CN=Systemtap Compile Server,OU=Systemtap" in out
    assert out.index("SHA-256") < out.index("[y/N]")  # shown before anything is granted
    assert refused.stderr.decode().strip() == (
        f"stap-add-server-cert: ERROR: not trusted: nothing was added to {db}")
    assert not os.path.exists(db)
    typed = sandbox.run("stap-add-server-cert", server.address, db, input=b"y\n")
    assert typed.returncode == 0, typed.stderr
    assert stap_client.CertDB(db).certificates() == [der]
    scripted = sandbox.run("stap-add-server-cert", "--yes", server.address,
                           sandbox.path("scripted"), input=b"")
    assert scripted.returncode == 0, scripted.stderr
    assert stap_client.CertDB(sandbox.path("scripted")).certificates() == [der]
    lines = [l for l in open(server.log) if "certificate fetch" in l]
    assert len(lines) == 3, lines  # only the certificate was asked for


def test_add_server_cert_signer_and_revoke(servers, server, sandbox, krel, user_sandbox):
    der = server_der(server)
    other = servers.start(shared.make_sandbox(), krel, None)
    other_der = server_der(other)
    cert = sandbox.path("server.cert")
    with open(cert, "wb") as f:
        f.write(der)
    proc = sandbox.run("stap-add-server-cert", "--signer", cert)
    assert proc.returncode == 0, proc.stderr
    proc = sandbox.run("stap-add-server-cert", "--signer", "--yes", other.address)
    assert proc.returncode == 0, proc.stderr
    signers = stap_client.CertDB(os.path.join(sandbox.sysconfdir, "systemtap", "staprun"))
    assert sorted(signers.certificates()) == sorted([der, other_der])
    user = user_sandbox.run("stap-add-server-cert", "--signer", "--yes", server.address)
    assert user.returncode == 1
    assert b"--signer: only root decides whose module signatures staprun accepts" in user.stderr
    # revoke by serial (colons or not) and by fingerprint; the other stays
    serial = stap_client.serial_text(stap_client.certificate_serial(der))
    proc = sandbox.run("stap-add-server-cert", "--revoke", serial, signers.path)
    assert proc.returncode == 0, proc.stderr
    assert signers.certificates() == [other_der]
    proc = sandbox.run("stap-add-server-cert", "--revoke", serial, signers.path)
    assert proc.returncode == 1
    assert b"no certificate with serial or fingerprint" in proc.stderr
    proc = sandbox.run("stap-add-server-cert", "--revoke",
                       stap_client.fingerprint(other_der), signers.path)
    assert proc.returncode == 0, proc.stderr
    assert signers.certificates() == []
