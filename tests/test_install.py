"""`make install` and `make uninstall` into a DESTDIR: every command is a
link to the one launcher and runs from the installed tree, importing its
module's byte code; SYSCONFDIR is rewritten, the manual pages are there,
and uninstall removes everything install made."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest

pytestmark = pytest.mark.integration

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

SYSCONFDIR = "/etc/test-sysconf"
MAKE_VARS = ["prefix=/usr", f"sysconfdir={SYSCONFDIR}", "PYTHON=/usr/bin/python3"]
CLIENT_COMMANDS = ["stap-client", "stap-find-servers", "stap-add-server-cert"]
SERVER_COMMANDS = ["stap-serverd", "stap-start-server", "stap-stop-server",
                   "stap-find-or-start-server"]
MANPAGES = ["stap-server.8"] + [c + ".8" for c in CLIENT_COMMANDS + SERVER_COMMANDS]
PKGLIB = "usr/lib/stap-server"


def make(target, destdir):
    if not shutil.which("make"):
        pytest.skip("make is not installed (tools/install-deps installs it)")
    return subprocess.run(["make", "-C", ROOT, "--no-print-directory", target,
                           f"DESTDIR={destdir}", *MAKE_VARS],
                          capture_output=True, text=True, timeout=120)


def tree(top):
    """Every file and symlink under top, relative to it."""
    found = set()
    for root, dirs, files in os.walk(top):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(os.path.relpath(os.path.join(root, name), top))
    return found


def clean_env(tmp):
    """No PYTHONPATH, no sysconfdir override, a private HOME/SYSTEMTAP_DIR."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "STAP_SYSCONFDIR", "SYSTEMTAP_DIR", "PYTHONHOME")}
    env.update(HOME=os.path.join(tmp, "home"), SYSTEMTAP_DIR=os.path.join(tmp, "home", ".st"),
               LANG="C.UTF-8")
    return env


