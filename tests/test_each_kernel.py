"""stap-client --each-kernel (issue 21): one script checked against several kernel releases at
once, a line each, through a real server."""

import os

import pytest

import stap_client
from stap_client import Error

pytestmark = pytest.mark.integration

SCRIPT = "probe begin { exit() }"


def test_the_releases_are_a_list_or_a_file(tmp_path):
    assert stap_client.kernel_releases("6.1.0-1-amd64, 6.1.0-2-cloud-amd64,6.1.0-1-amd64") == \
        ["6.1.0-1-amd64", "6.1.0-2-cloud-amd64"]
    fleet = tmp_path / "fleet"
    fleet.write_text("# the web hosts\n6.1.0-1-amd64\n\n6.12.9+bpo-amd64  # backports\n")
    assert stap_client.kernel_releases(f"@{fleet}") == ["6.1.0-1-amd64", "6.12.9+bpo-amd64"]
    for bad, name in [("../x", "../x"), ("a;b", "a;b"), ("-x", "-x"), (",", "no release")]:
        with pytest.raises(Error) as e:
            stap_client.kernel_releases(bad)
        assert str(e.value) == f"--each-kernel: {name} is not a kernel release"
    with pytest.raises(Error, match="cannot read"):
        stap_client.kernel_releases(f"@{tmp_path / 'missing'}")


def test_each_kernel_checks_every_release_and_keeps_each_module(server, sandbox, krel):
    missing = "6.1.0-9999-amd64"
    proc = sandbox.run("stap-client", f"--server={server.address}", "-p4", "-m", "probe_x",
                       f"--each-kernel={krel},{missing}", "-e", SCRIPT, timeout=300)
    lines = proc.stdout.decode().splitlines()
    assert proc.returncode == 1, proc.stderr.decode()
    assert lines[0] == f"{krel} ok", lines
    assert lines[1].startswith(f"{missing} error: ") and "does not serve" in lines[1], lines
    assert len(lines) == 2
    assert os.path.isfile(sandbox.path(f"probe_x-{krel}.ko"))
    assert not [n for n in os.listdir(sandbox.top) if missing in n]


def test_each_kernel_says_stap_s_first_error_line(server, sandbox, krel):
    proc = sandbox.run("stap-client", f"--server={server.address}", "-p2",
                       f"--each-kernel={krel}", "-e", 'probe kernel.function("no_such_fn_x") {}',
                       timeout=300)
    assert proc.returncode == 1
    line = proc.stdout.decode().strip()
    assert line.startswith(f"{krel} error: semantic error"), line
