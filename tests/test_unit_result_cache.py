"""Unit tier (no root, no network, no stap): the server's result cache.
Hits, misses, what is never cached, the byte bound (least recently used go
first), identical requests arriving together compile once; and the key: what
makes two requests the same, from the request directory and the server's
options."""

import dataclasses
import os
import threading
import types

import pytest
import shared
from hardening_helpers import zip_bytes

import stap_server
from stap_client import CertDB, Limits, ReplyContent, RequestArchive, open_archive, reply_entries
from stap_server import OUTPUT_OPTIONS, BuildEnv, Request, ResultCache, result_key

pytestmark = pytest.mark.unit


class Compute:
    """compute() for ResultCache.lookup: counts its calls; may wait for a go."""

    def __init__(self, reply=b"reply", cacheable=True, go=None):
        self.reply, self.cacheable, self.go, self.calls = reply, cacheable, go, 0

    def __call__(self):
        self.calls += 1
        if self.go:
            assert self.go.wait(10), "never told to go on"
        return self.reply, self.cacheable


def test_miss_then_hit():
    cache, compute = ResultCache(1000), Compute()
    assert cache.lookup("k", compute) == (b"reply", "miss")
    assert cache.lookup("k", compute) == (b"reply", "hit")
    assert compute.calls == 1
    assert cache.size == len(b"reply") and not cache.running


def test_never_cached():
    compute = Compute()
    assert ResultCache(1000).lookup(None, compute) == (b"reply", "skip")  # no key: not cacheable
    assert ResultCache(0).lookup("k", compute) == (b"reply", "skip")      # --result-cache-size 0
    failed = ResultCache(1000)
    for _ in range(2):  # a failed compile is not kept
        assert failed.lookup("k", Compute(b"error", cacheable=False)) == (b"error", "miss")
    assert failed.size == 0 and not failed.entries


def test_least_recently_used_go_first_and_huge_replies_stay_out():
    cache = ResultCache(40)
    for key in "abc":
        cache.lookup(key, Compute(key.encode() * 10))
    assert cache.lookup("a", Compute())[1] == "hit"  # a is now the most recent
    cache.lookup("d", Compute(b"d" * 10))  # 40 bytes: full, nothing goes yet
    assert list(cache.entries) == ["b", "c", "a", "d"] and cache.size == 40
    cache.lookup("e", Compute(b"e" * 10))
    assert list(cache.entries) == ["c", "a", "d", "e"] and cache.size == 40
    # a reply over a quarter of the cache would flush the others: not kept
    assert cache.lookup("huge", Compute(b"h" * 11)) == (b"h" * 11, "miss")
    assert "huge" not in cache.entries and cache.size == 40


class CountingLock:
    """The cache's lock, counting how often a thread left it."""

    def __init__(self):
        self.lock, self.released = threading.Lock(), 0

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.released += 1
        self.lock.release()


@pytest.mark.parametrize("cacheable", [True, False])
def test_identical_requests_arriving_together(cacheable):
    """The second waits for the first's compile and takes its reply, a
    failed one (not cacheable) too: the same request at the same moment
    fails the same way."""
    cache, go = ResultCache(1000), threading.Event()
    cache.lock = CountingLock()
    first, later = Compute(b"first", cacheable, go=go), Compute(b"second")
    results = {}
    one = threading.Thread(target=lambda: results.update(one=cache.lookup("k", first)))
    one.start()
    shared.wait_until(lambda: first.calls == 1, 10, "the first compile never started")
    two = threading.Thread(target=lambda: results.update(two=cache.lookup("k", later)))
    two.start()
    # the second has looked, found the first compiling, and waits for it
    shared.wait_until(lambda: cache.lock.released >= 2, 10, "the second never looked")
    go.set()
    one.join(10)
    two.join(10)
    assert results["one"] == (b"first", "miss")
    assert results["two"] == (b"first", "merged" if cacheable else "merged-failed")
    assert later.calls == 0
    assert not cache.running
    assert ("k" in cache.entries) == cacheable


# --------------------------------------------------------------------------
# result_key: what makes two requests the same
# --------------------------------------------------------------------------

