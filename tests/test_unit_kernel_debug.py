"""The -dbg package of a fetched kernel (issue 21), without the network: which of stap's failures
ask for it, how its files are read out of a .deb, and how the cache takes them in after a
restart.  The .deb files here are made as dpkg-deb makes them (an ar archive, data.tar.xz)."""

import io
import os
import tarfile

import pytest

import stap_server
from stap_client import Error

pytestmark = pytest.mark.unit

REL = "6.1.0-50-cloud-amd64"
MAP = f"usr/lib/debug/boot/System.map-{REL}"
VMLINUX = f"usr/lib/debug/boot/vmlinux-{REL}"

# stap 4.8's stderr, as it was for a fetched kernel without the -dbg files
NO_SYMBOLS = b"""WARNING: Kernel function symbol table missing [man warning::symbols]
semantic error: while resolving probe point: identifier 'kprobe' at <input>:1:7
        source: probe kprobe.function("vfs_read") { println(1) }
                      ^

semantic error: no match

Pass 2: analysis failed.  [man error::pass2]
"""
NO_DEBUGINFO = b"""WARNING: Kernel function symbol table missing [man warning::symbols]
semantic error: while resolving probe point: identifier 'kernel' at <input>:1:7
        source: probe kernel.function("vfs_read") { println($count) }
                      ^

semantic error: missing x86_64 kernel/module debuginfo [man warning::debuginfo] under \
'/lib/modules/6.1.0-50-cloud-amd64/build'

Pass 2: analysis failed.  [man error::pass2]
"""
PARSE_ERROR = b"""WARNING: Kernel function symbol table missing [man warning::symbols]
parse error: expected literal string or number
Pass 1: parse failed.  [man error::pass1]
"""


def ar_member(name, data):
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + b"\n" * (len(data) % 2)


