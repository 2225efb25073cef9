"""Spec section 9, "many clients at once": 30 concurrent stap-client runs
against --max-threads=2 and otherwise default options are all compiled
(they wait in arrival order), none hangs, the server's memory stays bounded
and no request directory is left behind.  Past its bounds (forced tiny
here) a server replies busy, and the client retries until a slot is free
or its deadline passes.  The compile queue's order is tested directly."""

import contextlib
import os
import re
import subprocess
import threading
import time

import pytest
import shared
from hardening_helpers import (
    assert_serves,
    request_dirs,
    request_lines,
    server_tmpdir,
    stand_in_program,
)

pytestmark = pytest.mark.integration

CLIENTS = 30
THREADS = 2
WALL_LIMIT = 150  # seconds for the whole burst (the test's bound is 3 minutes)
RSS_GROWTH_LIMIT_KB = 256 << 10


def vm_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid, every=0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, vm_rss_kb(self.pid))
            except (OSError, ValueError):
                return
            time.sleep(self.every)


def test_many_clients_at_once(servers, sandbox, krel):
    box = sandbox
    tmpdir = server_tmpdir(box)
    srv = servers.start(box, krel, None, "--tmpdir", tmpdir, "--max-threads", str(THREADS))
    assert_serves(box, srv, krel)  # warm: the first compile fills stap's caches
    client_tmp = box.path("client-tmp")
    os.makedirs(client_tmp, 0o700)
    rss_before = vm_rss_kb(srv.pid)
    sampler = RssSampler(srv.pid)
    sampler.start()

    started = time.monotonic()
    procs = []
    for n in range(CLIENTS):
        # Distinct scripts: every request is a real compile, not a cache hit.
        script = f'probe begin {{ printf("client {n}\\n"); exit() }}'
        argv = [shared.PYTHON, shared.CLIENT, "stap-client", f"--server={srv.address}",
                "-r", krel, "-p2", "-e", script]
        procs.append((n, time.monotonic(), subprocess.Popen(
            argv, env={**box.env, "TMPDIR": client_tmp}, cwd=box.top,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    results = []
    for n, t0, proc in procs:
        left = max(1, WALL_LIMIT - (time.monotonic() - started))
        try:
            out, err = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            shared.stop_pid(*(p for _, _, p in procs))
            raise AssertionError(f"client {n} hung (no answer within {WALL_LIMIT} s)") from None
        results.append((n, proc.returncode, out, err, time.monotonic() - t0))
    wall = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    rss_after = vm_rss_kb(srv.pid)

    compiled = [r for r in results if r[1] == 0 and b"begin" in r[2]]
    failures = [r for r in results if r not in compiled]
    print(f"\nload: {CLIENTS} clients, --max-threads={THREADS}: {len(compiled)} compiled, "
          f"{len(failures)} failures, wall {wall:.1f} s, slowest client "
          f"{max(r[4] for r in results):.1f} s; server RSS before {rss_before} kB, "
          f"peak {sampler.peak} kB, after {rss_after} kB")
    assert not failures, "\n".join(f"client {n}: rc {rc}: {err.decode(errors='replace')}"
                                   for n, rc, out, err, _ in failures)
    assert sampler.peak - rss_before < RSS_GROWTH_LIMIT_KB
    assert not [l for l in request_lines(srv) if re.search(r"error=.busy", l)]
    shared.wait_until(lambda: not request_dirs(tmpdir), 5,
                      lambda: f"request directories left behind: {request_dirs(tmpdir)}")
    assert os.listdir(client_tmp) == [], "stap-client left temporary files"
    assert_serves(box, srv, krel)  # and the server goes on


# --------------------------------------------------------------------------
# Past the bounds: a busy reply, and a client that retries
# --------------------------------------------------------------------------

@pytest.fixture
def busy_server(servers, sandbox, krel):
    """One compile slot and no waiting at all (--max-wait 0): a second
    request while a slow one runs is told the server is busy."""
    sandbox.env["SYSTEMTAP_STAP"] = stand_in_program(sandbox, "stap_slow.sh")
    srv = servers.start(sandbox, krel, None, "--max-threads", "1", "--max-wait", "0")
    del sandbox.env["SYSTEMTAP_STAP"]
    return srv


def occupy(box, srv, krel):
    """A slow compile holding the one slot; returns its process."""
    proc = subprocess.Popen(
        [shared.PYTHON, shared.CLIENT, "stap-client", f"--server={srv.address}",
         "-r", krel, "-p2", "-e", "probe begin { /* SLOWPROBE 3 s */ exit() }"],
        env=box.env, cwd=box.top, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shared.wait_until(lambda: compile_running(srv), 10, "the slow compile never started")
    return proc


def compile_running(srv):
    """True once a thread of the server has a child (the slow compile)."""
    for task in os.listdir(f"/proc/{srv.pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{srv.pid}/task/{task}/children") as f:
            if f.read().split():
                return True
    return False


def test_busy_server_then_the_client_retries_until_served(busy_server, sandbox, krel):
    slow = occupy(sandbox, busy_server, krel)
    started = time.monotonic()
    proc = sandbox.run("stap-client", f"--server={busy_server.address}", "-v", "-r", krel,
                       "-p2", "-e", "probe begin { exit() }", timeout=60)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    assert b"begin" in proc.stdout
    assert "server busy" in err and "trying again in" in err, err
    assert time.monotonic() - started > 1  # it did wait for the slow one
    assert slow.wait(30) == 0
    busy = [l for l in request_lines(busy_server) if re.search(r"error=.busy", l)]
    assert busy, "\n".join(request_lines(busy_server))


def test_a_cached_result_is_served_while_every_slot_is_busy(busy_server, sandbox, krel):
    """A repeat request needs no compile slot: the result cache answers it even while the one
    slot is taken and --max-wait forbids waiting for it."""
    args = ["stap-client", f"--server={busy_server.address}", "--deadline=1", "-r", krel, "-p2",
            "-e", "probe begin { exit() }"]
    assert sandbox.run(*args, timeout=60).returncode == 0
    slow = occupy(sandbox, busy_server, krel)
    proc = sandbox.run(*args, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"begin" in proc.stdout
    assert slow.poll() is None, "the slow compile ended first: the slot was free"
    assert "cache='hit'" in request_lines(busy_server)[-1], request_lines(busy_server)
    assert slow.wait(30) == 0


def test_busy_reply_says_why_and_the_deadline_ends_the_retries(busy_server, sandbox, krel):
    slow = occupy(sandbox, busy_server, krel)
    proc = sandbox.run("stap-client", f"--server={busy_server.address}", "--deadline=1",
                       "-r", krel, "-p2", "-e", "probe begin { exit() }", timeout=60)
    err = proc.stderr.decode(errors="replace").strip()
    assert proc.returncode == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("stap-client: ERROR: no server could compile the script ("), err
    assert re.search(r"server busy: 0 requests wait for 1 compile slots; the expected "
                     r"wait of \d+ s is over the server's limit of 0 s", last), last
    assert slow.wait(30) == 0


def test_compile_queue_serves_in_arrival_order():
    """A freed slot goes to the first waiter, never to a newcomer."""
    import stap_server
    queue = stap_server.CompileQueue(1)
    order, threads = [], []

    def compile_one(n):
        with queue.compiling():
            order.append(n)
            time.sleep(0.01)

    first = queue.compiling()
    first.__enter__()
    for n in range(8):
        threads.append(threading.Thread(target=compile_one, args=(n,)))
        threads[-1].start()
        shared.wait_until(lambda n=n: queue.counts() == (1, n + 1), 5, "not queued")
    first.__exit__(None, None, None)
    for t in threads:
        t.join(10)
    assert order == list(range(8))
    assert queue.counts() == (0, 0)
