"""Kernels fetched on demand (issue 21, spec 5 and 9): a server started with --fetch-kernels, by
an unprivileged account, builds for a release it has not installed, with the headers apt-get
download fetched from the host's archive and dpkg-deb unpacked into its kernel cache.  The .deb
files are kept across runs in DEBS (as the debootstrap tarball of test_packaging is), so a warm
run downloads nothing; the kernel cache itself is new in every test."""

import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile

import pytest
from hardening_helpers import small_tmpfs
from netns import network_factory  # noqa: F401  (a fixture)
from shared import (
    CLIENT,
    PYTHON,
    SERVER,
    SHARED,
    TEST_USER,
    read_text,
    status_file,
    stop_pid,
    wait_until,
    without_progress,
)

import stap_client
import stap_server

pytestmark = pytest.mark.integration

DEBS = "/var/cache/stap-compile-server-tests/debs"
# Releases the archive offers that are (normally) not installed: a generic and a cloud flavour.
CANDIDATES = ("6.1.0-50-amd64", "6.1.0-50-cloud-amd64", "6.1.0-53-amd64", "6.1.0-53-cloud-amd64")


def client(box, srv, *args, **kw):
    return box.run("stap-client", f"--server={srv.address}", *args, **kw)


@pytest.fixture(scope="module")
def releases():
    """Two fetchable releases that are not installed."""
    found = [r for r in CANDIDATES if not os.path.isdir(f"/lib/modules/{r}")
             and stap_server.apt_package(f"linux-headers-{r}")]
    if len(found) < 2:
        pytest.skip(f"the archive offers fewer than two of {', '.join(CANDIDATES)} "
                    "(run apt-get update)")
    return found[:2]


