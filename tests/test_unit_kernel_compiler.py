"""Unit tier (no root, no stap, no archive): the compiler a fetched kernel's headers need, read
from their Depends line, when the server lacks it (issue 21; kernel_packages then refuses the
release in one line naming that package, before any download).  Debian 12's
own archive offers no release here whose compiler is missing (its 6.1 and 6.12 headers both ask for
gcc-12), so the lines are the archive's with a compiler that no host has, gcc-99, in place of
the one they name."""

import shutil

import conftest  # noqa: F401  (puts the modules on sys.path)
import pytest

from stap_server import Package, missing_compiler

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
