"""Fuzzing the request decoder (framing, archive checks, request parsing)
and the client's reply decoder with hypothesis.  Every input yields
well-formed reply bytes (a zip with an rc entry) or an Error; never a
crash, a hang or a file outside the request (reply) directory.  stap is a
stand-in (/bin/true) so the run is fast; certutil and signtool are real."""

import io
import os
import re
import shutil
import stat
import tempfile
import time
import types
import uuid
import warnings
import zipfile

import pytest
import shared
from hardening_helpers import base_entries

import stap_client
import stap_server

pytestmark = pytest.mark.integration
pytest.importorskip("hypothesis", reason="hypothesis (python3-hypothesis) is not installed")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

TOKEN = "hxfz" + uuid.uuid4().hex[:6]
MAX_REQUEST = 8 << 20
EXAMPLES = int(os.environ.get("HX_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def fuzz_env(krel):
    """A real server database and Config, in a private sandbox, with stap
    replaced by /bin/true; yields (config, watch dir, client databases)."""
    box = shared.make_sandbox()
    watch = box.path("watch")
    tmpdir = os.path.join(watch, "tmp")
    os.makedirs(tmpdir, 0o755)
    cache = box.path("cache")
    os.makedirs(cache, 0o755)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("STAP_SYSCONFDIR", "SYSTEMTAP_DIR", "HOME"):
            mp.setenv(k, box.env[k])
        mp.setenv("SYSTEMTAP_STAP", "/bin/true")
        db = stap_client.CertDB(os.path.join(box.sysconfdir, "systemtap", "ssl", "server"))
        der = stap_server.ensure_server_certificate(db)
        config = stap_server.parse_config(
            ["-r", krel, "--ssl", db.path, "--tmpdir", tmpdir, "--cache-dir", cache,
             "--max-compressed-request", str(MAX_REQUEST), "--max-request-size", str(1 << 20),
             "--log", box.path("server.log"), "--tmpdir-min-free", "0"])
        config = stap_server.prepare_compile_step(config)  # the knowledge directory, a sandbox
        stap_client.open_databases([db])  # read-only, beside the tests' client databases
        credentials = stap_server.Credentials(der)
        client_db = stap_client.CertDB(stap_client.global_client_db_path())
        yield types.SimpleNamespace(config=config, watch=watch, tmpdir=tmpdir, der=der,
                                    credentials=credentials, client_dbs=[client_db], box=box,
                                    krel=krel)
    shutil.rmtree(box.top, ignore_errors=True)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

NAMES = ["version", "sysinfo", "argv1", "argv2", "argv3", "locale", "mok_fingerprints",
         "script/-", "script/tmp/x.stp", "tapset/usr/share/t/a.stp", "tapset/", "script/",
         "argv1/", "version/x", "rc", "stdout", "stderr", "stap000000/m.ko", "META-INF/x",
         "META-INF/MANIFEST.MF", "META-INF/ZIGBERT.RSA", "request", "tmp/x",
         f"../{TOKEN}", f"../../{TOKEN}", f"../../../{TOKEN}", f"/tmp/{TOKEN}",
         f"script/../../{TOKEN}", f"..\\{TOKEN}", ".", "..", "", "a//b", "a/./b", "/",
         "x\0y", "é", "a" * 300]

ARGS = [b"-p1", b"-p2", b"-p4", b"-p5", b"-p9", b"-eprobe begin { exit() }", b"-e",
        b"-I/etc", b"-Itapset/usr/share/t", b"-R/tmp", b"--tmpdir=/tmp", b"-d", b"/bin/ls",
        b"-r/lib/modules", b"-mmod", b"-m../x", b"--", b"script/tmp/x.stp",
        b"../../etc/passwd", b"-vvvv", b"-k", b"-o/tmp/out", b"--remote", b"-x",
        b"\xff\xfe", b"-c", b"-l", b"-L", b'kernel.function("*")', b"--privilege=stapusr"]

TYPES = [0, stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777,
         stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o666, stat.S_IFIFO | 0o644,
         stat.S_IFSOCK | 0o777, stat.S_IFREG | 0o4755]


def contents(krel):
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from(ARGS),
        st.sampled_from([f"sysinfo: {krel} x86_64".encode(), b"sysinfo: 1.0 x86_64",
                         b"4.8", b"LANG=C.UTF-8\nLC_ALL=$(id)\n", b"sysinfo:",
                         f"sysinfo: {krel} x86_64 extra".encode()]),
        st.integers(0, 3 << 20).map(lambda n: b"\0" * n))  # up to bomb sizes


def entries(krel):
    name = st.one_of(st.sampled_from(NAMES), st.text("ab/.\\-_\0", max_size=12))
    attr = st.one_of(st.sampled_from(TYPES).map(lambda t: t << 16),
                     st.integers(0, 2**32 - 1))
    method = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
    return st.lists(st.tuples(name, contents(krel), attr, method), max_size=12)


REPLY_BASE = [("version", b"4.8"), ("rc", b"0"), ("stdout", b"out\n"), ("stderr", b"")]


def build_zip(krel, base, items):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are part of the game
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in {False: [], True: base_entries(krel),
                               "reply": REPLY_BASE}[base]:
                zf.writestr(name, data)
            for name, data, attr, method in items:
                zi = zipfile.ZipInfo(name or "_", date_time=(2024, 1, 1, 0, 0, 0))
                zi.external_attr = attr
                zi.create_system = 3
                zi.compress_type = method
                zf.writestr(zi, data)
    return buf.getvalue()


def mutate(data, edits):
    data = bytearray(data)
    for pos, value in edits:
        if data:
            data[pos % len(data)] = value
    return bytes(data)


BASES = st.booleans()


def request_bodies(krel, base=BASES):
    valid = st.builds(build_zip, st.just(krel), base, entries(krel))
    return st.one_of(
        st.binary(min_size=1, max_size=512),
        valid,
        st.builds(mutate, valid, st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)),
                                          min_size=1, max_size=8)),
        st.builds(lambda d, n: d[:n], valid, st.integers(1, 400)))