@pytest.fixture(scope="module")
def user_compile_cache():
    """stap's cache for the test account's servers, kept between tests and runs: a first pass 4
    for a kernel probes its configuration for a minute."""
    path = os.path.join(SHARED, "fetch-compile-cache")
    os.makedirs(path, 0o755, exist_ok=True)
    pw = pwd.getpwnam(TEST_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def kernel_cache(user_sandbox):
    """A new kernel cache of the test account, its download cache seeded from DEBS; new
    downloads go back to DEBS afterwards."""
    path = user_sandbox.path("kernels")
    yield seed_kernel_cache(path)
    keep_downloads(path)


def seed_kernel_cache(path, only=None):
    """path, a kernel cache of the test account whose download cache holds the files of DEBS (only:
    those of these names)."""
    debs = os.path.join(path, "debs")
    os.makedirs(DEBS, 0o755, exist_ok=True)
    skip = shutil.ignore_patterns("*-dbg_*")  # 282 MB: see dbg_deb
    shutil.copytree(DEBS, debs, dirs_exist_ok=True, ignore=skip if only is None else (
        lambda top, names: [n for n in names if n not in only]))
    pw = pwd.getpwnam(TEST_USER)
    for d in (path, debs, *(os.path.join(debs, n) for n in os.listdir(debs))):
        os.chown(d, pw.pw_uid, pw.pw_gid)
    return path


def keep_downloads(path):
    """Copy the new downloads of the kernel cache at path to DEBS."""
    debs = os.path.join(path, "debs")
    for name in os.listdir(debs):
        if name.endswith(".deb") and not os.path.exists(os.path.join(DEBS, name)):
            shutil.copyfile(os.path.join(debs, name), os.path.join(DEBS, name))


class Root:
    """A fetched kernel's root, as kernel_trees takes it."""

    def __init__(self, headers_tree):
        self.root = os.path.dirname(os.path.dirname(os.path.dirname(headers_tree)))


def fetching_server(servers, box, krel, cache, compile_cache, *extra, env=None):
    return servers.start(box, krel, None, "--fetch-kernels", "--kernel-cache", cache,
                         "--cache-dir", compile_cache, *extra, env=env)


def fetch_lines(srv, release):
    return [l for l in read_text(srv.log).splitlines() if f"kernel cache: fetched {release} " in l]


def module_layout_crc(text):
    m = re.search(r"^(0x[0-9a-f]+)\s+module_layout\b", text, re.M)
    return m and int(m.group(1), 16)


def test_pass_4_for_a_release_not_installed(releases, servers, user_sandbox, krel,
                                            kernel_cache, user_compile_cache):
    release = releases[0]
    srv = fetching_server(servers, user_sandbox, krel, kernel_cache, user_compile_cache)
    work = user_sandbox.path("work")
    os.makedirs(work)
    os.chown(work, *pwd.getpwnam(TEST_USER)[2:4])
    proc = client(user_sandbox, srv, "-r", release, "-p4", "-m", "fetched", "-e",
                  'probe begin { println("fetched"); exit() }', cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()
    ko = os.path.join(work, "fetched.ko")
    vermagic = subprocess.run(["modinfo", "-F", "vermagic", ko], capture_output=True,
                              text=True).stdout
    assert vermagic.split()[0] == release, vermagic
    versions = subprocess.run(["modprobe", "--dump-modversions", ko], capture_output=True,
                              text=True).stdout
    tree = os.path.join(kernel_cache, "trees", release, "usr", "src", f"linux-headers-{release}")
    with open(os.path.join(tree, "Module.symvers")) as f:
        symvers = f.read()
    assert module_layout_crc(versions) is not None, versions
    assert module_layout_crc(versions) == module_layout_crc(symvers)
    assert len(fetch_lines(srv, release)) == 1
    if stap_server.needed_fixes(stap_server.header_trees(release, Root(tree)),
                                stap_server.STOCK_RUNTIME):
        assert f"runtime fix task_work_cancel_func for {release}:" in read_text(srv.log)
    # another script for the cached release: no fetch
    proc = client(user_sandbox, srv, "-r", release, "-p4", "-m", "again", "-e",
                  'probe begin { println("again"); exit() }', cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(fetch_lines(srv, release)) == 1
    assert sorted(os.listdir(os.path.join(kernel_cache, "trees"))) == [release]


def test_the_real_client_finds_a_fetching_server_by_discovery(releases, network_factory,  # noqa: F811
                                                              user_sandbox, kernel_cache,
                                                              user_compile_cache, tmp_path):
    """In a network namespace with its own avahi: a fetching server of the test account, started
    without -r, advertises the bare architecture; the real 4.8 `stap --use-server` (no address)
    takes it as serving any release and gets a module for one the server has not installed, as
    `--use-server=HOST:PORT` does; stap-find-servers says the server fetches kernels, and
    stap-find-or-start-server finds it for any release."""
    stap = shutil.which("stap")
    if not stap:
        pytest.skip("stap is not installed")
    host = network_factory(avahi=True, single=True).hosts[0]
    release = releases[0]
    as_user = ["setpriv", f"--reuid={TEST_USER}", f"--regid={TEST_USER}", "--clear-groups"]
    proc = host.run([*as_user, PYTHON, SERVER, "stap-start-server", "--listen", "::",
                     "--fetch-kernels", "--kernel-cache", kernel_cache, "--cache-dir",
                     user_compile_cache, "--log", user_sandbox.path("server.log"), "--advertise",
                     "avahi"],
                    env=user_sandbox.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout)
    try:
        with open(status_file(user_sandbox, pid)) as f:
            port = json.load(f)["port"]
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
               "SYSTEMTAP_DIR": str(tmp_path / ".systemtap")}

        def real(*args, timeout=60):
            return host.run(["sh", "-c", 'cd "$0" && exec "$@"', str(tmp_path), stap, *args],
                            env=env, timeout=timeout)

        trust = real("--trust-servers=ssl,no-prompt", f"--use-server=127.0.0.1:{port}")
        assert trust.returncode == 0, trust.stderr

        def listed():  # avahi takes its time on a loaded machine
            proc = real("--list-servers=online,trusted")
            return f"port={port}" in proc.stdout + proc.stderr

        wait_until(listed, 60, "the real client never saw the fetching server advertised",
                   interval=1)
        ko = tmp_path / "found_fetching.ko"
        for server in ("--use-server", f"--use-server=127.0.0.1:{port}"):  # the second: a hit
            proc = real(server, "-r", release, "-p4", "-m", "found_fetching", "-e",
                        "probe begin { exit() }", timeout=900)
            assert proc.returncode == 0, proc.stderr
            vermagic = subprocess.run(["modinfo", "-F", "vermagic", str(ko)],
                                      capture_output=True, text=True).stdout
            assert vermagic.split()[0] == release, vermagic
            ko.unlink()
        found = host.run([*as_user, PYTHON, CLIENT, "stap-find-servers"], env=user_sandbox.env,
                         timeout=60)
        mine = [l for l in found.stdout.splitlines() if f" {port} " in l]
        assert [l for l in mine if "'sysinfo=x86_64'" in l and "'kernels=fetched'" in l], found
        # and stap-find-or-start-server takes it as serving a release nobody has installed
        proc = host.run([*as_user, PYTHON, SERVER, "stap-find-or-start-server", "-r",
                         "6.1.0-9999-amd64", "--fetch-kernels"], env=user_sandbox.env, timeout=60)
        if proc.stdout.strip() not in ("0", "-1"):
            stop_pid(int(proc.stdout))
        assert proc.stdout.strip() == "0" and proc.returncode == 0, proc.stderr
    finally:
        stop_pid(pid)


def test_two_clients_at_once_cause_one_fetch(releases, servers, user_sandbox, krel,
                                            kernel_cache, user_compile_cache):
    release = releases[1]
    srv = fetching_server(servers, user_sandbox, krel, kernel_cache, user_compile_cache)
    argv = [stap_client.__file__, "stap-client", f"--server={srv.address}", "-r", release,
            "-p2", "-e", "probe begin { exit() }"]
    procs = [subprocess.Popen([PYTHON, *argv], env=user_sandbox.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              **as_test_user()) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()
        assert b"begin" in out
    assert len(fetch_lines(srv, release)) == 1


def as_test_user():
    pw = pwd.getpwnam(TEST_USER)
    return dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])


def dbg_deb(release):
    """The release's -dbg package in DEBS, downloaded (as root, checked) the first time."""
    package = stap_server.apt_package(f"linux-image-{release}-dbg")
    if package is None:
        pytest.skip(f"the archive has no linux-image-{release}-dbg")
    path = os.path.join(DEBS, package.filename)
    if not os.path.exists(path):
        work = tempfile.mkdtemp(dir=DEBS)
        try:
            subprocess.run(["apt-get", "download", "-q", f"{package.name}={package.version}"],
                           cwd=work, check=True, capture_output=True, timeout=900)
            os.rename(os.path.join(work, package.filename), path)
        finally:
            shutil.rmtree(work)
    assert stap_server.file_sha256(path) == package.sha256
    return path


def seed_download(kernel_cache, deb):
    """What the server would download, linked into its download cache (it deletes a -dbg .deb
    once the files are out)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(kernel_cache, "debs", os.path.basename(deb)))
    os.link(deb, os.path.join(kernel_cache, "debs", os.path.basename(deb)))


def dbg_lines(srv, release, what):
    return [l for l in read_text(srv.log).splitlines()
            if re.search(f"kernel cache: fetched {what} of {re.escape(release)} "
                         rf"\(linux-image-{re.escape(release)}-dbg ", l)]


def test_the_dbg_package_when_a_script_needs_it(releases, servers, user_sandbox, krel,
                                                kernel_cache, user_compile_cache):
    """A kprobe needs the symbol table only (System.map, not the 600 MB vmlinux); a DWARF probe
    the debuginfo, fetched once for the release.  (A kernel.trace probe needs neither; its first
    query takes minutes on a loaded machine, so it is not tried here.)"""
    release = next((r for r in releases if "-cloud-" in r), None)
    if release is None:
        pytest.skip(f"no cloud-flavour release among {', '.join(releases)}")
    deb = dbg_deb(release)
    seed_download(kernel_cache, deb)
    srv = fetching_server(servers, user_sandbox, krel, kernel_cache, user_compile_cache)
    proc = client(user_sandbox, srv, "-r", release, "-p2", "-e",
                  'probe kprobe.function("vfs_read") { println(1) }', timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(dbg_lines(srv, release, "the symbol table")) == 1
    assert os.path.isfile(os.path.join(kernel_cache, "symbols", release, f"System.map-{release}"))
    assert os.listdir(os.path.join(kernel_cache, "debuginfo")) == []
    assert os.listdir(os.path.join(kernel_cache, "debs")).count(os.path.basename(deb)) == 0

    work = user_sandbox.path("work")
    os.makedirs(work)
    os.chown(work, *pwd.getpwnam(TEST_USER)[2:4])
    seed_download(kernel_cache, deb)
    proc = client(user_sandbox, srv, "-r", release, "-p4", "-m", "count", "-e",
                  'probe kernel.function("vfs_read") { println($count) }', cwd=work,
                  timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()
    assert os.path.isfile(os.path.join(work, "count.ko"))
    assert len(dbg_lines(srv, release, "the debuginfo")) == 1
    proc = client(user_sandbox, srv, "-r", release, "-p2", "-e",
                  'probe kernel.function("vfs_write") { println($count) }', timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(dbg_lines(srv, release, ".+")) == 2, read_text(srv.log)


def test_a_dbg_package_that_cannot_be_downloaded_is_one_line_after_stap(
        releases, servers, user_sandbox, krel, kernel_cache, user_compile_cache):
    """The headers come from the download cache, the -dbg package through a proxy on a closed
    port: the reply is stap's own failure and one line why, and nothing is kept."""
    release = releases[0]
    srv = fetching_server(servers, user_sandbox, krel, kernel_cache, user_compile_cache,
                          env={"http_proxy": "http://127.0.0.1:9", "https_proxy":
                               "http://127.0.0.1:9"})
    proc = client(user_sandbox, srv, "-r", release, "-p2", "-e",
                  'probe kprobe.function("vfs_read") { println(1) }', timeout=600)
    err = without_progress(proc.stderr.decode())
    assert proc.returncode == 1
    assert "semantic error: no match" in err
    assert re.search(rf"^stap-serverd: ERROR: cannot fetch the symbol table of {release}: "
                     rf"cannot download linux-image-{release}-dbg \S+ from the archive: E: .*"
                     r"127\.0\.0\.1", err.strip().splitlines()[-1]), err
    assert os.listdir(os.path.join(kernel_cache, "symbols")) == []
    assert not [n for n in os.listdir(os.path.join(kernel_cache, "debs")) if "-dbg_" in n]


def test_each_kernel_over_two_fetched_releases_and_one_the_archive_lacks(
        releases, servers, user_sandbox, kernel_cache, user_compile_cache):
    """A fetching server needs no installed kernel: started without -r (on a host whose running
    kernel may have no headers), it says it serves releases on demand.  --each-kernel -p4 through
    it: one line per release in the order given, the missing one says the archive has no such
    kernel, the exit status is 1, and the two good modules are kept, each for its own release."""
    missing = "6.1.0-9999-amd64"
    srv = fetching_server(servers, user_sandbox, None, kernel_cache, user_compile_cache)
    running = os.uname().release
    assert srv.status["releases"] == (
        [running] if os.path.isdir(f"/lib/modules/{running}/build") else [])
    assert "serving kernels fetched on demand" in read_text(srv.log)
    work = user_sandbox.path("work")
    os.makedirs(work)
    os.chown(work, *pwd.getpwnam(TEST_USER)[2:4])
    proc = client(user_sandbox, srv, "-p4", "-m", "each", f"--each-kernel={releases[0]},"
                  f"{missing},{releases[1]}", "-e", "probe begin { exit() }", cwd=work,
                  timeout=900)
    lines = proc.stdout.decode().splitlines()
    assert proc.returncode == 1, proc.stderr.decode()
    assert lines == [f"{releases[0]} ok", f"{missing} error: the archive has no kernel {missing} "
                     f"(no package linux-headers-{missing})", f"{releases[1]} ok"], lines
    for release in releases:
        vermagic = subprocess.run(["modinfo", "-F", "vermagic",
                                   os.path.join(work, f"each-{release}.ko")],
                                  capture_output=True, text=True).stdout
        assert vermagic.split()[0] == release, vermagic
    assert sorted(os.listdir(work)) == sorted(f"each-{r}.ko" for r in releases)


def test_an_unknown_release_is_one_line(servers, user_sandbox, krel, kernel_cache,
                                        user_compile_cache):
    srv = fetching_server(servers, user_sandbox, krel, kernel_cache, user_compile_cache)
    for _ in range(2):  # the second answer comes from memory
        proc = client(user_sandbox, srv, "-r", "6.1.0-9999-amd64", "-p2", "-e",
                      "probe begin { exit() }", timeout=60)
        assert proc.returncode == 1
        assert proc.stderr.decode().strip().splitlines()[-1].endswith(
            "the archive has no kernel 6.1.0-9999-amd64 (no package "
            "linux-headers-6.1.0-9999-amd64)"), proc.stderr.decode()
    assert os.listdir(os.path.join(kernel_cache, "trees")) == []


def test_a_truncated_download_is_fetched_again(releases, servers, user_sandbox, krel,
                                               kernel_cache, user_compile_cache):
    release = releases[0]
    package = stap_server.apt_package(f"linux-headers-{release}")
    deb = os.path.join(kernel_cache, "debs", package.filename)
    if os.path.exists(deb):
        with open(deb, "r+b") as f:
            f.truncate(os.path.getsize(deb) // 2)
    else:  # not downloaded yet: what a crash mid-write would leave
        with open(deb, "wb") as f:
            f.write(b"!<arch>\ndebian-binary   ")
        os.chown(deb, *pwd.getpwnam(TEST_USER)[2:4])
    srv = fetching_server(servers, user_sandbox, krel, kernel_cache, user_compile_cache)
    proc = client(user_sandbox, srv, "-r", release, "-p2", "-e", "probe begin { exit() }",
                  timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    assert stap_server.file_sha256(deb) == package.sha256
    assert [n for n in os.listdir(os.path.join(kernel_cache, "trees"))] == [release]


def test_an_unreachable_archive_is_one_line(releases, servers, user_sandbox, krel,
                                           user_compile_cache):
    """apt goes through a proxy on a closed loopback port: nothing is downloaded or kept."""
    cache = user_sandbox.path("empty-kernels")  # no download cache to fall back on
    srv = fetching_server(servers, user_sandbox, krel, cache, user_compile_cache,
                          env={"http_proxy": "http://127.0.0.1:9", "https_proxy":
                               "http://127.0.0.1:9"})
    proc = client(user_sandbox, srv, "-r", releases[0], "-p2", "-e", "probe begin { exit() }",
                  timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert re.search(r"^stap-serverd: ERROR: cannot download linux-headers-\S+ \S+ from the "
                     r"archive: E: .*127\.0\.0\.1", err, re.M), err
    assert len(without_progress(err).strip().splitlines()) == 1, err
    assert os.listdir(os.path.join(cache, "trees")) == []
    assert os.listdir(os.path.join(cache, "debs")) == []


def test_a_full_kernel_cache_disk_is_one_line_and_not_remembered(releases, servers,
                                                                  user_sandbox, krel,
                                                                  user_compile_cache):
    """The kernel cache's disk has room for the downloads but not for the unpacked tree: one line
    naming the cause, no half tree, the checked downloads kept; once space is freed the next
    request builds (a full disk is not a failed fetch to remember)."""
    release = releases[0]
    with small_tmpfs(user_sandbox.path("full-kernels"), size="128m") as cache:
        seed_kernel_cache(cache, [p.filename for p in stap_server.kernel_packages(release)])
        filler = os.path.join(cache, "filler")
        with open(filler, "wb") as f:  # leaves room for the downloads, if not seeded, and a bit
            free = os.statvfs(cache)
            f.write(b"\0" * max(0, free.f_bavail * free.f_frsize - (24 << 20)))
        srv = fetching_server(servers, user_sandbox, krel, cache, user_compile_cache)
        proc = client(user_sandbox, srv, "-r", release, "-p2", "-e", "probe begin { exit() }",
                      timeout=600)
        err = without_progress(proc.stderr.decode())
        assert proc.returncode == 1, err
        assert len(err.strip().splitlines()) == 1, err
        assert re.fullmatch(rf"stap-serverd: ERROR: cannot unpack the kernel {release}: the "
                            rf"kernel cache {cache} is full \(No space left on device\)\n",
                            err), err
        assert os.listdir(os.path.join(cache, "trees")) == []
        debs = os.listdir(os.path.join(cache, "debs"))
        assert all(stap_server.file_sha256(os.path.join(cache, "debs", p.filename)) == p.sha256
                   for p in stap_server.kernel_packages(release)), debs
        keep_downloads(cache)
        os.unlink(filler)
        proc = client(user_sandbox, srv, "-r", release, "-p2", "-e", "probe begin { exit() }",
                      timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()
        assert os.listdir(os.path.join(cache, "trees")) == [release]
        srv.stop()  # before the tmpfs goes


def test_a_download_into_a_full_kernel_cache_is_one_line(releases, servers, user_sandbox, krel,
                                                         user_compile_cache):
    """A kernel cache with room for the small headers package but not for its -common twin (a real
    download, 10 MB, that apt cannot write): one line naming the package and the full cache, the
    checked headers package kept, no partial file and no temporary directory left."""
    release = releases[0]
    with small_tmpfs(user_sandbox.path("tiny-kernels"), size="6m") as cache:
        os.chown(cache, *pwd.getpwnam(TEST_USER)[2:4])
        srv = fetching_server(servers, user_sandbox, krel, cache, user_compile_cache)
        proc = client(user_sandbox, srv, "-r", release, "-p2", "-e", "probe begin { exit() }",
                      timeout=600)
        err = without_progress(proc.stderr.decode())
        assert proc.returncode == 1, err
        headers, common = stap_server.kernel_packages(release)[:2]
        assert err == (f"stap-serverd: ERROR: cannot download {common.name} {common.version}: "
                       f"the kernel cache {cache} is full (No space left on device)\n"), err
        assert os.listdir(os.path.join(cache, "debs")) == [headers.filename]
        assert os.listdir(os.path.join(cache, "trees")) == []
        srv.stop()  # before the tmpfs goes


def test_the_cache_bound_evicts_kernels_no_compile_uses(releases, servers, user_sandbox, krel,
                                                       kernel_cache, user_compile_cache):
    srv = fetching_server(servers, user_sandbox, krel, kernel_cache, user_compile_cache,
                          "--kernel-cache-size", "1")
    for release in releases:
        proc = client(user_sandbox, srv, "-r", release, "-p2", "-e", "probe begin { exit() }",
                      timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()  # kept while it was used
        assert os.listdir(os.path.join(kernel_cache, "trees")) == []  # and removed after
    assert "kernel cache: removed" in read_text(srv.log)


def test_an_rt_release_takes_its_own_common_package():
    """linux-headers-REL-rt-amd64 depends on linux-headers-ABI-common-rt, not on the -common that
    the other flavours share (whose name begins the same)."""
    release = "6.1.0-50-rt-amd64"
    if stap_server.apt_package(f"linux-headers-{release}") is None:
        pytest.skip(f"the archive has no linux-headers-{release} (run apt-get update)")
    names = [p.name for p in stap_server.kernel_packages(release)]
    assert names[:2] == [f"linux-headers-{release}", "linux-headers-6.1.0-50-common-rt"], names


def test_a_root_server_does_not_fetch(sandbox, krel):
    proc = sandbox.run("stap-serverd", "-r", krel, "--fetch-kernels", "--advertise", "none",
                       timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == (
        "stap-serverd: ERROR: --fetch-kernels: apt and dpkg-deb never run as root for a client; "
        "start the server as an unprivileged account (the packaged unit's stap-server)")
