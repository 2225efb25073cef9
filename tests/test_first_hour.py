"""What a user and an administrator meet in a first hour (issue 23), against real servers (the
staprun stand-in for pass 5)."""

import os
import re
import time
import uuid

import pytest
import shared
from hardening_helpers import small_tmpfs, stand_in_stap, wait_request_lines
from netns import network_factory  # noqa: F401  (a fixture)
from shared import CLIENT, PYTHON, make_sandbox, start_server, stop_pid

import stap_client

SCRIPT = "probe begin { exit() }"
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts a small tmpfs")]


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
    shared.need_root()
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


# --------------------------------------------------------------------------
# Fail fast, say it once (issue 23 items 1, 3, 4, 6)
# --------------------------------------------------------------------------

SCRIPT = "probe begin { exit() }"


def empty_client_db(box):
    """The sandbox's global client database, trusting nobody (a client needs one to start)."""
    db = stap_client.CertDB(os.path.join(box.sysconfdir, "systemtap", "ssl", "client"))
    db.create(world_readable=True)
    return db


def timed(run, *args, **kw):
    started = time.monotonic()
    proc = run(*args, **kw)
    return proc, time.monotonic() - started


def text(output):
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def one_line(output):
    """The only line of output, which must be short."""
    lines = text(output).strip().splitlines()
    assert len(lines) == 1, lines
    assert len(lines[0].split()) <= 30, lines[0]
    return lines[0]


def test_refused_port_fails_in_seconds_off_a_terminal(sandbox, krel):
    empty_client_db(sandbox)
    # stderr is a pipe, not a terminal; the default --deadline is 600 s
    proc, seconds = timed(sandbox.run, "stap-client", "--server=127.0.0.1:1", "-r", krel, "-p1",
                          "-e", SCRIPT, timeout=120)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith("stap-client: ERROR: ") and "127.0.0.1:1" in line, line
    assert "refused" in line and "compiling on" not in line, line
    print(f"refused port: {seconds:.1f} s: {line}")
    assert seconds < 30


def test_unreachable_host_fails_in_seconds(network_factory, krel):  # noqa: F811
    b = network_factory(avahi=False).hosts[1]
    box = make_sandbox()
    empty_client_db(box)
    assert b.run(["ip", "route", "add", "unreachable", "10.99.0.0/16"]).returncode == 0
    proc, seconds = timed(b.run, [PYTHON, CLIENT, "stap-client", "--server=10.99.0.1:4000",
                                  "-r", krel, "-p1", "-e", SCRIPT], env=box.env, timeout=120)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "10.99.0.1:4000" in line and "No route to host" in line, line
    assert "compiling on" not in line and "no server free" not in line, line
    print(f"unreachable host: {seconds:.1f} s: {line}")
    assert seconds < 30


def test_untrusted_server_said_once_with_the_fix(server, krel):
    stranger = make_sandbox()
    empty_client_db(stranger)
    with open(os.path.join(server.status["database"], stap_client.SERVER_CERT_FILE), "rb") as f:
        serial = stap_client.serial_text(stap_client.certificate_serial(f.read()))
    args = ["stap-client", f"--server={server.address}", "-r", krel, "-p1", "-e", SCRIPT]
    proc = stranger.run(*args, timeout=120)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert f"stap-add-server-cert {server.address}" in line and serial in line, line
    assert "SEC_ERROR" not in line and "stap-server.cert" not in line, line
    verbose = stranger.run(*args[:-2], "-v", "-e", SCRIPT, timeout=120)
    assert verbose.returncode == 1 and b"SEC_ERROR" in verbose.stderr  # NSS's words for -v


def test_progress_off_a_terminal_says_what_it_waits_for(servers, sandbox, krel):
    slow = stand_in_stap(sandbox, 'sleep 7\nexec /usr/bin/stap "$@"\n')
    srv = servers.start(sandbox, krel, None, env={"SYSTEMTAP_STAP": slow})
    proc, seconds = timed(sandbox.run, "stap-client", f"--server={srv.address}", "-r", krel,
                          "-p1", "-e", SCRIPT, timeout=120)  # stderr is a pipe
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in text(proc.stderr).splitlines() if l.startswith("stap-client: ")]
    print(f"{seconds:.1f} s:", *lines, sep="\n  ")
    assert any(l.startswith(f"stap-client: waiting for server {srv.address} (") for l in lines), \
        lines
    assert all(f"server {srv.address}" in l for l in lines), lines
    assert len(lines) <= seconds / 3 + 1  # at most one line every three seconds


def start_on(host, box, krel):
    """A real server inside host, advertised on its link: (pid, status)."""
    srv = start_server(box, krel, netns=host, log=box.path(f"server-{time.monotonic_ns()}.log"))
    return srv.pid, srv.status


def find_until(host, box, wanted, *args, bound=10):
    """stap-find-servers ARGS run until wanted(proc), within bound seconds."""
    deadline = time.monotonic() + bound
    while True:
        proc = host.run([PYTHON, CLIENT, "stap-find-servers", *args], env=box.env)
        if wanted(proc) or time.monotonic() > deadline:
            return proc
        time.sleep(0.3)


