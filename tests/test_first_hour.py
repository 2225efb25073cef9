"""What a user and an administrator meet in a first hour (issue 23), against real servers (the
staprun stand-in for pass 5)."""

import os
import re
import uuid

import conftest
import pytest
from hardening_helpers import small_tmpfs, wait_request_lines

SCRIPT = "probe begin { exit() }"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts a small tmpfs")


# --------------------------------------------------------------------------
# Full disks and planted links (issue 23 item 2, issue 20)
# --------------------------------------------------------------------------

def assert_one_error_line(proc, *wanted):
    """Exit 1, one stap-client error line as the last word (each of wanted in it), no traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stap-client: ERROR: "), err
    for text in wanted:
        assert text in last, err
    return last


def test_module_into_a_full_current_directory(server, sandbox, krel):
    """-p4 where the current directory has no room for the module: one line naming the path and
    the cause, and neither a truncated module nor a temporary file left behind."""
    with small_tmpfs(sandbox.path("full-cwd")) as cwd:
        proc = sandbox.run("stap-client", f"--server={server.address}", "-r", krel, "-p4",
                           "-m", "stap_full", "-e", SCRIPT, cwd=cwd)
        assert_one_error_line(proc, os.path.join(cwd, "stap_full.ko"), "No space left on device")
        assert os.listdir(cwd) == [], os.listdir(cwd)


def test_reply_into_a_full_tmpdir(server, sandbox, krel):
    """A full TMPDIR is the client's own problem: named in one line, the server not blamed nor
    another tried, nothing left in it."""
    with small_tmpfs(sandbox.path("full-tmp"), full=True) as tmp:
        proc = sandbox.run("stap-client", f"--server={server.address}", "-r", krel, "-p4",
                           "-e", SCRIPT, env={"TMPDIR": tmp})
        last = assert_one_error_line(proc, f"cannot unpack the reply in {tmp}/",
                                     "No space left on device", "TMPDIR")
        assert "no server could compile" not in last, last
        assert os.listdir(tmp) == ["filler"], os.listdir(tmp)


def test_reply_into_a_read_only_tmpdir(server, sandbox, krel):
    """A TMPDIR the client cannot write is named, not silently replaced by another directory."""
    with small_tmpfs(sandbox.path("ro-tmp"), readonly=True) as tmp:
        proc = sandbox.run("stap-client", f"--server={server.address}", "-r", krel, "-p2",
                           "-e", SCRIPT, env={"TMPDIR": tmp})
        assert_one_error_line(proc, f"cannot make a temporary directory in {tmp} (TMPDIR)",
                              "Read-only file system")


def test_module_replaces_a_planted_link(server, sandbox, krel):
    """A link named like the module, planted in the current directory, is replaced by the module:
    its target is untouched."""
    cwd, victim = sandbox.path("work"), sandbox.path("victim")
    os.makedirs(cwd)
    with open(victim, "wb") as f:
        f.write(b"precious\n")
    os.symlink(victim, os.path.join(cwd, "stap_planted.ko"))
    proc = sandbox.run("stap-client", f"--server={server.address}", "-r", krel, "-p4",
                       "-m", "stap_planted", "-e", SCRIPT, cwd=cwd)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    with open(victim, "rb") as f:
        assert f.read() == b"precious\n", "the module was written through the link"
    module = os.path.join(cwd, "stap_planted.ko")
    assert not os.path.islink(module)
    with open(module, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert sorted(os.listdir(cwd)) == ["stap_planted.ko"], os.listdir(cwd)
# --------------------------------------------------------------------------
# The server's log and configuration errors (issue 23 items 7, 8)
# --------------------------------------------------------------------------

# A line of the server's own log: "2026-12-06 06:01:02,345 stap-serverd[1234] ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} stap-serverd\[\d+\] ")


def log_lines(path):
    with open(path, errors="replace") as f:
        return f.read().splitlines()


def assert_timestamped(lines):
    untimestamped = [line for line in lines if not LOG_LINE.match(line)]
    assert not untimestamped, "\n".join(lines)


def test_a_configuration_typo_is_one_timestamped_log_line(sandbox):
    """Under systemd stderr reaches only the journal: the log, which the administrator reads,
    names the error too."""
    log = sandbox.path("server.log")
    proc = sandbox.run("stap-serverd", "--log", log, "--listen", "127.0.0.1",
                       "--max-threadz=4", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert b"stap-serverd: ERROR: " in proc.stderr and b"--max-threadz" in proc.stderr
    lines = log_lines(log)
    assert len(lines) == 1, lines
    assert_timestamped(lines)
    assert " ERROR: " in lines[0] and "--max-threadz" in lines[0], lines


def test_a_second_start_on_a_busy_port_is_logged_with_its_time(servers, sandbox, krel):
    srv = servers.start(sandbox, krel)
    log = sandbox.path("second.log")
    proc = sandbox.run("stap-start-server", "--listen", "127.0.0.1", "--port", str(srv.port),
                       "-r", krel, "--log", log, "--advertise", "none", timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("stap-start-server: ERROR: cannot listen on 127.0.0.1 port "), err
    lines = log_lines(log)
    assert_timestamped(lines)
    assert sum("ERROR: cannot listen" in line for line in lines) == 1, lines


def test_a_full_tmpdir_is_named_in_the_log(servers, sandbox, krel, runtime):
    """The real stap -p4 runs out of room in --tmpdir: the client sees the compiler's words,
    the log line says why the compile failed (it said rc=1 alone)."""
    conftest.need_root()
    with small_tmpfs(sandbox.path("small-tmp"), "640k") as small:
        srv = servers.start(sandbox, krel, runtime, "--tmpdir", small)
        script = f'probe begin {{ printf("{uuid.uuid4().hex}\\n") exit() }}'  # not in a cache
        proc = sandbox.run("stap-client", f"--server={srv.address}", "-r", krel, "-p4",
                           "-e", script, timeout=600)
        assert proc.returncode == 1, proc.stderr.decode(errors="replace")
        assert b"No space left on device" in proc.stderr, proc.stderr
        line = wait_request_lines(srv, 1)[-1]
        assert LOG_LINE.match(line) and "rc=1" in line, line
        assert f"No space left on device in --tmpdir {small} " in line, line
        srv.stop()
