"""Fidelity with stap and the real server where the upstream compile-server
testsuite (systemtap's testsuite/systemtap.server/) found us different:
listing modes, arguments after "--", a missing script or -I directory (stap
answers in its own words, as through the real server), an -I tree too large
to send, refused locale values told to the client, and the log's
"Processing N concurrent requests..." line."""

import subprocess

import pytest
import shared
from hardening_helpers import base_entries, frame, parse_reply, raw_exchange, zip_bytes

pytestmark = pytest.mark.integration


def client(box, srv, *args, timeout=120):
    return box.run("stap-client", f"--server={srv.address}", *args, timeout=timeout)


def local_stap(krel, *args):
    return subprocess.run(["stap", "-r", krel, *args], capture_output=True, text=True,
                          timeout=120, cwd="/tmp")


def test_listing_modes_build_no_module(server, sandbox, krel):
    for option in ("-L", "-l"):
        proc = client(sandbox, server, "-r", krel, option, "syscall.open")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().startswith("syscall.open"), proc.stdout
        assert b"sent no module" not in proc.stderr
    proc = client(sandbox, server, "-r", krel, "-l", "syscall.open*", "--", "-p5")
    assert proc.returncode == 0, proc.stderr
    assert b"syscall.open" in proc.stdout


def test_missing_script_is_reported_by_stap(server, sandbox, krel):
    missing = sandbox.path("missing.stp")
    proc = client(sandbox, server, "-r", krel, "-p2", missing)
    assert proc.returncode == 1
    here = local_stap(krel, "-p2", missing)
    assert f"Input file '{missing}' is missing." in here.stderr  # stap's own words ...
    assert f"Input file '{missing}' is missing." in proc.stderr.decode(), proc.stderr  # ... here


def test_missing_tapset_directory_is_ignored_as_stap_does(server, sandbox, krel):
    proc = client(sandbox, server, "-r", krel, "-I", sandbox.path("no-such-dir"), "-p2",
                  "-e", "probe begin { exit() }")
    assert proc.returncode == 0, proc.stderr
    assert b"begin" in proc.stdout


def test_a_tree_too_large_to_send_is_one_line(sandbox, krel):
    proc = sandbox.run("stap-client", "--server=127.0.0.1:1", "-r", krel, "-I", "/", "-p2",
                       "-e", "probe begin { exit() }", timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("stap-client: ERROR: unable to send / to the server: "), err


def test_refused_locale_values_are_told_to_the_client(server, sandbox, krel):
    entries = [e for e in base_entries(krel) if e[0] != "locale"]
    entries.append(("locale", b"LANG=en_US;.utf8\nLC_ALL=C.UTF-8\n"))
    rc, stderr, _ = parse_reply(raw_exchange(sandbox, server.port, frame(zip_bytes(entries))))
    assert rc == 0, stderr
    assert "Server: Localization value 'en_US;.utf8' contains illegal characters" in stderr


def test_concurrent_compiles_are_logged_as_the_real_server_does(servers, sandbox, krel):
    srv = servers.start(sandbox, krel, None, "--max-threads", "2")
    procs = [subprocess.Popen([shared.PYTHON, shared.CLIENT, "stap-client",
                               f"--server={srv.address}", "-r", krel, "-p2", "-e",
                               f'probe begin {{ printf("{n}") exit() }}'],
                              env=sandbox.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for n in range(4)]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    with open(srv.log) as f:
        assert "Processing 2 concurrent requests..." in f.read()
