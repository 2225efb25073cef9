"""What the tests and the benchmarks share: a private configuration for
our commands, and ending the processes they start by pid."""

import contextlib
import os
import signal
import time


def pid_alive(pid):
    """Running, and not a zombie waiting for a parent that never reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_until(condition, timeout, message, interval=0.05):
    """condition()'s first true value within timeout seconds, else fail with message."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(interval)


def stop_pid(pid, timeout=30):
    """SIGTERM one pid we started, SIGKILL it if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def private_config(top):
    """Make TOP/etc (the sysconfdir) and TOP/home (with SYSTEMTAP_DIR under
    it); return the environment that points our commands there."""
    home = os.path.join(top, "home")
    os.makedirs(os.path.join(top, "etc"))
    os.makedirs(home)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
            "SYSTEMTAP_DIR": os.path.join(home, ".systemtap"),
            "STAP_SYSCONFDIR": os.path.join(top, "etc"), "LANG": "C.UTF-8"}