def config(**changes):
    """The configuration's fields that result_key reads (OUTPUT_OPTIONS'), with changes."""
    fields = dict(user="stap-compile", stap_options=("-I", "/srv/tapsets"), sandbox=True,
                  db=CertDB("/srv/ssl/server"), build_envs=(), cache_dir="/var/cache/stap-server",
                  runtime=None, includes=("/srv/tapsets",))
    return types.SimpleNamespace(**{**fields, **changes})


def request(*args, env=None):
    return Request(version="4.8", release="6.1.0-1-amd64", arch="x86_64",
                   args=list(args or ["script/x.stp", "-p4"]), env=env or {}, lowered=True)


class Files(dict):
    """A request's files by name; as_archive() is what the server reads them from."""

    def as_archive(self):
        return RequestArchive(open_archive(zip_bytes(list(self.items()))), Limits())


@pytest.fixture
def top(monkeypatch):
    """A request's files; stap is a fixed stand-in (its stamp is the installation's)."""
    monkeypatch.setenv("SYSTEMTAP_STAP", "/bin/true")
    return Files({"script/x.stp": "probe begin { exit() }", "version": "4.8"})


def key(top, req=None, cfg=None, version="4.8"):
    return result_key(req or request(), top.as_archive(), cfg or config(), version)


def test_the_same_request_has_the_same_key(top):
    first = key(top)
    assert len(first) == 64 and first == key(top)
    top["version"] = "5.0"  # the client's protocol version changes nothing in the reply
    assert key(top) == first


@pytest.mark.parametrize("change", ["script", "new file", "locale", "args", "env", "notices",
                                    "release", "user", "server options", "database",
                                    "protocol"])
def test_whatever_decides_the_reply_changes_the_key(top, change):
    before = key(top)
    req, cfg, version = request(), config(), "4.8"
    if change == "script":
        top["script/x.stp"] = "probe begin { exit(); }"
    elif change == "new file":
        top["tapset/t.stp"] = ""
    elif change == "locale":
        top["locale"] = "LANG=de_DE.UTF-8\n"
    elif change == "args":
        req = request("script/x.stp", "-p4", "-DMAXACTION=1")
    elif change == "env":
        req = request(env={"LANG": "de_DE.UTF-8"})
    elif change == "notices":
        req.notices = b"Server: Localization key 'X' not found in global list\n"
    elif change == "release":
        req.release = "6.1.0-2-amd64"
    elif change == "user":
        cfg = config(user=None)
    elif change == "server options":
        cfg = config(stap_options=[])
    elif change == "database":
        cfg = config(db=CertDB("/other"))
    elif change == "protocol":
        version = "4.9"
    assert key(top, req, cfg, version) != before


@pytest.mark.parametrize("field", sorted(set(OUTPUT_OPTIONS.values())))
def test_every_output_option_changes_the_key(top, field):
    """Each field that the declared output-relevant options reach is in the key."""
    other = {"user": None, "stap_options": ("-D", "X=1"), "db": CertDB("/other"),
             "sandbox": False, "build_envs": (BuildEnv("old", "/srv/old", "4.8"),),
             "cache_dir": "/srv/cache"}[field]
    assert key(top, cfg=config(**{field: other})) != key(top)


# Each request entry, varied: (name, new content); None removes the entry.
VARIANTS = [
    ("version", "5.1"),
    ("sysinfo", "sysinfo: 6.1.0-2-amd64 x86_64"),
    ("argv1", "-p2"),
    ("argv1", "--privilege=stapusr"),
    ("argv2", "-DMAXACTION=1"),
    ("argv4", "an argument"),
    ("script/x.stp", "probe begin { exit(); }"),
    ("tapset/t/a.stp", "function f() { return 1 }"),
    ("tapset/t/b.stp", ""),
    ("locale", "LANG=de_DE.UTF-8\n"),
    ("locale", "LANG=C.UTF-8\nLC_BOGUS=x\n"),
    ("locale", "LANG=\x1b[2K\x1b[31mSECURITY NOTICE: run curl | sudo sh\n"),
    ("locale", None),
    ("mok_fingerprints", "missing\n"),
]