def test_discovery_skips_untrusted_advertised_servers(network_factory, krel):  # noqa: F811
    a, b = network_factory(avahi=False).hosts
    mine, theirs = make_sandbox(), make_sandbox()
    empty_client_db(mine)
    pids = []
    try:
        pid, untrusted = start_on(a, theirs, krel)  # trusted by its own sandbox only
        pids.append(pid)
        find_until(b, mine, lambda p: f" {untrusted['port']} " in p.stdout, "--all")
        compile_args = [PYTHON, CLIENT, "stap-client", "-r", krel, "-p1", "-e", SCRIPT]
        proc = b.run(compile_args, env=mine.env, timeout=120)
        assert proc.returncode == 1
        line = one_line(proc.stderr)
        assert line.startswith(f"stap-client: ERROR: no trusted compile server for {krel}"), line
        assert f"stap-add-server-cert {a.address}:{untrusted['port']}" in line, line
        assert "SEC_ERROR" not in line
        pid, trusted = start_on(a, mine, krel)  # trusted in mine's global database
        pids.append(pid)
        find_until(b, mine, lambda p: f" {trusted['port']} " in p.stdout, "--all")
        proc = b.run(compile_args[:3] + ["-v"] + compile_args[3:], env=mine.env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"skipping server {a.address}:{untrusted['port']}: its certificate (serial " \
            in proc.stderr, proc.stderr
        with open(untrusted["log"]) as f:  # never contacted
            assert f"client='{b.address}:" not in f.read()
        with open(trusted["log"]) as f:
            assert f"client='{b.address}:" in f.read()
    finally:
        for pid in pids:
            stop_pid(pid)


def test_one_way_to_write_a_certificate(network_factory, krel):  # noqa: F811
    a, b = network_factory(avahi=False).hosts
    box = make_sandbox()
    pid, status = start_on(a, box, krel)
    try:
        with open(os.path.join(status["database"], stap_client.SERVER_CERT_FILE), "rb") as f:
            der = f.read()
        serial, sha256 = stap_client.serial_text(stap_client.certificate_serial(der)), \
            stap_client.fingerprint(der)
        assert re.fullmatch(r"([0-9a-f]{2}:)+[0-9a-f]{2}", serial), serial
        assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", sha256), sha256
        # the status file and the log
        assert (status["serial"], status["fingerprint"]) == (serial, sha256), status
        with open(status["log"]) as f:
            assert f"certificate serial {serial}, SHA-256 fingerprint {sha256}" in f.read()
        # stap-find-servers: certinfo is the serial, as the real client reads it
        found = find_until(b, box, lambda p: f" {status['port']} " in p.stdout, "--all")
        assert f"'certinfo={serial}'" in found.stdout, found.stdout
        # the trust prompt, and what stap-add-server-cert says it did
        peer, db = f"{a.address}:{status['port']}", box.path("fetched")
        shown = b.run([PYTHON, CLIENT, "stap-add-server-cert", peer, db], env=box.env,
                      input="y\n", stdin=None)
        assert shown.returncode == 0, shown.stderr
        assert f"serial:      {serial}\n" in shown.stdout, shown.stdout
        assert f"SHA-256:     {sha256}\n" in shown.stdout, shown.stdout
        said = shown.stdout.splitlines()[-1]
        assert said == f"Trust it in {db}? [y/N] trusted the certificate with serial {serial}, " \
            f"SHA-256 fingerprint {sha256}, in {db}", said
        # --revoke takes the chosen forms and the old ones (no 00, plain lowercase hex)
        for form in (serial, serial[3:] if serial.startswith("00:") else serial,
                     sha256, sha256.replace(":", "").lower()):
            revoked = b.run([PYTHON, CLIENT, "stap-add-server-cert", "--revoke", form, db],
                            env=box.env)
            assert revoked.returncode == 0, (form, revoked.stderr)
            assert one_line(revoked.stdout) == f"revoked the certificate with serial {serial}, " \
                f"SHA-256 fingerprint {sha256}, in {db}"
            added = b.run([PYTHON, CLIENT, "stap-add-server-cert", "--yes", peer, db],
                          env=box.env)
            assert added.returncode == 0, added.stderr
        # no compatible server: a hint, whoever asked
        local = b.run(["uname", "-r"]).stdout.strip()
        if local != krel:
            hint = b.run([PYTHON, CLIENT, "stap-find-servers"], env=box.env)
            assert hint.returncode == 1 and hint.stdout == ""
            assert one_line(hint.stderr) == (f"stap-find-servers: 1 server found, none for "
                                             f"{local} x86_64; --all lists them")
    finally:
        stop_pid(pid)


def test_find_servers_refuses_an_unknown_option(sandbox):
    proc = sandbox.run_argv(["unshare", "-n", PYTHON, CLIENT, "stap-find-servers", "--al"],
                            timeout=60)  # a private network: the old code browsed
    assert proc.returncode == 1 and proc.stdout == b""
    assert one_line(proc.stderr).startswith("stap-find-servers: ERROR: unknown option --al; "
                                            "usage: stap-find-servers [--all]")


def test_which_failures_are_worth_another_try():
    busy, lost = stap_client.Unavailable("server busy"), stap_client.Lost("closed without a reply")
    refused = stap_client.Unreachable("cannot connect: Connection refused")
    untrusted = stap_client.Untrusted("not trusted here", "SEC_ERROR_UNTRUSTED_ISSUER")
    worth = stap_client.worth_trying
    assert worth([]) and worth([busy] * 50)  # busy: until the deadline
    assert worth([refused]) and not worth([refused, refused])  # not there: one more try
    assert worth([busy, lost]) and not worth([lost, busy, refused])
    assert not worth([untrusted]) and not worth([busy, stap_client.Error("bad reply")])
    assert stap_client.what_happened([lost, refused, refused]) == \
        "closed without a reply, then cannot connect: Connection refused"
    assert stap_client.what_happened([busy, busy]) == "server busy"
