"""The compile round trip: stap-client -> TLS -> our server -> the real stap
-> a signed reply -> stap-client (-> the staprun stand-in for pass 5)."""

import os
import subprocess

import pytest
from shared import TEST_USER, copy_program, make_sandbox, stop_pid, wait_until

pytestmark = pytest.mark.integration

SCRIPT = 'probe begin { printf("%s|%s\\n", @1, @2); exit() }'
NASTY_ARGS = ['a "q" b$c;d', "x\ny 'z' \\ &"]


def local_stap(krel, *args, cwd=None, input=None):
    proc = subprocess.run(["stap", "-r", krel, *args], capture_output=True, cwd=cwd,
                          input=input, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def client(box, server, *args, **kw):
    return box.run("stap-client", f"--server={server.address}", *args, **kw)


# --------------------------------------------------------------------------
# Passes 1-3 give exactly what local stap gives
# --------------------------------------------------------------------------

@pytest.mark.parametrize("last_pass", ["1", "2", "3"])
def test_passes_1_to_3_match_local_stap(last_pass, server, sandbox, krel):
    expected = local_stap(krel, "-p" + last_pass, "-e", SCRIPT, *NASTY_ARGS)
    proc = client(sandbox, server, "-r", krel, "-p" + last_pass, "-e", SCRIPT, *NASTY_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


def test_script_file_stdin_and_tapset_dir(server, sandbox, krel):
    tapsets = sandbox.path("tapsets")
    os.makedirs(tapsets)
    with open(os.path.join(tapsets, "greet.stp"), "w") as f:
        f.write('function greet:string (who:string) { return "hi " . who }\n')
    script = sandbox.path("my script.stp")
    with open(script, "w") as f:
        f.write("probe begin { println(greet(@1)); exit() }\n")
    for last_pass in ("1", "2"):
        expected = local_stap(krel, "-p" + last_pass, "-I", tapsets, script, "you")
        proc = client(sandbox, server, "-r", krel, "-p" + last_pass, "-I", tapsets,
                      script, "you")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected  # the user's own paths, not the server's
        with open(script, "rb") as f:
            text = f.read()
        expected = local_stap(krel, "-p" + last_pass, "-I", tapsets, "-", "you", input=text)
        proc = client(sandbox, server, "-r", krel, "-p" + last_pass, "-I", tapsets, "-", "you",
                      input=text)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected


def test_semantic_error_is_reported_with_exit_1(server, sandbox, krel):
    proc = client(sandbox, server, "-r", krel, "-p2", "-e", "probe begin { no_such_function() }")
    assert proc.returncode == 1
    assert b"semantic error" in proc.stderr and b"no_such_function" in proc.stderr
    assert b"stap-serverd: ERROR" not in proc.stderr  # stap's own failure, not ours


def test_client_help_and_bad_options(sandbox):
    proc = sandbox.run("stap-client", "--help")
    assert proc.returncode == 0 and b"--server=HOST[:PORT]" in proc.stdout
    for args, message in ((["-R", "/tmp", "-e", "x"], b"-R names a local runtime directory"),
                          (["--server=h:99999", "-e", "x"], b"invalid port '99999'")):
        proc = sandbox.run("stap-client", *args)
        assert proc.returncode == 1, args
        lines = proc.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stap-client: ERROR: ")
        assert message in proc.stderr
    # What stap itself refuses while reading its command line, in its words.
    for args, first in ((["-p", "7", "-e", "x"], "Invalid pass number (should be 1-5)."),
                        ([], "A script must be specified.")):  # a missing file: test_fidelity
        proc = sandbox.run("stap-client", *args)
        here = subprocess.run(["stap", *args], capture_output=True, text=True, timeout=60)
        assert (proc.returncode, here.returncode) == (1, 1), args
        assert proc.stderr.decode() == here.stderr and here.stderr.startswith(first), args


# --------------------------------------------------------------------------
# Pass 4: a real module arrives in the current directory
# --------------------------------------------------------------------------

def modinfo_vermagic(path):
    return subprocess.run(["modinfo", "-F", "vermagic", path], capture_output=True,
                          text=True, check=True).stdout.split()[0]


def test_pass_4_delivers_a_real_module(server, sandbox, krel):
    work = sandbox.path("work")
    os.makedirs(work)
    proc = client(sandbox, server, "-r", krel, "-p4", "-e", "probe begin { exit() }", cwd=work,
                  timeout=600)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.decode().strip()
    assert name.startswith("stap_") and name.endswith(".ko")
    assert os.listdir(work) == [name]
    assert modinfo_vermagic(os.path.join(work, name)) == krel
    proc = client(sandbox, server, "-r", krel, "-p4", "-m", "hello_mod", "-e",
                  'probe begin { println("hello"); exit() }', cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello_mod.ko\n"
    assert modinfo_vermagic(os.path.join(work, "hello_mod.ko")) == krel


# --------------------------------------------------------------------------
# Pass 5: staprun (a stand-in here) gets the module and stap's options
# --------------------------------------------------------------------------

def test_pass_5_runs_staprun_with_stap_options(server, sandbox, krel, staprun):
    env, record = staprun
    work = sandbox.path("work")
    os.makedirs(work)
    proc = client(sandbox, server, "-r", krel, "-vv", "-o", "out.txt", "-c", "ls -l /",
                  "-s", "8", "-G", "g=2", "-e",
                  "global g = 1; probe begin { exit() }", cwd=work, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(record + ".args") as f:
        args = f.read().splitlines()
    module = next(a for a in args if a.endswith(".ko"))
    assert args == ["-v", "-o", os.path.join(work, "out.txt"), "-c", "ls -l /",
                    "-b", "8", "-R", module, "g=2"]
    assert modinfo_vermagic(record + ".ko") == krel
    with open(record + ".cwd") as f:
        assert f.read().strip() == work
    assert not os.path.exists(os.path.join(work, os.path.basename(module)))
    assert not os.path.exists(module)  # the client's temporary directory is gone
    proc = client(sandbox, server, "-r", krel, "-x", "1234", "-e", "probe begin { exit() }",
                  cwd=work, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(record + ".args") as f:
        args = f.read().splitlines()
    assert args[:3] == ["-t", "1234", "-R"] and args[3].endswith(".ko")


def test_pass_5_failure_is_the_clients_failure(server, sandbox, krel, staprun):
    env, record = staprun
    proc = client(sandbox, server, "-r", krel, "-m", "failing", "-e", "probe begin { exit() }",
                  env={**env, "STAPRUN_RC": "3"}, timeout=600)
    assert proc.returncode == 1
    assert b"stap-client: ERROR: staprun exited with status 3" in proc.stderr
    with open(record + ".args") as f:
        assert f.read().splitlines()[-1].endswith("failing.ko")  # -m: no -R


# --------------------------------------------------------------------------
# Trust and failover
# --------------------------------------------------------------------------

def test_untrusted_server_is_refused_until_trusted(server, sandbox, krel):
    stranger = make_sandbox()  # another sysconfdir: trusts nobody yet
    proc = stranger.run("stap-client", f"--server={server.address}", "-r", krel, "-p1",
                        "-e", "probe begin {}")
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "no usable client certificate database" in err
    certfile = os.path.join(sandbox.sysconfdir, "systemtap", "ssl", "server", "stap-server.cert")
    # an unrelated trusted database: the server is still refused, by name and reason
    other = make_sandbox()
    other_srv_db = stranger.path("unrelated")
    from shared import start_server
    srv2 = start_server(other, krel)
    try:
        cert2 = os.path.join(other.sysconfdir, "systemtap", "ssl", "server", "stap-server.cert")
        assert stranger.run("stap-add-server-cert", cert2, other_srv_db).returncode == 0
        proc = stranger.run("stap-client", f"--server={server.address}", f"--ssl={other_srv_db}",
                            "-r", krel, "-p1", "-e", "probe begin {}")
        assert proc.returncode == 1
        assert proc.stderr.decode().startswith(
            f"stap-client: ERROR: no server could compile the script ({server.address}: not "
            "trusted here (certificate serial "), proc.stderr
        assert f"to trust it: stap-add-server-cert {server.address})" in proc.stderr.decode()
    finally:
        srv2.stop()
    # --ssl=DIR holding the server's certificate
    trusted = stranger.path("trusted")
    assert stranger.run("stap-add-server-cert", certfile, trusted).returncode == 0
    proc = stranger.run("stap-client", f"--server={server.address}", f"--ssl={trusted}",
                        "-r", krel, "-p1", "-e", "probe begin {}")
    assert proc.returncode == 0, proc.stderr
    # stap-add-server-cert into the global database of that sysconfdir
    global_db = os.path.join(stranger.sysconfdir, "systemtap", "ssl", "client")
    assert stranger.run("stap-add-server-cert", certfile, global_db).returncode == 0
    proc = stranger.run("stap-client", f"--server={server.address}", "-r", krel, "-p1",
                        "-e", "probe begin {}")
    assert proc.returncode == 0, proc.stderr


def test_servers_are_tried_in_order(server, sandbox, krel):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nobody listens once closed
    proc = sandbox.run("stap-client", f"--server=127.0.0.1:{dead}", f"--server={server.address}",
                       "-r", krel, "-p1", "-e", "probe begin {}")
    assert proc.returncode == 0, proc.stderr
    assert f"127.0.0.1:{dead}: cannot connect".encode() in proc.stderr
    proc = sandbox.run("stap-client", f"--server=127.0.0.1:{dead}", "--deadline=1", "-r", krel,
                       "-p1", "-e", "probe begin {}")  # retried until the deadline
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1].startswith(
        "stap-client: ERROR: no server could compile the script (127.0.0.1:")


def test_unprivileged_client_trusts_root_server_globally(server, sandbox, krel):
    """A root server's certificate is in the global database: every user trusts it."""
    from shared import Sandbox, need_root
    need_root()
    user = make_sandbox(TEST_USER)
    box = Sandbox(top=user.top, env={**user.env, "STAP_SYSCONFDIR": sandbox.sysconfdir},
                  user=TEST_USER)
    proc = box.run("stap-client", f"--server={server.address}", "-r", krel, "-p2", "-e",
                   "probe begin { exit() }")
    assert proc.returncode == 0, proc.stderr
    assert b"begin" in proc.stdout


def test_unprivileged_server_and_client(user_sandbox, servers, krel, runtime):
    srv = servers.start(user_sandbox, krel, runtime)
    proc = user_sandbox.run("stap-client", f"--server={srv.address}", "-r", krel, "-p2", "-e",
                            "probe begin { exit() }")
    assert proc.returncode == 0, proc.stderr
    # the compile ran as the user: nothing in the log says otherwise, and the
    # user's own database made the trust
    assert os.path.exists(os.path.join(user_sandbox.systemtap_dir, "ssl", "client", "cert9.db"))


def test_root_trusts_through_its_own_client_database_too(user_sandbox, sandbox, servers,
                                                         krel, runtime):
    """Root searches its own $SYSTEMTAP_DIR/ssl/client before the global one."""
    srv = servers.start(user_sandbox, krel, runtime)
    args = ("stap-client", f"--server={srv.address}", "-r", krel, "-p1", "-e",
            "probe begin { exit() }")
    own = os.path.join(sandbox.systemtap_dir, "ssl", "client")
    glob = os.path.join(sandbox.sysconfdir, "systemtap", "ssl", "client")
    proc = sandbox.run(*args)
    assert proc.returncode == 1
    assert (f"no usable client certificate database (searched {own}, {glob})"
            in proc.stderr.decode()), proc.stderr
    cert = os.path.join(srv.status["database"], "stap-server.cert")
    proc = sandbox.run("stap-add-server-cert", cert, own)
    assert proc.returncode == 0, proc.stderr
    proc = sandbox.run(*args)
    assert proc.returncode == 0, proc.stderr


def test_server_log_has_one_line_per_request(server, sandbox, krel):
    client(sandbox, server, "-r", krel, "-p1", "-e", "probe begin {}")
    with open(server.log) as f:
        lines = [l for l in f if " request client=" in l]
    assert len(lines) == 1
    line = lines[0]
    for field in ("client='127.0.0.1:", "version='4.8'", f"release='{krel}'",
                  "options='-p1 -eprobe begin {}'", "rc=0", "seconds="):
        assert field in line, line


def test_progress_of_a_quick_compile_only_with_v(server, sandbox, krel):
    """Off a terminal too, progress waits a few seconds (test_first_hour shows a slow compile's);
    -v says each step at once."""
    proc = client(sandbox, server, "-r", krel, "-p1", "-e", "probe begin {}")
    assert proc.returncode == 0 and b"compiling on server" not in proc.stderr
    proc = client(sandbox, server, "-r", krel, "-p1", "-v", "-e", "probe begin {}")
    assert proc.returncode == 0
    assert f"stap-client: compiling on server {server.address}...".encode() in proc.stderr


def test_root_server_compiles_as_an_unprivileged_account(servers, sandbox, krel, shared_dir):
    """The stap a root server runs has the dedicated compile account's uid,
    never 0 and never nobody's; the shared nobody and root are refused."""
    import pwd

    from shared import need_root
    need_root()
    stand_in = copy_program("stap_whoami.sh", os.path.join(shared_dir, "stap-whoami"))
    cache = os.path.join(sandbox.top, "cache")
    srv = servers.start(sandbox, krel, None, cache=cache, env={"SYSTEMTAP_STAP": stand_in})
    proc = client(sandbox, srv, "-r", krel, "-p2", "-e", "probe begin {}")
    assert proc.returncode == 0, proc.stderr
    account = pwd.getpwnam("stap-compile")
    assert proc.stdout.decode().split()[:2] == [f"uid={account.pw_uid}", f"gid={account.pw_gid}"]
    assert set(os.listdir(cache)) <= {"knowledge", ".runtime"}  # the server's alone (its
    # knowledge of kernels, its fixed runtimes): no cache of the compile account's
    assert os.stat(os.path.join(cache, "knowledge")).st_uid == 0
    for name in ("nobody", "root"):
        refused = sandbox.run("stap-start-server", "--listen", "127.0.0.1", "-r", krel,
                              "--advertise", "none", "--user", name)
        assert refused.returncode == 1
        assert refused.stderr.decode().strip() == (
            f"stap-start-server: ERROR: --user {name}: the compile account must be a "
            "dedicated unprivileged account, not root or nobody"), refused.stderr


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signals_reach_staprun(signame, server, sandbox, krel, staprun):
    import signal
    env, record = staprun
    script = copy_program("staprun_trap.sh", os.path.join(os.path.dirname(record),
                                                          "trapping-staprun"))
    proc = subprocess.Popen(
        ["/usr/bin/python3", os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                          "stap_client.py"), "stap-client",
         f"--server={server.address}", "-r", krel, "-e", "probe begin { exit() }"],
        env={**sandbox.env, **env, "SYSTEMTAP_STAPRUN": script}, cwd=sandbox.top,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def staprun_started():
        if os.path.exists(record + ".started"):
            return True
        assert proc.poll() is None, proc.communicate()
        return False

    try:
        wait_until(staprun_started, 300, "staprun did not start within 300 s")
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=20)
    finally:
        stop_pid(proc, timeout=0)
    with open(record + ".sig") as f:
        assert f.read().strip() == signame[3:]
    assert proc.returncode == 0, err  # staprun stopped cleanly, so did the client


def test_module_run_by_its_file_name_explains_itself(sandbox):
    import sys

    from shared import CLIENT, SERVER
    for module, command in ((CLIENT, "stap-find-servers"), (SERVER, "stap-start-server")):
        proc = subprocess.run([sys.executable, module, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and command in proc.stdout
        proc = subprocess.run([sys.executable, module], capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith("usage: ")