def framings(body):
    """Honest (most of the time), lying and broken size prefixes around a body."""
    n = len(body)
    honest = st.just(n.to_bytes(4, "big", signed=True) + body)
    other = st.one_of(
        st.integers(-2**31, 2**31 - 1).map(lambda s: s.to_bytes(4, "big", signed=True) + body),
        st.integers(1, 8).map(lambda k: (n + k).to_bytes(4, "big") + body),  # fewer
        st.binary(min_size=1, max_size=8).map(lambda x: n.to_bytes(4, "big") + body + x),  # more
        st.binary(max_size=3))
    return st.integers(0, 9).flatmap(lambda k: honest if k < 7 else other)


# --------------------------------------------------------------------------
# A socket stand-in for the framing layer
# --------------------------------------------------------------------------

class FakeSocket:
    """What read_request needs of an NSS socket: recv(n, timeout) that
    returns the given bytes in pieces, then EOF."""

    def __init__(self, data, piece):
        self.data, self.piece = data, max(1, piece)

    def recv(self, n, timeout):
        chunk, self.data = self.data[:min(n, self.piece)], self.data[min(n, self.piece):]
        return chunk


def outside_files(env):
    """Anything a decoder wrote where it must not."""
    bad = [os.path.join(env.watch, n) for n in os.listdir(env.watch) if n != "tmp"]
    bad += [os.path.join(env.tmpdir, n) for n in os.listdir(env.tmpdir)]
    bad += [p for p in (f"/tmp/{TOKEN}", f"/{TOKEN}", os.path.join(env.box.top, TOKEN),
                        os.path.join(os.path.dirname(env.box.top), TOKEN))
            if os.path.lexists(p)]
    return bad


