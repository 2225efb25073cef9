"""The first hour with a new server: what an administrator meets while setting one up (issue 23)."""

import re
import uuid

import conftest
from hardening_helpers import small_tmpfs, wait_request_lines

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
