"""Build environments (stap-serverd --build-env): which environment a request gets, the checks of
the option, and what the sandbox shows of an environment's root."""

import os

import pytest

from stap_client import Error, ServerRecord, same_runtime_first
from stap_server import (
    BuildEnv,
    Offer,
    Request,
    build_env_option,
    choose_build_env,
    kernel_trees,
    served_versions,
    system_view,
)

pytestmark = pytest.mark.unit

HOST = BuildEnv("host", "/", "4.8")
TRIXIE = BuildEnv("trixie", "/srv/trixie", "5.1")
FORKY = BuildEnv("forky", "/srv/forky", "5.3")


def request(version, *args, lowered=False):
    return Request(version=version, release="r", arch="x86_64", args=list(args), env={},
                   lowered=lowered)


@pytest.mark.parametrize("version, want", [
    ("4.8", HOST), ("4.6", HOST), ("5.1", TRIXIE), ("5.0", TRIXIE), ("5.2", TRIXIE),
    ("5.3", FORKY), ("5.4", FORKY), ("6.0", FORKY)])
def test_a_module_comes_from_the_closest_stap_on_the_clients_side(version, want):
    assert choose_build_env([HOST, TRIXIE, FORKY], request(version, "-p4")) == want


def test_equals_go_to_the_first_listed_the_host():
    twin = BuildEnv("twin", "/srv/twin", "4.8")
    assert choose_build_env([HOST, twin], request("4.8", "-p4")) == HOST


def test_no_environment_on_the_clients_side_refuses_a_module_in_one_line():
    for req in (request("5.1", "-p4"), request("5.1", "-p4", lowered=True)):
        with pytest.raises(Error) as e:
            choose_build_env([HOST], req)
        assert str(e.value) == ("this server builds modules with stap 4.8; a systemtap 5.1 "
                                "client needs one built by stap 5.0 or later (its staprun cannot "
                                "run the others); passes 1-3 work")
    with pytest.raises(Error, match=r"stap 5\.1, 5\.3; a systemtap 4\.8 client needs one built "
                       r"by stap older than 5\.0"):
        choose_build_env([TRIXIE, FORKY], request("4.8", "-p4"))


def test_passes_1_to_3_go_to_the_closest_of_all():
    assert choose_build_env([HOST], request("5.1", "-p2")) == HOST
    assert choose_build_env([TRIXIE, FORKY], request("4.8", "-p3")) == TRIXIE


def test_a_version_that_is_not_numeric_counts_as_before_5():
    assert choose_build_env([HOST, TRIXIE], request("x.y", "-p4")) == HOST


@pytest.mark.parametrize("value, message", [
    ("trixie", "expected NAME=DIR"), ("=/srv", "expected NAME=DIR"),
    ("host=/srv", "expected NAME=DIR"), ("a b=/srv", "expected NAME=DIR"),
    ("t=/no/such/dir", "No such file or directory")])
def test_bad_build_env_options(value, message):
    with pytest.raises(Error, match=message):
        build_env_option(value)


def test_a_build_env_writable_by_others_or_a_link_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    assert build_env_option(f"t={root}") == BuildEnv("t", str(root))
    root.chmod(0o777)
    with pytest.raises(Error, match="must be a directory .* that group and others cannot write"):
        build_env_option(f"t={root}")
    root.chmod(0o755)
    (tmp_path / "link").symlink_to(root)
    with pytest.raises(Error, match="must be a directory"):
        build_env_option(f"t={tmp_path / 'link'}")


def test_the_system_view_of_a_root_binds_its_directories_and_the_hosts_kernel_trees(tmp_path):
    root = tmp_path / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "lib").symlink_to("usr/lib")
    argv, binds = system_view(str(root), [])
    assert argv == ["--ro-bind", f"{root}/usr", "/usr", "--ro-bind", f"{root}/etc", "/etc",
                    "--symlink", "usr/lib", "/lib"]
    assert binds == [(f"{root}/usr", "/usr"), (f"{root}/etc", "/etc")]
    assert system_view("/", [])[0][:3] == ["--ro-bind", "/usr", "/usr"]  # the host: as it is


def test_kernel_trees_follow_the_links_of_the_release_directory():
    """On this machine: /lib/modules/REL, its build and source trees, and what their top-level
    links name (Debian: linux-kbuild's scripts); each a real path, each once."""
    releases = [r for r in os.listdir("/lib/modules")
                if os.path.isdir(f"/lib/modules/{r}/build")] if os.path.isdir("/lib/modules") \
        else []
    if not releases:
        pytest.skip("no kernel headers installed")
    trees = kernel_trees(releases[0])
    assert trees[0] == os.path.realpath(f"/lib/modules/{releases[0]}")
    assert os.path.realpath(f"/lib/modules/{releases[0]}/build") in trees
    assert all(t == os.path.realpath(t) for t in trees) and len(set(trees)) == len(trees)
    for link in ("scripts", "include"):
        target = os.path.realpath(f"/lib/modules/{releases[0]}/build/{link}")
        assert any(target == t or target.startswith(t + "/") for t in trees)


def test_the_offer_advertises_every_version_only_with_environments():
    offer = Offer(1, ["r x86_64"], "4.8", "01:02", versions=served_versions("4.8", [TRIXIE]))
    assert offer.txt("r x86_64")[-1] == "versions=4.8,5.1"
    assert "version=4.8" in offer.txt("r x86_64")  # what real clients read: the host's
    assert served_versions("4.8", []) == []
    assert not any(t.startswith("versions=") for t in Offer(1, ["r"], "4.8", "").txt("r"))


def record(name, version, versions=None):
    txt = {"version": version} | ({"versions": versions} if versions else {})
    return ServerRecord(name, "10.0.0.1", 1, "r x86_64", version, "01", txt, name)


def test_our_client_tries_servers_that_build_for_its_staprun_first():
    only5, old, both = record("a", "5.1"), record("b", "4.8"), record("c", "5.1", "5.1,4.8")
    assert same_runtime_first([only5, old, both]) == [old, both, only5]  # ours: before 5.0
    assert same_runtime_first([old, only5, both], "5.1") == [only5, both, old]
