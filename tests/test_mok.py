"""Secure Boot (issue 22): a client whose kernel loads only modules signed by an
enrolled machine owner key (MOK) sends the SHA-1 fingerprints of its enrolled
systemtap MOKs (or "missing"); the server signs the module with the matching
key pair from <server db>/moks/<fingerprint>/ using the kernel's own
scripts/sign-file, outside the sandbox, or answers rc 1 with the real server's
message and its signing_key.x509 to enroll.

Key pairs are made with `openssl req -x509`, as systemtap makes them.  The
clients (ours and the real 4.8 `stap --use-server`) run with SYSTEMTAP_SIGN=1
and a stand-in `mokutil` on PATH that prints --list-enrolled as mokutil does
(the certificate printed by OpenSSL's X509_print_fp): this kernel cannot load
modules, so loading is not tested; the signature is checked with modinfo and
`openssl cms -verify` against the certificate."""

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import types

import pytest
from netns import network_factory  # noqa: F401  (a fixture)
from shared import CLIENT, PYTHON, copy_program, make_sandbox, need_root, start_server, stop_pid

import stap_client
import stap_server

pytestmark = pytest.mark.integration

STAP = shutil.which("stap") or "/usr/bin/stap"
SCRIPT = "probe begin { exit() }"
MARKER = b"~Module signature appended~\n"
SIGNER = "Systemtap module signing key"
OPENSSL_CONFIG = stap_server.MOK_OPENSSL_CONFIG.replace("default_bits = 4096",
                                                        "default_bits = 2048")  # quicker


# --------------------------------------------------------------------------
# Key pairs, the stand-in mokutil, signed modules taken apart
# --------------------------------------------------------------------------

def make_key_pair(moks, organization="Systemtap"):
    """A key pair made with openssl req -x509 in moks/<its SHA-1 fingerprint>/; the fingerprint."""
    os.makedirs(moks, 0o755, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=moks)
    config = os.path.join(tmp, "openssl.cnf")
    with open(config, "w") as f:
        f.write(OPENSSL_CONFIG.replace("Systemtap", organization))
    subprocess.run(["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "36500",
                    "-batch", "-x509", "-config", config, "-outform", "DER",
                    "-out", os.path.join(tmp, "signing_key.x509"),
                    "-keyout", os.path.join(tmp, "signing_key.priv")],
                   check=True, capture_output=True, timeout=120)
    os.unlink(config)
    os.chmod(os.path.join(tmp, "signing_key.priv"), 0o600)
    fp = openssl_sha1(os.path.join(tmp, "signing_key.x509"))
    os.rename(tmp, os.path.join(moks, fp))
    return fp


def openssl_sha1(cert):
    """The certificate's SHA-1 fingerprint as openssl computes it, in mokutil's form."""
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", cert, "-noout",
                          "-fingerprint", "-sha1"], capture_output=True, text=True,
                         check=True).stdout
    return out.strip().split("=", 1)[1].lower()


def mokutil_listing(certs):
    """mokutil --list-enrolled for these DER certificate files: each key's SHA-1 line, then the
    certificate as X509_print_fp prints it."""
    text = ""
    for n, cert in enumerate(certs, 1):
        body = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", cert, "-noout",
                               "-text", "-nameopt", "compat"], capture_output=True, text=True,
                              check=True).stdout
        text += f"[key {n}]\nSHA1 Fingerprint: {openssl_sha1(cert)}\n{body}\n"
    return text


def mokutil_dir(top, listing):
    """A directory holding a stand-in mokutil that prints listing for --list-enrolled."""
    bindir = os.path.join(top, "mokutil-bin")
    os.makedirs(bindir, exist_ok=True)
    with open(os.path.join(bindir, "listing"), "w") as f:
        f.write(listing)
    copy_program("mokutil_listing.sh", os.path.join(bindir, "mokutil"))
    os.chmod(top, 0o755)
    return bindir


def cert_of(moks, fp):
    return os.path.join(moks, fp, "signing_key.x509")


