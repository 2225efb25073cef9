"""What a user meets in a first hour with stap-client, against real servers
(the staprun stand-in for pass 5)."""

import contextlib
import os
import subprocess

import pytest

SCRIPT = "probe begin { exit() }"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts a small tmpfs")


# --------------------------------------------------------------------------
# Full disks and planted links (issue 23 item 2, issue 20)
# --------------------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(path, size="64k", full=False, readonly=False):
    """A tmpfs of size at path (made), mounted for the block; full: filled to the last byte."""
    os.makedirs(path, 0o755)
    options = f"size={size},mode=0755" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)
    try:
        if full:
            fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * 4096):
                    pass
            os.close(fd)
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


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
