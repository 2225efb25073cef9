"""Unit tier (no root, no stap, no archive): a fetched kernel (issue 21).  The compiler its headers
need, read from their Depends line, when the server lacks it (kernel_packages then refuses the
release in one line naming that package, before any download).  Debian 12's
own archive offers no release here whose compiler is missing (its 6.1 and 6.12 headers both ask for
gcc-12), so the lines are the archive's with a compiler that no host has, gcc-99, in place of
the one they name.  And the packages of a kernel, unpacked side by side and merged into one
tree (tiny .deb files built here by dpkg-deb)."""

import os
import shutil
import subprocess

import pytest

from stap_client import Error
from stap_server import FetchedKernel, KernelCache, Package, kernel_binds, missing_compiler

pytestmark = pytest.mark.unit

BACKPORTS = ("linux-base (>= 4.12~), linux-headers-6.12.9+bpo-common (= 6.12.9-1~bpo12+1), "
             "linux-image-6.12.9+bpo-amd64 (= 6.12.9-1~bpo12+1) | linux-image-6.12.9+bpo-amd64-"
             "unsigned (= 6.12.9-1~bpo12+1), linux-kbuild-6.12.9+bpo, gcc-99")
BOOKWORM = ("linux-headers-6.1.0-50-common (= 6.1.176-1), linux-kbuild-6.1 (>= 6.1.176-1), "
            "linux-compiler-gcc-99-x86")


def headers(depends):
    return Package("linux-headers-REL", "1", "x.deb", "0" * 64, depends)


def test_a_compiler_the_headers_name_and_the_server_lacks_is_named():
    assert missing_compiler(headers(BACKPORTS)) == "gcc-99"


def test_the_kernels_compiler_meta_package_names_the_compiler_package():
    assert missing_compiler(headers(BOOKWORM)) == "gcc-99"


def test_an_installed_compiler_is_not_missing():
    if not shutil.which("gcc-12"):
        pytest.skip("gcc-12 is not installed")
    for line in (BACKPORTS.replace("gcc-99", "gcc-12"), BOOKWORM.replace("gcc-99", "gcc-12"),
                 "linux-kbuild-6.1 (>= 6.1.176-1), gcc-99 | gcc-12"):
        assert missing_compiler(headers(line)) is None, line


def test_headers_that_name_no_compiler_need_none():
    assert missing_compiler(headers("linux-headers-6.1.0-50-common (= 6.1.176-1)")) is None


def test_headers_linked_to_a_kbuild_the_host_lacks_show_the_fetched_one(tmp_path):
    """Debian's 6.12 headers link scripts and tools to ../../lib/linux-kbuild-VERSION; the host has
    no such directory to mount on, so the tree is shown entry by entry, those links by what they
    name in the fetched root (without it, make stops at a missing scripts/Makefile.btf)."""
    release, kbuild = "6.12.9+bpo-amd64", "linux-kbuild-no-such"
    root = tmp_path / "trees" / release
    common = root / "usr/src/linux-headers-6.12.9+bpo-common"
    for d in (common / "include", root / "usr/lib" / kbuild / "scripts",
              root / "usr/src" / f"linux-headers-{release}", root / "lib/modules" / release):
        d.mkdir(parents=True)
    (common / "Makefile").write_text("")
    (common / "scripts").symlink_to(f"../../lib/{kbuild}/scripts")
    (common / "tools").symlink_to(f"../../lib/{kbuild}/tools")  # names nothing: kept as it is
    argv = kernel_binds(FetchedKernel(release, str(root), 0))
    shown = "/usr/src/linux-headers-6.12.9+bpo-common"
    at = argv.index(shown) - 1
    assert argv[at:at + 14] == [
        "--dir", shown,
        "--ro-bind", f"{common}/Makefile", f"{shown}/Makefile",
        "--ro-bind", f"{common}/include", f"{shown}/include",
        "--ro-bind", f"{root}/usr/lib/{kbuild}/scripts", f"{shown}/scripts",
        "--symlink", f"../../lib/{kbuild}/tools", f"{shown}/tools"], argv
    assert ["--ro-bind", f"{root}/usr/src/linux-headers-{release}",
            f"/usr/src/linux-headers-{release}"] == argv[at - 3:at], argv
    assert not os.path.isdir(f"/usr/lib/{kbuild}")


def build_deb(top, name, files):
    """A .deb (dpkg-deb --build) of package name holding files, {path: text}."""
    tree = top / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    for path, text in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    deb = top / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--build", "-Znone", str(tree), str(deb)], check=True,
                   capture_output=True)
    return str(deb)


REL = "6.1.0-50-amd64"


def test_the_packages_unpacked_at_once_make_one_tree(tmp_path):
    """Each package into a directory of its own, merged: the directories they share hold both."""
    headers = build_deb(tmp_path, "h", {f"lib/modules/{REL}/build": "h",
                                        f"usr/src/linux-headers-{REL}/Makefile": "h"})
    common = build_deb(tmp_path, "c", {"usr/src/linux-headers-6.1.0-50-common/Makefile": "c"})
    cache = KernelCache(str(tmp_path / "kernels"), 1 << 30)
    cache.open()
    root = cache.unpack(REL, [headers, common])
    assert root == str(tmp_path / "kernels" / "trees" / REL)
    assert sorted(os.listdir(os.path.join(root, "usr", "src"))) == [
        "linux-headers-6.1.0-50-amd64", "linux-headers-6.1.0-50-common"]
    assert os.listdir(tmp_path / "kernels" / "trees") == [REL]


def test_two_packages_with_the_same_file_are_refused_and_nothing_is_kept(tmp_path):
    headers = build_deb(tmp_path, "h", {f"lib/modules/{REL}/build": "h", "usr/src/x/f": "h"})
    other = build_deb(tmp_path, "o", {"usr/src/x/f": "o"})
    cache = KernelCache(str(tmp_path / "kernels"), 1 << 30)
    cache.open()
    with pytest.raises(Error, match=r"^o\.deb has /usr/src/x/f, which another package of the "
                                    r"kernel has too$"):
        cache.unpack(REL, [headers, other])
    assert os.listdir(tmp_path / "kernels" / "trees") == []
    assert os.path.isfile(headers) and os.path.isfile(other)