def check_signed(module, cert, workdir, elf=True):
    """The module's appended signature: modinfo names the key's signer (an ELF module), and
    openssl cms -verify accepts the PKCS#7 at the module's tail over the module's bytes against the
    certificate; the bytes signed."""
    if elf:
        check_modinfo(module)
    with open(module, "rb") as f:
        data = f.read()
    assert data.endswith(MARKER)
    sig_len = int.from_bytes(data[-len(MARKER) - 4:-len(MARKER)], "big")
    end = len(data) - len(MARKER) - 12  # struct module_signature
    paths = {n: os.path.join(workdir, n) for n in ("content", "pkcs7", "cert.pem")}
    with open(paths["content"], "wb") as f:
        f.write(data[:end - sig_len])
    with open(paths["pkcs7"], "wb") as f:
        f.write(data[end - sig_len:end])
    subprocess.run(["openssl", "x509", "-inform", "DER", "-in", cert, "-out", paths["cert.pem"]],
                   check=True)
    verify = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER",
                             "-in", paths["pkcs7"], "-content", paths["content"],
                             "-certfile", paths["cert.pem"], "-CAfile", paths["cert.pem"],
                             "-purpose", "any", "-out", "/dev/null"],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert "Verification successful" in verify.stderr
    return data[:end - sig_len]


def check_modinfo(module):
    info = subprocess.run(["modinfo", "-F", "signer", module], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert info == SIGNER, info
    algo = subprocess.run(["modinfo", "-F", "sig_hashalgo", module], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert algo == "sha256", algo


def module_in(directory):
    mods = [n for n in os.listdir(directory) if n.endswith(".ko")]
    assert len(mods) == 1, os.listdir(directory)
    return os.path.join(directory, mods[0])


def one_line(text):
    return " ".join(text.split())


# --------------------------------------------------------------------------
# A server with one MOK, and clients on a Secure Boot host enrolled with it
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mok_server(krel, runtime, cache_dir):
    """(server, its moks directory, the enrolled fingerprint): a server whose database holds one
    Systemtap key pair, made before it started."""
    need_root()
    box = make_sandbox()
    db = box.path("server-db")
    fp = make_key_pair(os.path.join(db, "moks"))
    srv = start_server(box, krel, runtime, "--ssl", db, cache=cache_dir)
    try:
        yield srv, os.path.join(db, "moks"), fp
    finally:
        srv.stop()
        shutil.rmtree(box.top, ignore_errors=True)


@pytest.fixture
def host(tmp_path):
    """A client's Secure Boot host: .env(listing) gives the environment of clients there."""
    top = str(tmp_path)

    def env(listing):
        return {"SYSTEMTAP_SIGN": "1",
                "PATH": mokutil_dir(top, listing) + ":/usr/bin:/bin:/usr/sbin:/sbin"}
    return types.SimpleNamespace(env=env, top=top)


def our_client(srv, krel, env, cwd, *args):
    """Our client in cwd, trusting srv as the server's own sandbox does."""
    return srv.box.run("stap-client", f"--server={srv.address}", "-r", krel, *args, "-e", SCRIPT,
                       env=env, cwd=cwd)


@pytest.fixture
def cwd():
    d = tempfile.mkdtemp(prefix="stap-mok.")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_our_client_gets_a_module_signed_with_its_enrolled_mok(mok_server, host, krel, cwd):
    srv, moks, fp = mok_server
    other = make_key_pair(os.path.join(host.top, "distro"), organization="Debian")
    listing = mokutil_listing([cert_of(os.path.join(host.top, "distro"), other),
                               cert_of(moks, fp)])
    proc = our_client(srv, krel, host.env(listing), cwd, "-p4")
    assert proc.returncode == 0, proc.stderr
    check_signed(module_in(cwd), cert_of(moks, fp), host.top)
    assert not os.path.exists(os.path.join(cwd, "signing_key.x509"))


def test_our_client_without_a_common_mok_gets_the_message_and_a_key(mok_server, host, krel,
                                                                    cwd):
    """An enrolled Systemtap key the server lacks: rc 1, the real server's message, the
    server's certificate saved in the current directory with how to enroll it; no module."""
    srv, moks, fp = mok_server
    foreign = make_key_pair(os.path.join(host.top, "elsewhere"))
    listing = mokutil_listing([cert_of(os.path.join(host.top, "elsewhere"), foreign)])
    proc = our_client(srv, krel, host.env(listing), cwd, "-p4")
    err = one_line(proc.stderr.decode())
    assert proc.returncode == 1, err
    assert ("No matching machine owner key (MOK) available on the server to sign the "
            "module.") in err
    assert "mokutil --import signing_key.x509" in err
    assert "saved as signing_key.x509" in err and "reboot" in err  # our client's paragraph
    with open(os.path.join(cwd, "signing_key.x509"), "rb") as f, \
            open(cert_of(moks, fp), "rb") as g:
        assert f.read() == g.read()
    assert not [n for n in os.listdir(cwd) if n.endswith(".ko")]


def cache_outcomes(srv):
    with open(srv.log) as f:
        return re.findall(r" request client=.*? cache='(\w+)'", f.read())


def test_signed_modules_are_cached_per_mok(mok_server, host, krel, tmp_path):
    """The same request with the same MOK: answered from the result cache, the same signed
    module; with another enrolled MOK the server lacks: not that module, a key to enroll."""
    srv, moks, fp = mok_server
    listing = mokutil_listing([cert_of(moks, fp)])
    script = 'probe begin { println("cached per MOK") exit() }'
    got = []
    for n in range(2):
        work = tmp_path / f"c{n}"
        work.mkdir()
        before = len(cache_outcomes(srv))
        proc = srv.box.run("stap-client", f"--server={srv.address}", "-r", krel, "-p4", "-e",
                           script, env=host.env(listing), cwd=str(work))
        assert proc.returncode == 0, proc.stderr
        got.append(check_signed(module_in(str(work)), cert_of(moks, fp), str(work)))
        assert cache_outcomes(srv)[before:] == ["hit" if n else "miss"]
    assert got[0] == got[1]
    foreign = make_key_pair(str(tmp_path / "elsewhere"))
    work = tmp_path / "other"
    work.mkdir()
    proc = srv.box.run("stap-client", f"--server={srv.address}", "-r", krel, "-p4", "-e", script,
                       env=host.env(mokutil_listing([cert_of(str(tmp_path / "elsewhere"),
                                                             foreign)])), cwd=str(work))
    assert proc.returncode == 1
    assert (work / "signing_key.x509").exists() and not list(work.glob("*.ko"))


def test_a_stapusr_module_is_signed_for_staprun_after_the_mok(mok_server, host, krel, cwd):
    """--privilege=stapusr and Secure Boot: the .sgn staprun checks covers the module as
    delivered, its MOK signature included."""
    srv, moks, fp = mok_server
    proc = our_client(srv, krel, host.env(mokutil_listing([cert_of(moks, fp)])), cwd,
                      "--privilege=stapusr", "-p4")
    assert proc.returncode == 0, proc.stderr
    module = module_in(cwd)
    check_signed(module, cert_of(moks, fp), cwd)
    pub = os.path.join(cwd, "server-pub.pem")
    with open(pub, "w") as f:
        subprocess.run(["openssl", "x509", "-inform", "DER", "-in",
                        os.path.join(srv.status["database"], stap_client.SERVER_CERT_FILE),
                        "-pubkey", "-noout"], stdout=f, check=True)
    check = subprocess.run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature",
                            module + ".sgn", module], capture_output=True, text=True)
    assert check.stdout.strip() == "Verified OK", check.stdout + check.stderr