def check_reply(reply):
    assert isinstance(reply, bytes) and reply
    with zipfile.ZipFile(io.BytesIO(reply)) as zf:
        names = zf.namelist()
        assert "rc" in names and "version" in names and "stderr" in names, names
        rc = int(zf.read("rc"))
        assert rc in (0, 1)
        if rc == 1:  # the stand-in stap (/bin/true) never fails: every rc 1 is the server's
            assert zf.read("stderr").startswith(b"stap-serverd: ERROR: "), zf.read("stderr")
        assert all(n.startswith(("META-INF/", stap_client.RESPONSE_DIR + "/"))
                   or n in ("rc", "version", "stdout", "stderr") for n in names), names
    return rc


# --------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------

FUZZ = settings(max_examples=EXAMPLES, deadline=10000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


def test_request_decoder_fuzz(fuzz_env, krel):
    env = fuzz_env
    stats = {"inputs": 0, "framing refused": 0, "rc 0": 0, "rc 1": 0}
    service = stap_server.CompileService(env.config, env.credentials, "4.8")
    reasons = {}
    started = time.monotonic()

    @FUZZ
    @given(st.data())
    def run(data):
        body = data.draw(request_bodies(krel))
        framed = data.draw(framings(body))
        piece = max(data.draw(st.integers(1, 70000)), len(framed) // 256)  # bounded recvs
        stats["inputs"] += 1
        record = stap_server.RequestRecord()
        got = None
        if len(framed) >= 4:
            try:
                with stap_server.read_request(FakeSocket(framed, piece), record, service) as (
                        admission, body):
                    got = body.read() if admission is stap_server.Admission.READ else None
            except stap_client.Error:
                got = None
        if got is None:
            stats["framing refused"] += 1
            why = re.sub(r" -?\d+$", "", record.error or "short")
            reasons[why] = reasons.get(why, 0) + 1
            return
        t = time.monotonic()
        reply = service.handle(stap_server.Admission.READ, got, record)  # never raises
        stats[f"rc {check_reply(reply)}"] += 1
        assert time.monotonic() - t < 30, "the decoder hung"
        assert outside_files(env) == [], "written outside the request directory"

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYSTEMTAP_STAP", "/bin/true")
        run()
    print(f"request decoder fuzz: {stats} in {time.monotonic() - started:.1f} s; "
          f"framing refusals: {reasons}")
    assert stats["inputs"] >= EXAMPLES * 0.9
    assert stats["rc 1"] > 0 and stats["framing refused"] > 0


def test_reply_decoder_fuzz(fuzz_env, krel):
    """The client's read_reply on hostile replies: a Reply or an Error,
    nothing written outside its directory."""
    env = fuzz_env
    stats = {"inputs": 0, "Reply": 0, "Error": 0}
    stap_client.open_databases(env.client_dbs)
    root = tempfile.mkdtemp(prefix="hx-reply-fuzz.")
    inner = os.path.join(root, "a", "b")
    started = time.monotonic()

    @FUZZ
    @given(request_bodies(krel, st.sampled_from([False, "reply", "reply", "reply"])))
    def run(body):
        stats["inputs"] += 1
        os.makedirs(inner, 0o700)
        try:
            try:
                reply = stap_client.read_reply(body, inner, env.der)
            except stap_client.Error:
                stats["Error"] += 1
            else:
                stats["Reply"] += 1
                assert isinstance(reply.rc, int)
                if reply.module:
                    assert os.path.realpath(reply.module).startswith(inner + "/")
            assert sorted(os.listdir(root)) == ["a"] and os.listdir(os.path.join(root, "a")) \
                == ["b"], "written outside the reply directory"
            assert not os.path.lexists(f"/tmp/{TOKEN}")
        finally:
            shutil.rmtree(os.path.join(root, "a"))

    try:
        run()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"reply decoder fuzz: {stats} in {time.monotonic() - started:.1f} s")
    assert stats["inputs"] >= EXAMPLES * 0.9 and stats["Error"] > 0 and stats["Reply"] > 0
