"""Spec section 9, "many clients at once": 50 concurrent stap-client runs
against --max-threads=2 with the default queue.  Each gets a compile or a
fast "server busy" reply, none hangs, the server's memory stays bounded
and no request directory is left behind."""

import os
import re
import subprocess
import threading
import time

import conftest
from hardening_helpers import assert_serves, request_dirs, request_lines, server_tmpdir

CLIENTS = 50
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
        script = f"probe begin {{ printf(\"client {n}\\n\"); exit() }}"
        argv = [conftest.PYTHON, conftest.CLIENT, "stap-client", f"--server={srv.address}",
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
            for _, _, p in procs:
                p.kill()
            raise AssertionError(f"client {n} hung (no answer within {WALL_LIMIT} s)")
        results.append((n, proc.returncode, out, err, time.monotonic() - t0))
    wall = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    rss_after = vm_rss_kb(srv.pid)

    compiled = [r for r in results if r[1] == 0 and b"begin" in r[2]]
    busy = [r for r in results if r[1] == 1 and b"server busy" in r[3]]
    failures = [r for r in results if r not in compiled and r not in busy]
    busy_seconds = max((r[4] for r in busy), default=0)
    print(f"\nload: {CLIENTS} clients, --max-threads={THREADS}: {len(compiled)} compiled, "
          f"{len(busy)} busy replies, {len(failures)} failures, wall {wall:.1f} s, "
          f"slowest busy reply {busy_seconds:.1f} s; server RSS before {rss_before} kB, "
          f"peak {sampler.peak} kB, after {rss_after} kB")
    assert not failures, "\n".join(f"client {n}: rc {rc}: {err.decode(errors='replace')}"
                                   for n, rc, out, err, _ in failures)
    assert len(compiled) >= THREADS  # the pool did compile
    assert len(compiled) + len(busy) == CLIENTS
    assert sampler.peak - rss_before < RSS_GROWTH_LIMIT_KB
    lines = request_lines(srv)
    busy_lines = [l for l in lines if "error='busy'" in l]
    assert len(busy_lines) == len(busy)
    # The server's side of a busy reply (handshake, read, signed reply) is fast.
    server_busy = [float(re.search(r"seconds='([\d.]+)'", l).group(1)) for l in busy_lines]
    print(f"server time per busy reply: max {max(server_busy, default=0):.3f} s")
    assert max(server_busy, default=0) < 3
    deadline = time.monotonic() + 5
    while request_dirs(tmpdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request_dirs(tmpdir) == []
    assert os.listdir(client_tmp) == [], "stap-client left temporary files"
    assert_serves(box, srv, krel)  # and the server goes on