def make_deb(path, files, compression="xz"):
    """A .deb whose data.tar.COMPRESSION holds files ({path: bytes}), ./-prefixed as dpkg-deb
    writes them, after a directory entry and a symbolic link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        tar.addfile(dir_entry("./usr/lib/debug/boot"))
        link = tarfile.TarInfo(f"./{MAP}.link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
                + ar_member("control.tar.xz", b"x" * 3) + ar_member(f"data.tar.{compression}",
                                                                  buf.getvalue()))


def dir_entry(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize("stderr,kernel_has,need", [
    (NO_SYMBOLS, {}, stap_server.SYMBOLS),
    (NO_DEBUGINFO, {}, stap_server.DEBUGINFO),
    (NO_DEBUGINFO, {stap_server.SYMBOLS: "f"}, stap_server.DEBUGINFO),
    (NO_DEBUGINFO, {stap_server.DEBUGINFO: "f"}, None),  # fetched already: no second retry
    (NO_SYMBOLS, {stap_server.SYMBOLS: "f"}, None),
    (PARSE_ERROR, {}, None),  # the warning alone comes with every compile without System.map
])
def test_which_failures_ask_for_the_dbg_package(stderr, kernel_has, need):
    kernel = stap_server.FetchedKernel(REL, "/nowhere", 0, debug=dict(kernel_has))
    assert stap_server.debug_need(stderr, kernel) == need


def test_only_the_files_asked_for_are_written(tmp_path):
    deb = tmp_path / "k.deb"
    make_deb(deb, {MAP: b"ffffffff81000000 T _stext\n", VMLINUX: b"\x7fELF" + b"\0" * 5000,
                   "usr/lib/debug/other": b"other"})
    out = tmp_path / "out"
    out.mkdir()
    stap_server.deb_extract(str(deb), {MAP: str(out / "map")})
    assert (out / "map").read_bytes() == b"ffffffff81000000 T _stext\n"
    assert os.listdir(out) == ["map"]
    with pytest.raises(Error, match=r"^k\.deb has no \S+System\.map-\S+\.link$"):
        stap_server.deb_extract(str(deb), {f"{MAP}.link": str(out / "link")})
    assert os.listdir(out) == ["map"]  # a link is not a regular file: never written
    with pytest.raises(Error, match=r"^k\.deb has no usr/lib/debug/boot/vmlinux-\S+$"):
        stap_server.deb_extract(str(deb), {"usr/lib/debug/boot/vmlinux-6.1.0-9-amd64":
                                           str(out / "vm")})


def test_a_gzip_data_member_is_read_too(tmp_path):
    deb = tmp_path / "k.deb"
    make_deb(deb, {VMLINUX: b"vmlinux"}, compression="gz")
    stap_server.deb_extract(str(deb), {VMLINUX: str(tmp_path / "vm")})
    assert (tmp_path / "vm").read_bytes() == b"vmlinux"


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[:len(data) // 2], r"^cannot read k\.deb: "),
    (lambda data: b"<html>proxy error</html>\n", r"^k\.deb is not a Debian package$"),
    (lambda data: data[:8 + 60 + 4], r"^k\.deb has no data\.tar\* member$"),
])
def test_a_damaged_package_is_one_line(tmp_path, damage, message):
    deb = tmp_path / "k.deb"
    make_deb(deb, {MAP: os.urandom(200000)})
    deb.write_bytes(damage(deb.read_bytes()))
    with pytest.raises(Error, match=message) as e:
        stap_server.deb_extract(str(deb), {MAP: str(tmp_path / "map")})
    assert "\n" not in str(e.value)


def test_the_cache_takes_in_the_files_of_its_trees_and_removes_the_rest(tmp_path):
    top = tmp_path / "kernels"
    (top / "trees" / REL).mkdir(parents=True)
    (top / "symbols" / REL).mkdir(parents=True)
    (top / "symbols" / REL / f"System.map-{REL}").write_bytes(b"m" * 10000)
    (top / "symbols" / ".new.abc").mkdir()  # a crash while extracting
    (top / "debuginfo" / "6.1.0-47-amd64").mkdir(parents=True)  # its tree was removed
    cache = stap_server.KernelCache(str(top), 1 << 30)
    cache.open()
    kernel = cache.kernels[REL]
    assert kernel.debug == {stap_server.SYMBOLS: str(top / "symbols" / REL / f"System.map-{REL}")}
    assert kernel.size >= 10000
    assert os.listdir(top / "symbols") == [REL]
    assert os.listdir(top / "debuginfo") == []


def test_eviction_removes_a_release_with_its_files(tmp_path):
    top = tmp_path / "kernels"
    for part, name in (("trees", ""), ("symbols", f"System.map-{REL}"),
                       ("debuginfo", f"vmlinux-{REL}")):
        (top / part / REL).mkdir(parents=True)
        if name:
            (top / part / REL / name).write_bytes(b"x" * 10000)
    cache = stap_server.KernelCache(str(top), 1)
    cache.open()
    with cache.cond:
        cache.evict()
    assert [os.listdir(top / part) for part in ("trees", "symbols", "debuginfo")] == [[]] * 3


def test_the_sandbox_shows_the_files_where_stap_looks(tmp_path):
    kernel = stap_server.FetchedKernel(REL, "/nowhere", 0, debug={
        stap_server.SYMBOLS: "/c/symbols/map", stap_server.DEBUGINFO: "/c/debuginfo/vm"})
    debug = tmp_path / "debug"
    (debug / ".build-id").mkdir(parents=True)
    (debug / "boot").mkdir()
    argv = stap_server.debug_binds(kernel, str(debug))
    assert argv == ["--ro-bind", "/c/symbols/map", f"/boot/System.map-{REL}",
                    "--size", "65536", "--tmpfs", str(debug),
                    "--ro-bind", str(debug / ".build-id"), f"{debug}/.build-id",
                    "--ro-bind", "/c/debuginfo/vm", f"{debug}/boot/vmlinux-{REL}",
                    "--remount-ro", str(debug)]
    argv = stap_server.debug_binds(kernel, str(tmp_path / "none"))
    assert argv[3:] == ["--ro-bind", "/c/debuginfo/vm", f"/boot/vmlinux-{REL}"]