def test_real_client_gets_a_module_signed_with_its_enrolled_mok(mok_server, host, krel):
    srv, moks, fp = mok_server
    env = real_client_env(srv, host, mokutil_listing([cert_of(moks, fp)]))
    proc = subprocess.run([STAP, f"--use-server={srv.address}", "-r", krel, "-p4", "-m",
                           "mok_real", "-e", SCRIPT], env=env, cwd=host.top,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    module = os.path.join(host.top, "mok_real.ko")
    check_signed(module, cert_of(moks, fp), host.top)


def test_real_client_with_missing_mok_saves_the_servers_key(mok_server, host, krel):
    """No Systemtap key enrolled: the real client sends "missing"; it saves the server's
    signing_key.x509 in its current directory and fails."""
    srv, moks, fp = mok_server
    env = real_client_env(srv, host, "MokListRT is empty\n")
    proc = subprocess.run([STAP, f"--use-server={srv.address}", "-r", krel, "-p4", "-m",
                           "mok_none", "-e", SCRIPT], env=env, cwd=host.top,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr
    assert "No matching machine owner key (MOK)" in one_line(proc.stderr)
    with open(os.path.join(host.top, "signing_key.x509"), "rb") as f, \
            open(cert_of(moks, fp), "rb") as g:
        assert f.read() == g.read()
    assert not os.path.exists(os.path.join(host.top, "mok_none.ko"))


def real_client_env(srv, host, listing):
    """The real client's environment on the Secure Boot host, trusting srv."""
    env = {**host.env(listing), "HOME": host.top, "LANG": "C.UTF-8",
           "SYSTEMTAP_DIR": os.path.join(host.top, ".systemtap")}
    proc = subprocess.run([STAP, "--trust-servers=ssl,no-prompt", f"--use-server={srv.address}"],
                          env=env, cwd=host.top, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return env


def test_a_server_without_moks_makes_one_for_missing(servers, krel, runtime, cache_dir, host):
    """A server with no key pair makes one (openssl req -x509, private key 0600) and sends its
    certificate; the next "missing" gets the same one."""
    need_root()
    box = make_sandbox()
    try:
        db = box.path("server-db")
        srv = servers.start(box, krel, runtime, "--ssl", db, cache=cache_dir)
        got = []
        for n in range(2):  # the server's own sandbox trusts it
            work = box.path(f"client{n}")
            os.mkdir(work)
            proc = box.run("stap-client", f"--server={srv.address}", "-r", krel, "-p4", "-e",
                           SCRIPT, env=host.env("MokListRT is empty\n"), cwd=work)
            assert proc.returncode == 1, proc.stderr
            with open(os.path.join(work, "signing_key.x509"), "rb") as f:
                got.append(f.read())
        made = os.listdir(os.path.join(db, "moks"))
        assert len(made) == 1 and got[0] == got[1], made
        key = os.stat(os.path.join(db, "moks", made[0], "signing_key.priv"))
        assert stat.S_IMODE(key.st_mode) == 0o600
        assert stap_server.mok_fingerprint(got[0]) == made[0]
        text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-text"],
                              input=got[0], capture_output=True, check=True).stdout.decode()
        assert "O = Systemtap" in text and "Digital Signature" in text and "CA:FALSE" in text
    finally:
        shutil.rmtree(box.top, ignore_errors=True)


def test_a_passes_1_to_3_request_needs_no_key(mok_server, host, krel, cwd):
    """-p2 builds no module: nothing to sign, the listing comes back (as the real server)."""
    srv, moks, fp = mok_server
    proc = our_client(srv, krel, host.env("MokListRT is empty\n"), cwd, "-p2")
    assert proc.returncode == 0, proc.stderr
    assert b"begin" in proc.stdout
    assert not os.path.exists(os.path.join(cwd, "signing_key.x509"))


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

def test_a_malformed_fingerprint_is_refused_in_one_line(mok_server, host, krel, cwd):
    """A fingerprint that is not 20 hex bytes (a short one mokutil would never print, reaching
    the request through a broken listing) is refused, not ignored as the real server does."""
    srv, _, _ = mok_server
    listing = "[key 1]\nSHA1 Fingerprint: ab:cd:ef\n        Issuer: O=Systemtap, CN=x\n"
    proc = our_client(srv, krel, host.env(listing), cwd, "-p4")
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "MOK fingerprint value 'ab:cd:ef' isn't in the correct format" in err
    assert len([l for l in err.splitlines() if "ERROR" in l]) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["ab:cd", "AB" * 20, "zz" + ":00" * 19, "00" + ":00" * 20,
                                   "missing please", "ab:cd\x1b[31m"])
def test_fingerprint_format(value):
    with pytest.raises(stap_client.Error, match="isn't in the correct format"):
        stap_server.mok_fingerprints(value.encode() + b"\n")


def test_fingerprints_are_read_in_order_lower_case():
    fp = ":".join(["AB"] * 20)
    assert stap_server.mok_fingerprints(f"{fp}\nmissing\n{fp.lower()}\n".encode()) == \
        (fp.lower(), "missing")
    assert stap_server.mok_fingerprints(None) == ()


def start_refused(box, krel, runtime, db):
    """stap-start-server with database db: its one-line refusal."""
    proc = box.run("stap-start-server", "--listen", "127.0.0.1", "-r", krel, "--ssl", db,
                   "--advertise", "none", "--log", box.path("server.log"),
                   *(["-R", runtime] if runtime else []), timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err
    return err


def test_a_mok_directory_that_is_a_link_is_refused_at_start(krel, runtime):
    need_root()
    box = make_sandbox()
    try:
        db = box.path("server-db")
        fp = make_key_pair(box.path("elsewhere"))
        os.makedirs(os.path.join(db, "moks"))
        os.symlink(box.path("elsewhere", fp), os.path.join(db, "moks", fp))
        err = start_refused(box, krel, runtime, db)
        assert f"MOK directory {db}/moks/{fp} is a link" in err, err
    finally:
        shutil.rmtree(box.top, ignore_errors=True)


def test_a_group_readable_mok_private_key_is_refused_at_start(krel, runtime):
    need_root()
    box = make_sandbox()
    try:
        db = box.path("server-db")
        fp = make_key_pair(os.path.join(db, "moks"))
        key = os.path.join(db, "moks", fp, "signing_key.priv")
        os.chmod(key, 0o640)
        err = start_refused(box, krel, runtime, db)
        assert f"MOK private key {key} is readable by group or others" in err, err
    finally:
        shutil.rmtree(box.top, ignore_errors=True)


def test_store_check_names_each_problem(tmp_path):
    db = str(tmp_path)
    store = stap_server.MokStore(db)
    assert store.check() == []
    fp = make_key_pair(store.path)
    assert store.check() == [fp]
    other = make_key_pair(os.path.join(db, "spare"))
    wrong = os.path.join(store.path, other.replace("0", "1").replace("a", "b"))
    shutil.copytree(os.path.join(db, "spare", other), wrong)
    with pytest.raises(stap_client.Error, match="has the fingerprint"):
        store.check()
    shutil.rmtree(wrong)
    os.unlink(os.path.join(store.path, fp, "signing_key.x509"))
    with pytest.raises(stap_client.Error, match="lacks signing_key.x509"):
        store.check()


def test_sign_file_missing_is_named(tmp_path):
    with pytest.raises(stap_client.Error) as e:
        stap_server.sign_file_program("6.1.0-57-amd64", root=str(tmp_path))
    assert "sign-file is not installed" in str(e.value)
    assert "/lib/modules/6.1.0-57-amd64/build/scripts/sign-file" in str(e.value)
    assert "/usr/lib/linux-kbuild-6.1/scripts/sign-file" in str(e.value)
    kbuild = tmp_path / "usr/lib/linux-kbuild-6.1/scripts"
    kbuild.mkdir(parents=True)
    (kbuild / "sign-file").write_text("#!/bin/sh\n")
    (kbuild / "sign-file").chmod(0o755)
    assert stap_server.sign_file_program("6.1.0-57-amd64", root=str(tmp_path)) == \
        str(kbuild / "sign-file")


def test_sign_uses_the_kernels_sign_file(tmp_path, krel):
    """MokStore.sign: sign-file's appended signature, verified against the certificate."""
    store = stap_server.MokStore(str(tmp_path))
    fp = make_key_pair(store.path)
    data = os.urandom(4096)
    signed = store.sign(fp, data, krel, str(tmp_path))
    module = tmp_path / "m.ko"
    module.write_bytes(signed)
    assert check_signed(str(module), cert_of(store.path, fp), str(tmp_path), elf=False) == data


# --------------------------------------------------------------------------
# The client's side: when to sign, which keys, what is advertised
# --------------------------------------------------------------------------

def sysfs(tmp_path, **files):
    for name, text in files.items():
        path = tmp_path / {"sig_enforce": "module/module/parameters/sig_enforce",
                           "securelevel": "kernel/security/securelevel",
                           "lockdown": "kernel/security/lockdown"}[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


@pytest.mark.parametrize("env, files, expected", [
    ({}, {}, False),
    ({"SYSTEMTAP_SIGN": ""}, {}, True),
    ({"SYSTEMTAP_NOSIGN": "1"}, {"sig_enforce": "Y\n"}, False),
    ({"SYSTEMTAP_SIGN": "1", "SYSTEMTAP_NOSIGN": "1"}, {}, True),
    ({}, {"sig_enforce": "Y\n"}, True),
    ({}, {"sig_enforce": "N\n"}, False),
    ({}, {"securelevel": "1\n"}, True),
    ({}, {"securelevel": "0\n"}, False),
    ({}, {"lockdown": "none [integrity] confidentiality\n"}, True),
    ({}, {"lockdown": "none integrity [confidentiality]\n"}, True),
    ({}, {"lockdown": "[none] integrity confidentiality\n"}, False),
])
def test_modules_must_be_signed_as_stap_decides(tmp_path, env, files, expected):
    assert stap_client.modules_must_be_signed(env, sysfs(tmp_path, **files)) is expected


def test_only_systemtap_keys_are_sent(tmp_path, monkeypatch):
    ours = make_key_pair(str(tmp_path / "a"))
    theirs = make_key_pair(str(tmp_path / "b"), organization="Debian Secure Boot")
    listing = mokutil_listing([cert_of(str(tmp_path / "b"), theirs),
                               cert_of(str(tmp_path / "a"), ours)])
    monkeypatch.setenv("PATH", mokutil_dir(str(tmp_path), listing) + ":/usr/bin:/bin")
    assert stap_client.enrolled_systemtap_moks() == [ours]
    monkeypatch.setenv("SYSTEMTAP_SIGN", "1")
    assert stap_client.secure_boot_moks() == [ours]
    with open(os.path.join(tmp_path, "mokutil-bin", "listing"), "w") as f:
        f.write("MokListRT is empty\n")
    assert stap_client.secure_boot_moks() == ["missing"]


def test_a_failing_mokutil_is_one_line(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mokutil").write_text("#!/bin/sh\necho 'EFI variables are not supported' >&2\n"
                                    "exit 255\n")
    (bindir / "mokutil").chmod(0o755)
    box = make_sandbox()
    try:
        proc = box.run("stap-client", "--server=127.0.0.1:1", "-p4", "-e", SCRIPT,
                       env={"PATH": f"{bindir}:/usr/bin:/bin", "SYSTEMTAP_SIGN": "1"})
        assert proc.returncode == 1
        assert proc.stderr.decode() == (
            "stap-client: ERROR: cannot list the machine owner keys (MOK) for module signing: "
            "mokutil failed: EFI variables are not supported\n")
    finally:
        shutil.rmtree(box.top, ignore_errors=True)


def test_the_offer_advertises_each_mok_and_find_servers_shows_them():
    fps = [":".join([f"{n:02x}"] * 20) for n in (1, 2)]
    offer = stap_server.Offer(4711, ["6.1.0-1-amd64 x86_64"], "4.8", "01:02", mok_info=fps)
    txt = offer.txt("6.1.0-1-amd64 x86_64")
    assert [t for t in txt if t.startswith("mok_info=")] == [f"mok_info={fp}" for fp in fps]
    rec = stap_client.record_from_txt("Systemtap Compile Server on h", "h.local", "192.0.2.1",
                                      4711, stap_client.txt_dict(txt))
    assert f"'mok_info={fps[0]},{fps[1]}'" in stap_client.format_server_line(rec)


def test_our_client_tries_servers_holding_its_mok_first():
    fp, other = ":".join(["0a"] * 20), ":".join(["0b"] * 20)
    recs = [stap_client.record_from_txt(f"s{n}", f"h{n}", "192.0.2.1", n, txt) for n, txt in
            enumerate([{}, {"mok_info": other}, {"mok_info": f"{other},{fp}"}, {}])]
    assert [r.port for r in stap_client.mok_holders_first(recs, [fp])] == [2, 0, 1, 3]
    assert [r.port for r in stap_client.mok_holders_first(recs, ["missing"])] == [0, 1, 2, 3]
    assert stap_client.mok_holders_first(recs, []) == recs


@pytest.mark.parametrize("avahi", [True, False], ids=["avahi", "mdns"])
def test_mok_info_is_advertised_and_shown(avahi, network_factory, krel):  # noqa: F811
    """A server on host A with two MOKs: stap-find-servers on B shows both; with avahi, the
    real client's --list-servers reads them (its mok_fingerprints)."""
    a, b = network_factory(avahi=avahi).hosts
    box = make_sandbox()
    db = box.path("server-db")
    fps = sorted(make_key_pair(os.path.join(db, "moks")) for _ in range(2))
    srv = start_server(box, krel, None, "--ssl", db, netns=a)
    pid, port = srv.pid, srv.port
    try:
        deadline, line, shown = time.monotonic() + 10, "", []
        while sorted(shown) != fps and time.monotonic() < deadline:
            out = b.run([PYTHON, CLIENT, "stap-find-servers", "--all"], env=box.env).stdout
            line = next((l for l in out.splitlines() if f" {port} " in l), "")
            shown = re.findall(r"'mok_info=([^']*)'", line)
            shown = shown[0].split(",") if shown else []  # in whatever order the TXT came
        assert sorted(shown) == fps, line
        if avahi:
            env = {**box.env, "SYSTEMTAP_DIR": box.path("real-client")}
            out = b.run([STAP, "--list-servers=all"], env=env, timeout=60)
            listed = re.search(r'mok_fingerprints="([^"]*)"', out.stdout + out.stderr)
            assert listed, out.stdout + out.stderr
            assert sorted(listed.group(1).split(", ")) == fps
    finally:
        stop_pid(pid)
        shutil.rmtree(box.top, ignore_errors=True)