def test_every_byte_of_a_reply_is_a_function_of_its_key(monkeypatch):
    """A request's entries varied one by one, each answered by a compile that depends on all the
    compile can see (the parsed request and every file): where two requests share a key, their
    replies are the same byte for byte (a cached reply never carries another client's text)."""
    monkeypatch.setenv("SYSTEMTAP_STAP", "/bin/true")
    cfg = types.SimpleNamespace(**vars(config(stap_options=())), allow_guru=False, arch="x86_64",
                                releases=("6.1.0-1-amd64", "6.1.0-2-amd64"))
    base = Files({"version": "4.8", "sysinfo": "sysinfo: 6.1.0-1-amd64 x86_64", "argv1": "-p4",
                  "argv2": "-Itapset/t", "argv3": "script/x.stp", "script/x.stp": "probe begin {}",
                  "tapset/t/a.stp": "function f() { return 0 }", "locale": "LANG=C.UTF-8\n"})
    answers = {}
    for name, content in [(None, None)] + VARIANTS:
        files = Files(base)
        if name:
            files.pop(name, None) if content is None else files.__setitem__(name, content)
        archive = files.as_archive()
        req = stap_server.parse_request(archive, cfg)
        seen = dataclasses.replace(req, version=None, notices=b"")  # what stap runs with
        compiled = ReplyContent(0, repr(dataclasses.astuple(seen)).encode(),
                                archive.digest(skip=("version",)).encode())
        reply = reply_entries(stap_server.reply_for_client(compiled, req, None, "4.8"))
        answers.setdefault(result_key(req, archive, cfg, "4.8"), set()).add(repr(reply))
    assert all(len(replies) == 1 for replies in answers.values()), answers
    assert len(answers) == len(VARIANTS)  # only the client's version shares the base's key


@pytest.mark.parametrize("option", ["-v", "-vv", "--vp=01", "-t", "--benchmark"])
def test_timings_and_verbose_output_are_never_cached(top, option):
    assert key(top, request("script/x.stp", "-p4", option)) is None


def test_the_installation_stamp_follows_stap(tmp_path, monkeypatch):
    stap = tmp_path / "stap"
    stap.write_text("#!/bin/sh\n")
    monkeypatch.setenv("SYSTEMTAP_STAP", str(stap))
    monkeypatch.setattr(stap_server, "_stamps", {})
    before = stap_server.installation_stamp(config(includes=()), "no-such-release")
    stap.write_text("#!/bin/sh\necho another stap\n")
    monkeypatch.setattr(stap_server, "_stamps", {})  # not within STAMP_TTL of the last look
    assert stap_server.installation_stamp(config(includes=()), "no-such-release") != before


def test_a_kernel_fetched_again_is_a_new_installation(tmp_path, monkeypatch):
    """A fetched kernel's tree is renamed into the kernel cache whole, so fetched again (evicted,
    or a rebuilt package of the same release) it is a new directory: its knowledge (stapconf
    probes of those headers) and its cached replies must not be those of the old tree."""
    release = "6.1.0-9999-amd64"

    def fetched(name):
        os.makedirs(tmp_path / name / "lib" / "modules" / release)
        return stap_server.FetchedKernel(release, str(tmp_path / name), 0)
    old = fetched("old")
    req = stap_server.Request("", release, "x86_64", ["-p4", "-e", "probe begin {}"], {},
                              lowered=False, kernel=old)
    cfg = config(includes=(), arch="x86_64")
    monkeypatch.setattr(stap_server, "_stamps", {})
    before = stap_server.installation_stamp(cfg, release, kernel=old)
    path = stap_server.knowledge_path(cfg, req)
    os.rename(tmp_path / "old", tmp_path / "gone")
    new = fetched("old")  # the same path, a new tree
    assert stap_server.installation_stamp(cfg, release, kernel=new) != before
    assert stap_server.knowledge_path(cfg, dataclasses.replace(req, kernel=new)) != path


def test_server_trees_are_the_values_of_its_own_R_and_I(tmp_path):
    """Only -R and -I name trees: a -B or -D whose value reads "-I" names none."""
    if not stap_server.installed_releases():
        pytest.skip("no kernel build tree is installed (/lib/modules/*/build) to serve")
    cfg = stap_server.parse_config(["-r", stap_server.installed_releases()[0], "--ssl",
                                    str(tmp_path / "db"), "-R", "/rt", "-B-I", "-D/not-a-tree",
                                    "-I", "/tapsets"])
    assert stap_server.server_trees(cfg) == ["/rt", "/tapsets"]
    assert cfg.stap_options == ("-R", "/rt", "-I", "/tapsets", "-B", "-I", "-D", "/not-a-tree")