@pytest.fixture(scope="module")
def installed():
    """A DESTDIR with the product installed (and the list of what make put there)."""
    tmp = tempfile.mkdtemp(prefix="stap-install.")
    dest = os.path.join(tmp, "root")
    proc = make("install", dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = tree(dest)
    os.makedirs(os.path.join(tmp, "home"))
    yield dest, files, tmp
    shutil.rmtree(tmp, ignore_errors=True)


def run_installed(installed, command, *args, timeout=60):
    dest, _, tmp = installed
    argv = [os.path.join(dest, "usr/bin", command), *args]
    if command == "stap-find-servers" and os.geteuid() == 0 and shutil.which("unshare"):
        # It ignores its arguments and browses: keep its queries off the
        # machine's network (a private network namespace, no interfaces up).
        argv = ["unshare", "-n", *argv]
    # cwd outside the repository: the modules must come from DESTDIR.
    return subprocess.run(argv, cwd=tmp, env=clean_env(tmp), capture_output=True, text=True,
                          timeout=timeout)


def test_install_layout(installed):
    dest, files, _ = installed
    expected = {f"{PKGLIB}/stap_client.py", f"{PKGLIB}/stap_server.py"}
    expected |= {f"usr/bin/{c}" for c in CLIENT_COMMANDS + SERVER_COMMANDS}
    expected |= {f"usr/share/man/man8/{p}" for p in MANPAGES}
    assert expected <= files, sorted(expected - files)
    for m in ("stap_client.py", "stap_server.py"):
        path = os.path.join(dest, PKGLIB, m)
        assert os.stat(path).st_mode & 0o777 == 0o755
        with open(path) as f:
            assert f.readline() == "#!/usr/bin/python3\n"
    for m in ("stap_client", "stap_server"):  # byte code, which the launchers use
        assert any(n.startswith(f"{m}.cpython-") for n in files_in(dest, PKGLIB, "__pycache__"))
    launcher = os.path.join(dest, PKGLIB, "launcher")
    assert os.stat(launcher).st_mode & 0o777 == 0o755
    with open(launcher) as f:
        assert f.readline() == "#!/usr/bin/python3\n"
    for c in CLIENT_COMMANDS + SERVER_COMMANDS:
        # Relative, so the tree works wherever DESTDIR puts it.
        assert os.readlink(os.path.join(dest, "usr/bin", c)) == "../lib/stap-server/launcher", c
    assert set(os.listdir(os.path.join(dest, "usr/bin"))) == set(CLIENT_COMMANDS + SERVER_COMMANDS)


def test_every_command_installed():
    """The modules' commands are what make install links (a new command is not forgotten)."""
    proc = subprocess.run(
        ["/usr/bin/python3", "-c", "import stap_client as c, stap_server as s; "
         "print(*c.COMMANDS); print(*s.COMMANDS)"],
        cwd=ROOT, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True,
        text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    client, server = (line.split() for line in proc.stdout.splitlines())
    assert (sorted(client), sorted(server)) == (sorted(CLIENT_COMMANDS), sorted(SERVER_COMMANDS))


def files_in(*parts):
    return os.listdir(os.path.join(*parts))


def test_sysconfdir_rewritten(installed):
    dest, _, tmp = installed
    lib = os.path.join(dest, PKGLIB)
    with open(os.path.join(lib, "stap_client.py")) as f:
        lines = [line for line in f if line.startswith("SYSCONFDIR = ")]
    assert lines == [f'SYSCONFDIR = "{SYSCONFDIR}"  # make install rewrites this line\n']
    # ... and the installed code uses it (no STAP_SYSCONFDIR in the environment).
    proc = subprocess.run(
        ["/usr/bin/python3", "-c",
         (f"import sys; sys.path.insert(0, {lib!r}); import stap_client as c; "
          "print(c.__file__); print(c.sysconfdir())")],
        cwd=tmp, env=clean_env(tmp), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    module, sysconfdir = proc.stdout.split()
    assert module == os.path.join(lib, "stap_client.py")
    assert sysconfdir == SYSCONFDIR
    # The repository's copy is left alone.
    with open(os.path.join(ROOT, "stap_client.py")) as f:
        assert 'SYSCONFDIR = "/etc"  # make install rewrites this line\n' in f.read()


@pytest.mark.parametrize("command", ["stap-client", "stap-serverd", "stap-start-server",
                                     "stap-find-or-start-server"])
def test_help_from_install(installed, command):
    proc = run_installed(installed, command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {command}"), proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command,usage", [
    ("stap-stop-server", "usage: stap-stop-server PID"),
    ("stap-add-server-cert", "usage: stap-add-server-cert CERTFILE DIRNAME"),
])
def test_usage_from_install(installed, command, usage):
    proc = run_installed(installed, command)
    assert proc.returncode == 1
    assert usage in proc.stderr
    assert "Traceback" not in proc.stderr


def test_find_servers_from_install(installed):
    """stap-find-servers ignores its arguments: it runs, finds nothing in an
    empty network namespace and says so with status 1 (no traceback)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare: it browses, and only in a private network namespace")
    proc = run_installed(installed, "stap-find-servers", "--help")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command,module", [("stap-client", "stap_client"),
                                            ("stap-serverd", "stap_server")])
def test_command_imports_byte_code(installed, command, module):
    """Each command runs its module from the byte code make install wrote, and a client command
    imports no server code."""
    dest, _, tmp = installed
    proc = subprocess.run([os.path.join(dest, "usr/bin", command), "--help"], cwd=tmp,
                          env={**clean_env(tmp), "PYTHONVERBOSE": "1"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cache = os.path.join(dest, PKGLIB, "__pycache__")
    loaded = [os.path.realpath(p) for p in re.findall(r"^# code object from '(\S+\.pyc)'$",
                                                      proc.stderr, re.M)]
    assert any(os.path.dirname(p) == cache and os.path.basename(p).startswith(f"{module}.")
               for p in loaded), loaded
    assert ("import 'stap_server'" in proc.stderr) == (module == "stap_server"), proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["stap-client", "--help"]])
def test_unknown_name_fails_in_one_line(installed, args):
    """A link to the launcher under a name that is no command: one line naming the commands,
    whatever its arguments."""
    dest, _, tmp = installed
    link = os.path.join(tmp, "stap-nonesuch")
    os.symlink(os.path.join(dest, PKGLIB, "launcher"), link)
    try:
        proc = subprocess.run([link, *args], cwd=tmp, env=clean_env(tmp), capture_output=True,
                              text=True, timeout=60)
    finally:
        os.unlink(link)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == ("stap-nonesuch: ERROR: not a command of the stap-server utilities; "
                           f"they are: {', '.join(sorted(CLIENT_COMMANDS + SERVER_COMMANDS))}\n")


def test_launcher_by_its_own_name(installed):
    """Run by its own name, the launcher takes the command from its first argument, as the
    modules do (the benchmarks run it so)."""
    dest, _, tmp = installed
    proc = subprocess.run(["/usr/bin/python3", os.path.join(dest, PKGLIB, "launcher"),
                           "stap-stop-server"], cwd=tmp, env=clean_env(tmp), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "usage: stap-stop-server PID" in proc.stderr and "Traceback" not in proc.stderr


def test_client_without_server_module(installed):
    """What the client package installs (no stap_server.py) runs on its own."""
    dest, _, tmp = installed
    top = os.path.join(tmp, "client-only")
    shutil.copytree(dest, top, symlinks=True)
    try:
        lib = os.path.join(top, PKGLIB)
        os.unlink(os.path.join(lib, "stap_server.py"))
        for name in files_in(lib, "__pycache__"):
            if name.startswith("stap_server."):
                os.unlink(os.path.join(lib, "__pycache__", name))
        proc = run_installed((top, None, tmp), "stap-add-server-cert")
        assert proc.returncode == 1
        assert "usage: stap-add-server-cert" in proc.stderr and "Traceback" not in proc.stderr
        proc = run_installed((top, None, tmp), "stap-serverd", "--help")
        assert proc.returncode == 1
        assert proc.stderr == ("stap-serverd: ERROR: not a command of the stap-server utilities; "
                               f"they are: {', '.join(sorted(CLIENT_COMMANDS))}\n")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_manpages_installed(installed):
    dest, _, _ = installed
    man8 = os.path.join(dest, "usr/share/man/man8")
    for page in MANPAGES:
        with open(os.path.join(man8, page)) as f:
            text = f.read()
        with open(os.path.join(ROOT, "man", page)) as f:
            assert text == f.read()
        so = re.match(r"\.so (\S+)\n", text)
        if so:  # a per-command page: its target is installed too
            assert os.path.isfile(os.path.join(dest, "usr/share/man", so.group(1))), page
        else:
            assert re.search(r"^\.TH ", text, re.MULTILINE), page
    proc = subprocess.run(["man", "-l", os.path.join(man8, "stap-server.8")],
                          env={**os.environ, "MANPAGER": "cat", "PAGER": "cat",
                               "MANWIDTH": "80"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # man-db comes from tools/install-deps
    assert "stap-client" in proc.stdout


def test_install_twice_and_uninstall():
    """A second install over the first works; uninstall with the same
    variables removes every file and link install made, and the module
    directory with the bytecode the commands left there."""
    tmp = tempfile.mkdtemp(prefix="stap-uninstall.")
    try:
        dest = os.path.join(tmp, "root")
        for _ in range(2):
            proc = make("install", dest)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        files = tree(dest)
        os.makedirs(os.path.join(tmp, "home"))
        # Running the server imports the installed client: leaves __pycache__.
        proc = run_installed((dest, files, tmp), "stap-serverd", "--help")
        assert proc.returncode == 0, proc.stderr
        proc = make("uninstall", dest)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert tree(dest) == set(), sorted(tree(dest))
        assert not os.path.exists(os.path.join(dest, PKGLIB))
        # Only the (now empty) standard directories stay.
        for d in ("usr/bin", "usr/share/man/man8"):
            assert os.listdir(os.path.join(dest, d)) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
