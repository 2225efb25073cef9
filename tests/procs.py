"""Processes the tests and benchmarks start, ended by pid."""

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
