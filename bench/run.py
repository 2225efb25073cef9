#!/usr/bin/python3
"""Benchmarks of the stap-server utilities (SPEC section 10).

    /usr/bin/python3 bench/run.py [--quick] [--only NAME[,NAME...]] [--reps N]

Prints one table per benchmark (medians, with ratios against the peers
measured in the same run) and writes bench/results/<timestamp>.json and
bench/results/latest.json.  Needs root.  Benchmarks only measure and print:
nothing here asserts a timing.  See bench/README.md.
"""

import argparse
import contextlib
import datetime
import glob
import io
import json
import os
import platform
import pstats
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    BENCH,
    BENCH_CPU,
    CLIENT,
    COMPILE_CACHE,
    LIB,
    PY,
    ROOT,
    SCRIPTS,
    TEST_USER,
    WORK,
    CpuGroup,
    CpuWindow,
    LogTail,
    RealServer,
    Report,
    RssSampler,
    Sample,
    Series,
    as_user,
    clean_modules,
    fmt_s,
    headers_release,
    installed_command,
    interleaved,
    local_env,
    make_sandbox,
    own_children_cpu,
    prepare_work,
    progress,
    real_client_env,
    real_serverd_problem,
    result_cache_off_args,
    rss_kib,
    runtime_fixture,
    server_cpu,
    server_help,
    start_our_server,
    stop_pid,
    tail,
    timed,
    verdict,
    wait_until,
)

BENCHMARKS = ["overhead", "sandbox", "buildenv", "interop", "load", "fleet", "resultcache",
              "concurrency", "discovery", "startup", "profile", "kernels"]


# --------------------------------------------------------------------------
# The run's context: release, runtime, servers shared between benchmarks
# --------------------------------------------------------------------------

class Context:
    def __init__(self, opts, stack):
        self.opts = opts
        self.stack = stack
        self.krel = headers_release()
        if not self.krel:
            raise SystemExit("bench: no /lib/modules/*/build: no kernel headers "
                             "(apt-get install linux-headers-amd64)")
        prepare_work()
        self.rt = runtime_fixture(self.krel)
        self.top = tempfile.mkdtemp(prefix="run.", dir=WORK)
        os.chmod(self.top, 0o755)
        stack.callback(shutil.rmtree, self.top, True)
        self.cwd = os.path.join(self.top, "cwd")
        os.makedirs(self.cwd)
        self.scripts = os.path.join(self.top, "scripts")
        os.makedirs(self.scripts, 0o755)
        self.help = server_help()
        self.cache_off = result_cache_off_args(self.help)
        self.has_result_cache = self.cache_off is not None
        self.warm = {}
        self.shared = {}
        self._server_a = None
        self._server_b = None
        self.box = make_sandbox(parent=self.top)   # one certificate for every server of the run

    # --- scripts ---
    def unique_script(self, tag):
        """A script nobody compiled before: a cold compile."""
        u = uuid.uuid4().hex
        path = os.path.join(self.scripts, f"cold_{tag}_{u[:8]}.stp")
        with open(path, "w") as f:
            f.write(f'probe begin {{ printf("stap-bench cold {tag} {u}\\n"); exit() }}\n')
        os.chmod(path, 0o644)
        return path

    hit_script = os.path.join(SCRIPTS, "hit.stp")
    p2_script = os.path.join(SCRIPTS, "p2.stp")

    # --- the commands measured ---
    def local(self, p, script, timeout=600):
        argv = ["stap", "-r", self.krel] + (["-R", self.rt] if self.rt else []) + \
            [f"-p{p}", script]
        s = timed(argv, env=local_env(), cwd=self.cwd, timeout=timeout)
        clean_modules(self.cwd)
        return s

    def ours(self, srv, p, script, host=None, extra=(), timeout=900):
        argv = [PY, CLIENT, "stap-client", f"--server={srv.address}", *extra, "-r", self.krel,
                f"-p{p}", script]
        s = timed((host.prefix() if host else []) + argv, env=srv.box.env, cwd=self.cwd,
                  timeout=timeout)
        clean_modules(self.cwd)
        attach_log(srv, s)
        return s

    def real_client(self, address, p, script, host, env, timeout=900):
        argv = ["stap", f"--use-server={address}", "-r", self.krel, f"-p{p}", script]
        s = timed(host.prefix() + argv, env=env, cwd=self.cwd, timeout=timeout)
        clean_modules(self.cwd)
        return s

    # --- warm-up: the one-time kernel configuration probe, once per peer ---
    def ensure_warm(self, who, fn):
        if who in self.warm:
            return
        progress(f"warm-up: first -p4 compile for {who} (20-60 s if never done here)")
        s = fn()
        self.warm[who] = s.seconds
        if not s.ok:
            progress(f"warm-up for {who} failed: {s.error}")

    def warm_local(self):
        self.ensure_warm("local stap", lambda: self.local(4, self.unique_script("warm")))

    def warm_ours(self, srv, host=None):
        self.ensure_warm("our server's compile account",
                         lambda: self.ours(srv, 4, self.unique_script("warm"), host=host))

    # --- servers of the root namespace (127.0.0.1, not advertised) ---
    def server_a(self):
        """--max-threads 2 --queue 16, result cache off: every request runs stap."""
        if self._server_a is None:
            progress("starting our server A (result cache off, 2 threads, queue 16)")
            srv = start_our_server(self.box, self.krel, self.rt, "--max-threads", "2",
                                   "--queue", "16", *(self.cache_off or []),
                                   log=self.box.path("server-a.log"))
            self.stack.callback(srv.stop)
            srv.tail = LogTail(srv.log)
            time.sleep(1.0)
            srv.rss_start = rss_kib(srv.pid)
            self._server_a = srv
        return self._server_a

    def server_b(self):
        """Default options: the result cache (if any) on."""
        if self._server_b is None:
            progress("starting our server B (default options: result cache on)")
            srv = start_our_server(self.box, self.krel, self.rt,
                                   log=self.box.path("server-b.log"))
            self.stack.callback(srv.stop)
            srv.tail = LogTail(srv.log)
            self._server_b = srv
        return self._server_b


def attach_log(srv, sample):
    """Our server's own time and cache verdict for the request just made."""
    lines = [r for r in srv.tail.new() if "options" in r or "seconds" in r]
    if lines:
        last = lines[-1]
        with contextlib.suppress(KeyError, ValueError):
            sample.server_seconds = float(last["seconds"])
        sample.cache = last.get("cache")


def overhead_lines(report, client, local, label, ms_target=None, pct_target=None):
    if client.median is None or local.median is None:
        report.summary(f"overhead {label}: not measured")
        return
    ms = (client.median - local.median) * 1000
    pct = ms / (local.median * 1000) * 100
    target = (f"target <= {ms_target} ms: {verdict(ms, ms_target)}" if ms_target is not None
              else f"target <= {pct_target} %: {verdict(pct, pct_target)}")
    report.summary(f"overhead {label}: {ms:+.0f} ms ({pct:+.1f} %)   {target}",
                   key=f"overhead_{label}", ms=ms, percent=pct)


# --------------------------------------------------------------------------
# 1. stap-client round trip vs local stap
# --------------------------------------------------------------------------

def bench_overhead(ctx, report):
    srv = ctx.server_a()
    if not ctx.has_result_cache:
        report.note("our server has no result cache option: every request runs stap")
    else:
        report.note(f"server started with {' '.join(ctx.cache_off)} (result cache off)")
    ctx.warm_local()
    ctx.warm_ours(srv)
    n = ctx.opts.reps
    progress(f"1a: -p4 stap cache hit, {n} x 2")
    loc = Series("local stap -p4 (stap cache hit)")
    cli = Series("stap-client -> our server -p4 (hit)")
    for fn in (lambda: ctx.local(4, ctx.hit_script), lambda: ctx.ours(srv, 4, ctx.hit_script)):
        fn()   # untimed: puts the script in each stap cache
    interleaved([(loc, lambda: ctx.local(4, ctx.hit_script)),
                 (cli, lambda: ctx.ours(srv, 4, ctx.hit_script))], n)
    report.row(loc)
    report.row(cli, loc)
    if "hit" in cli.caches:
        report.note("our result cache answered some of these requests (could not turn it off)")

    nc = ctx.opts.cold_reps
    progress(f"1b: -p4 cold compile (new script each time), {nc} x 2")
    cloc = Series("local stap -p4 (cold compile)")
    ccli = Series("stap-client -> our server -p4 (cold)")
    cpu = {"local": [], "server": []}

    def with_cpu(kind, fn):
        c0, s0 = own_children_cpu(), server_cpu(srv.pid)
        sample = fn()
        cpu[kind].append(own_children_cpu() - c0 if kind == "local"
                         else server_cpu(srv.pid) - s0)
        return sample

    interleaved([(cloc, lambda: with_cpu("local",
                                         lambda: ctx.local(4, ctx.unique_script("local")))),
                 (ccli, lambda: with_cpu("server",
                                         lambda: ctx.ours(srv, 4, ctx.unique_script("client"))))],
                nc)
    report.row(cloc)
    report.row(ccli, cloc)
    overhead_lines(report, cli, loc, "cache-hit", ms_target=100)
    overhead_lines(report, ccli, cloc, "cold", pct_target=3)
    for s in (cli, ccli):
        if s.median is not None and s.server_median is not None:
            report.summary(f"{s.name}: server side {s.server_median * 1000:.0f} ms, "
                           f"client + transport {(s.median - s.server_median) * 1000:.0f} ms")
    if cpu["local"] and cpu["server"]:
        lc, sc = statistics.median(cpu["local"]), statistics.median(cpu["server"])
        report.summary(f"CPU per cold compile: local stap {lc:.2f} CPU-s, our server's stap run "
                       f"(+ server) {sc:.2f} CPU-s", key="cold_cpu", local=lc, server=sc)
    for who, secs in ctx.warm.items():
        report.note(f"warm-up compile ({who}): {secs:.1f} s")


# --------------------------------------------------------------------------
# 1c. What the sandbox costs: the same server with and without bubblewrap
# --------------------------------------------------------------------------

def bench_sandbox(ctx, report):
    """Two servers that differ only by --no-sandbox (result cache off, same
    compile account and stap cache), interleaved on the same requests."""
    servers = {}
    for label, extra in (("sandbox", []), ("no sandbox", ["--no-sandbox"])):
        progress(f"starting our server ({label}, result cache off)")
        srv = start_our_server(ctx.box, ctx.krel, ctx.rt, *(ctx.cache_off or []), *extra,
                               log=ctx.box.path(f"server-{label.replace(' ', '-')}.log"))
        ctx.stack.callback(srv.stop)
        srv.tail = LogTail(srv.log)
        servers[label] = srv
    ctx.warm_ours(servers["sandbox"])
    for srv in servers.values():
        ctx.ours(srv, 4, ctx.hit_script)  # untimed: puts the script in the stap cache
    hit = {label: Series(f"-p4 stap cache hit, {label}") for label in servers}
    cold = {label: Series(f"-p4 cold compile, {label}") for label in servers}
    progress(f"1c: -p4 hit with and without the sandbox, {ctx.opts.reps} x 2")
    interleaved([(hit[label], lambda srv=srv: ctx.ours(srv, 4, ctx.hit_script))
                 for label, srv in servers.items()], ctx.opts.reps)
    progress(f"1c: -p4 cold with and without the sandbox, {ctx.opts.cold_reps} x 2")
    interleaved([(cold[label], lambda srv=srv, label=label:
                  ctx.ours(srv, 4, ctx.unique_script(label.replace(" ", "_"))))
                 for label, srv in servers.items()], ctx.opts.cold_reps)
    for series in (hit, cold):
        report.row(series["no sandbox"])
        report.row(series["sandbox"], series["no sandbox"])
    for what, series, target in (("hit", hit, 0.030), ("cold", cold, None)):
        on, off = series["sandbox"].server_median, series["no sandbox"].server_median
        if on is None or off is None:
            report.not_measured(f"sandbox cost ({what}): no server times in the log")
            continue
        cost = on - off
        text = f"sandbox cost on a -p4 {what} (server side): {cost * 1000:+.0f} ms"
        if target is not None:
            text += f" (target < {target * 1000:.0f} ms: {verdict(cost, target)})"
        else:
            text += f" ({cost / off * 100:+.1f} % of {off:.2f} s)"
        report.summary(text, key=f"sandbox_{what}", seconds=cost)


# --------------------------------------------------------------------------
# 1d. A request compiled in a build environment (--build-env) against one on the host
# --------------------------------------------------------------------------

BUILD_ENV_TARBALLS = "/var/cache/stap-compile-server-tests/build-env-trixie-*.tar"


def build_env_root(ctx):
    """The Debian 13 root that tests/test_build_env.py caches (tools/make-build-env), unpacked into
    this run's directory; None when there is none."""
    tarballs = sorted(glob.glob(BUILD_ENV_TARBALLS), key=os.path.getmtime)
    if not tarballs:
        return None
    root = os.path.join(ctx.top, "trixie")
    os.mkdir(root, 0o755)
    subprocess.run(["tar", "-C", root, "-xf", tarballs[-1]], check=True, timeout=600)
    return root


def client_51(ctx, root, home):
    """The real systemtap 5.1 client of root, entered with bwrap (loopback, as the host's): argv
    prefix; the run's scripts appear at /tmp/run and the fixed ones at /tmp/fixed."""
    return ["bwrap", "--die-with-parent", "--ro-bind", root, "/", "--proc", "/proc", "--dev",
            "/dev", "--tmpfs", "/tmp", "--ro-bind", ctx.scripts, "/tmp/run", "--ro-bind", SCRIPTS,
            "/tmp/fixed", "--bind", home, "/root", "--chdir", "/root", "--clearenv",
            "--setenv", "HOME", "/root", "--setenv", "SYSTEMTAP_DIR", "/root/.systemtap",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "stap"]


def bench_buildenv(ctx, report):
    """One server with the Debian 13 environment beside the host (result cache off): the real 5.1
    client's requests compile in the environment, the real 4.8 client's on the host, interleaved;
    the server's own times compared (the clients differ, so end to end is shown, not compared)."""
    root = build_env_root(ctx)
    if root is None:
        report.not_measured("no Debian 13 build environment: `pytest tests/test_build_env.py` "
                            f"caches one ({BUILD_ENV_TARBALLS})")
        return
    progress("starting our server with --build-env trixie (result cache off)")
    srv = start_our_server(ctx.box, ctx.krel, ctx.rt, *(ctx.cache_off or []), "--build-env",
                           f"trixie={root}", log=ctx.box.path("server-buildenv.log"))
    ctx.stack.callback(srv.stop)
    srv.tail = LogTail(srv.log)
    env48 = real_client_env(ctx.top)
    subprocess.run(["stap", "--trust-servers=ssl,no-prompt", f"--use-server={srv.address}"],
                   env=env48, capture_output=True, timeout=60, check=True)
    home = os.path.join(ctx.top, "client-51")
    db = os.path.join(home, ".systemtap", "ssl", "client")
    os.makedirs(os.path.dirname(db), 0o755)
    subprocess.run([PY, CLIENT, "stap-add-server-cert", "--yes", srv.address, db],
                   env=srv.box.env, capture_output=True, timeout=60, check=True)
    inside = {ctx.scripts: "/tmp/run", SCRIPTS: "/tmp/fixed"}

    def run(client, script):
        script = inside[os.path.dirname(script)] + "/" + os.path.basename(script) \
            if client == "5.1" else script
        argv = (client_51(ctx, root, home) if client == "5.1" else ["stap"]) + \
            [f"--use-server={srv.address}", "-r", ctx.krel, "-p4", script]
        s = timed(argv, env=env48, cwd=home if client == "5.1" else ctx.cwd, timeout=900)
        clean_modules(home)
        clean_modules(ctx.cwd)
        attach_log(srv, s)
        return s
    for client in ("4.8", "5.1"):
        ctx.ensure_warm(f"the {client} client's build environment",
                        lambda c=client: run(c, ctx.unique_script("warm")))
        run(client, ctx.hit_script)  # untimed: puts the script in that stap's cache
    names = {"4.8": "host (stap 4.8, real 4.8 client)", "5.1": "trixie (stap 5.1, real 5.1 client)"}
    hit = {c: Series(f"-p4 stap cache hit, {names[c]}") for c in names}
    cold = {c: Series(f"-p4 cold compile, {names[c]}") for c in names}
    progress(f"1d: -p4 hit on the host and in the environment, {ctx.opts.reps} x 2")
    interleaved([(hit[c], lambda c=c: run(c, ctx.hit_script)) for c in names], ctx.opts.reps)
    progress(f"1d: -p4 cold on the host and in the environment, {ctx.opts.cold_reps} x 2")
    interleaved([(cold[c], lambda c=c: run(c, ctx.unique_script(f"env{c}")))
                 for c in names], ctx.opts.cold_reps)
    for series in (hit, cold):
        report.row(series["4.8"])
        report.row(series["5.1"], series["4.8"])
    for what, series in (("hit", hit), ("cold", cold)):
        env, host = series["5.1"].server_median, series["4.8"].server_median
        if env is None or host is None:
            report.not_measured(f"build environment cost ({what}): no server times in the log")
            continue
        report.summary(f"a -p4 {what} in the build environment (server side): {env:.3f} s vs "
                       f"{host:.3f} s on the host ({(env - host) * 1000:+.0f} ms)",
                       key=f"buildenv_{what}", seconds=env - host)


# --------------------------------------------------------------------------
# 2. Our server and client vs the real stap-serverd 4.8 and stap --use-server
# --------------------------------------------------------------------------

@contextlib.contextmanager
def real_and_ours(ctx, report, real_extra=(), ours_extra=(), log="server-ns.log"):
    """In one network namespace: the real stap-serverd (as nobody) and our
    server, both trusted by the real client.  Yields (host, real, ours,
    the real client's environment, its client database), or None after
    noting why the real server cannot run."""
    import netns
    problem = real_serverd_problem() or netns.skip_reason()
    if problem:
        report.not_measured(f"real stap-serverd: {problem}")
        yield None
        return
    with netns.TestNetwork(single=True) as net:
        host = net.hosts[0]
        real = RealServer(host, ctx.krel, ctx.rt, extra=real_extra)
        try:
            progress("starting the real stap-serverd as nobody in a network namespace")
            real.start()
        except Exception as e:
            report.not_measured(f"real stap-serverd could not be run: {e}")
            yield None
            return
        try:
            progress("starting our server in the same namespace")
            ours = start_our_server(ctx.box, ctx.krel, ctx.rt, *ours_extra,
                                    log=ctx.box.path(log), host=host)
            try:
                ours.tail = LogTail(ours.log)
                renv = real_client_env(ctx.top)
                for srv in (real, ours):
                    proc = host.run(["stap", "--trust-servers=ssl,no-prompt",
                                     f"--use-server={srv.address}"], env=renv, timeout=60)
                    if proc.returncode != 0:
                        report.note(f"real client could not trust {srv.address}: "
                                    f"{tail(proc.stderr)}")
                yield host, real, ours, renv, os.path.join(renv["SYSTEMTAP_DIR"], "ssl", "client")
            finally:
                ours.stop()
        finally:
            real.stop()


def bench_interop(ctx, report):
    with real_and_ours(ctx, report, ours_extra=ctx.cache_off or []) as peers:
        if peers:
            report.note(f"real stap-serverd listening {peers[1].ready_seconds:.2f} s after "
                        "launch")
            ctx.shared["real_ready"] = peers[1].ready_seconds
            run_interop(ctx, report, *peers)
            ctx.shared["real_rss_kib"] = rss_kib(peers[1].pid)
            ctx.shared["real_hwm_kib"] = rss_kib(peers[1].pid, "VmHWM")


def run_interop(ctx, report, host, real, ours, renv, ssl_db):
    R = lambda addr, p, s: ctx.real_client(addr, p, s, host, renv)  # noqa: E731

    ctx.warm_local()
    ctx.warm_ours(ours, host)
    ctx.ensure_warm("real stap-serverd", lambda: R(real.address, 4, ctx.unique_script("warmr")))
    n = ctx.opts.reps
    combos = {}
    for p, script, label in ((4, ctx.hit_script, "-p4 hit"), (2, ctx.p2_script, "-p2")):
        progress(f"2: {label}, {n} x 5 peers")
        cases = [
            (Series(f"real client -> real server {label}"),
             lambda p=p, s=script: R(real.address, p, s)),
            (Series(f"our client -> our server {label}"),
             lambda p=p, s=script: ctx.ours(ours, p, s, host=host)),
            (Series(f"real client -> our server {label}"),
             lambda p=p, s=script: attach(ours, R(ours.address, p, s))),
            (Series(f"our client -> real server {label}"),
             lambda p=p, s=script: ctx.ours(_Addr(real.address, ours.box), p, s, host=host,
                                            extra=[f"--ssl={ssl_db}"])),
            (Series(f"local stap {label}"), lambda p=p, s=script: ctx.local(p, s)),
        ]
        for _, fn in cases:
            fn()   # untimed: stap caches, page cache
        interleaved(cases, n)
        theirs, mine, rc_ours, oc_real, loc = [c[0] for c in cases]
        report.row(loc)
        report.row(theirs, loc)
        report.row(mine, theirs)
        report.row(rc_ours, theirs)
        report.row(oc_real, theirs)
        combos[label] = (theirs, mine, rc_ours, oc_real)
    for label, (theirs, mine, rc_ours, oc_real) in combos.items():
        r = mine.median / theirs.median if mine.median and theirs.median else None
        report.summary(f"{label}: ours/theirs end to end {fmt_r(r)}   target <= 1.00: "
                       f"{verdict(r, 1.0)}", key=f"ours_vs_theirs_{label}", ratio=r)
        if rc_ours.median and theirs.median:
            report.summary(f"{label}: server only (same real client) ours/theirs "
                           f"{fmt_r(rc_ours.median / theirs.median)}; client only (same real "
                           f"server) ours/theirs "
                           f"{fmt_r(oc_real.median / theirs.median if oc_real.median else None)}")


# --------------------------------------------------------------------------
# 2b. Many clients at once against two compile slots, every pairing
# --------------------------------------------------------------------------

LOAD_SIZES = (30, 100)


def bench_load(ctx, report):
    """30 and 100 concurrent distinct -p2 requests against --max-threads 2,
    the real 4.8 client and server in all four pairings, in one namespace."""
    with real_and_ours(ctx, report, real_extra=["--max-threads=2"],
                       ours_extra=["--max-threads", "2"], log="server-load.log") as peers:
        if peers:
            run_load(ctx, report, *peers)


def run_load(ctx, report, host, real, ours, renv, ssl_db):
    real_cmd = lambda addr, script: host.prefix() + [  # noqa: E731
        "stap", f"--use-server={addr}", "-r", ctx.krel, "-p2", script]
    our_cmd = lambda addr, script, *extra: host.prefix() + [  # noqa: E731
        PY, CLIENT, "stap-client", f"--server={addr}", *extra, "-r", ctx.krel, "-p2", script]
    pairings = [
        ("real client -> real server", lambda s: real_cmd(real.address, s), renv),
        ("our client -> real server",
         lambda s: our_cmd(real.address, s, f"--ssl={ssl_db}"), ours.box.env),
        ("our client -> our server", lambda s: our_cmd(ours.address, s), ours.box.env),
        ("real client -> our server", lambda s: real_cmd(ours.address, s), renv)]
    for n in LOAD_SIZES:
        walls = {}
        for label, command, env in pairings:
            progress(f"2b: {n} concurrent clients, {label}")
            scripts = [ctx.unique_script(f"load{n}") for _ in range(n)]
            with RssSampler(ours.pid) as rss:
                served, busy, failed, wall = burst([command(s) for s in scripts], env, ctx.cwd)
            walls[label] = wall
            ratio = wall / walls["real client -> real server"]
            peak = f"; our server's peak RSS {rss.peak / 1024:.0f} MiB" \
                if "our server" in label and rss.peak else ""
            report.summary(f"{n} clients, {label}: {served} served, {busy} busy, "
                           f"{failed} other failures, wall {wall:.1f} s ({fmt_r(ratio)} of the "
                           f"real pairing){peak}", key=f"load_{n}_{label}", served=served,
                           busy=busy, failed=failed, wall=wall, ratio=ratio,
                           rss_kib=rss.peak if "our server" in label else None)
        for label in ("our client -> our server", "real client -> our server"):
            r = walls[label] / walls["real client -> real server"]
            report.summary(f"{n} clients, {label}: wall no worse than the real pairing: "
                           f"{verdict(r, 1.0)}")


def burst(argvs, env, cwd, timeout=900, errors=None):
    """Start every command at once; (served, busy, other failures, wall s).
    errors: a list to which the last lines of each other failure are added."""
    started = time.perf_counter()
    procs = [subprocess.Popen(a, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]
    served = busy = failed = 0
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            stop_pid(proc, timeout=0)
            out, err = proc.communicate()
        if proc.returncode == 0 and b"begin" in out:
            served += 1
        elif b"server busy" in err or b"busy" in err.lower():
            busy += 1
        else:
            failed += 1
            if errors is not None:
                errors.append(f"exit {proc.returncode}: {tail(err)}")
    return served, busy, failed, time.perf_counter() - started


# --------------------------------------------------------------------------
# 2c. A fleet: the same burst spread over 1, 2 and 3 servers by discovery
# --------------------------------------------------------------------------

FLEET_CLIENTS = 60
FLEET_SIZES = (1, 2, 3)
FLEET_TARGETS = {2: 1.8, 3: 2.5}   # throughput against one server (issue 11)


def bench_fleet(ctx, report):
    """60 distinct -p2 clients on a client host, no --server: discovery
    (built-in multicast DNS over one bridged link) and the clients' ranking
    spread them over 1, 2 or 3 servers of --max-threads 1, each on a host
    (network namespace) of its own.  Throughput and scaling against one
    server (the median of some rounds, the sizes rotated from round to
    round), and the ceiling this machine's CPUs put on that scaling."""
    import netns
    problem = netns.skip_reason()
    if problem:
        report.not_measured(problem)
        return
    rounds = ctx.opts.fleet_rounds
    runs = {count: [] for count in FLEET_SIZES}
    for r in range(rounds):
        k = r % len(FLEET_SIZES)
        for count in FLEET_SIZES[k:] + FLEET_SIZES[:k]:
            runs[count].append(fleet_burst(ctx, report, netns, count, r))
    cpus = os.cpu_count()
    med = {count: sorted(runs[count], key=lambda run: run["wall"])[(rounds - 1) // 2]
           for count in FLEET_SIZES}
    rate1 = med[1]["rate"]
    for count in FLEET_SIZES:
        run = med[count]
        scale = run["rate"] / rate1 if rate1 else None
        target = FLEET_TARGETS.get(count)
        report.summary(
            f"{count} server(s): {run['served']} served, {run['busy']} busy, {run['failed']} "
            f"failed, wall {run['wall']:.1f} s, {run['rate']:.2f} requests/s, "
            f"{fmt_r(scale)} one server"
            + (f" (target >= {target}x: {'met' if scale and scale >= target else 'MISSED'})"
               if target else "") + f"; requests per server {run['shares']}",
            key=f"fleet_{count}", served=run["served"], busy=run["busy"],
            failed=run["failed"], wall=run["wall"], rate=run["rate"], scale=scale,
            shares=run["shares"], rounds=runs[count])
        ours = (f"ours {run['own']:.1f} CPU-s (servers and compiles {run['servers']:.1f}, "
                f"clients {run['clients']:.1f})" if run["own"] is not None
                else f"clients {run['clients']:.1f} CPU-s, servers not measured")
        other = f"; other processes {run['other']:.1f}" if run["other"] is not None else ""
        walls = ", ".join(f"{x['wall']:.1f}" for x in runs[count])
        report.summary(
            f"  {count} server(s), CPU: machine busy {run['machine']:.1f} of "
            f"{run['wall'] * cpus:.1f} CPU-s; {ours}{other}"
            + (f"; walls of {rounds} rounds: {walls} s" if rounds > 1 else ""))
    # The same work (our CPU-seconds for the 60 requests) cannot take less
    # than work / CPUs seconds here, however many servers share it.
    own1 = statistics.median(x["own"] for x in runs[1]) if med[1]["own"] is not None else None
    if own1:
        floor = own1 / cpus
        ceiling = med[1]["wall"] / floor
        measured = " and ".join(fmt_r(med[n]["rate"] / rate1 if rate1 else None)
                                for n in FLEET_SIZES[1:])
        report.summary(
            f"CPU ceiling on this machine: {FLEET_CLIENTS} requests take {own1:.1f} CPU-s of "
            f"servers, compiles and clients, so at least {floor:.1f} s on {cpus} CPUs: at most "
            f"{ceiling:.2f}x one server's throughput however many servers share them ("
            + ", ".join(f"{n} servers: at most {min(n, ceiling):.2f}x" for n in FLEET_SIZES[1:])
            + f"); measured {measured}",
            key="fleet_ceiling", cpu_seconds=own1, floor=floor, ceiling=ceiling)
    else:
        report.summary("CPU ceiling: not measured (no cgroup to count the compiles' CPU in)",
                       key="fleet_ceiling", ceiling=None)
    report.note(f"this machine has {cpus} cores: compiles are CPU-bound, so more "
                "servers than cores on one machine cannot scale further")


def fleet_burst(ctx, report, netns, count, round_no):
    """One burst of FLEET_CLIENTS over count servers on a fresh network:
    hosts A.. serve, the last host runs the clients."""
    with netns.TestNetwork(hosts=count + 1) as net, CpuGroup("stap-bench-fleet") as group:
        *server_hosts, client_host = net.hosts
        servers = []
        try:
            for n, host in enumerate(server_hosts):
                servers.append(start_our_server(
                    ctx.box, ctx.krel, ctx.rt, "--max-threads", "1", host=host,
                    log=ctx.box.path(f"fleet-{count}-{round_no}-{n}.log"), listen="::",
                    advertise="mdns"))
                group.add(servers[-1].pid)
            progress(f"2c: {FLEET_CLIENTS} clients on {client_host.hostname} over {count} "
                     f"server(s) on {', '.join(h.hostname for h in server_hosts)}"
                     f" (round {round_no + 1})")
            wait_advertised(ctx, client_host, servers)
            argv = client_host.prefix() + [PY, CLIENT, "stap-client", "-r", ctx.krel, "-p2"]
            # untimed: one compile by discovery (page cache, the path end to end)
            if not burst([argv + [ctx.unique_script(f"fleetwarm{count}")]], ctx.box.env,
                         ctx.cwd)[0]:
                report.note(f"{count} server(s), round {round_no + 1}: the untimed first "
                            "compile failed")
            marks = [os.path.getsize(srv.log) for srv in servers]
            scripts = [ctx.unique_script(f"fleet{count}") for _ in range(FLEET_CLIENTS)]
            g0 = group.seconds()
            errors = []
            with CpuWindow(None) as cpu:
                served, busy, failed, wall = burst([argv + [s] for s in scripts],
                                                   ctx.box.env, ctx.cwd, errors=errors)
            g1 = group.seconds()
            for error in sorted(set(errors))[:3]:
                report.note(f"{count} server(s), round {round_no + 1}: a client failed: "
                            f"{error[:300]}")
            shares = [requests_since(srv.log, mark) for srv, mark in zip(servers, marks)]
        finally:
            for srv in servers:
                srv.stop()
    own = g1 - g0 + cpu.clients if group.available else None
    return {"served": served, "busy": busy, "failed": failed, "wall": wall,
            "rate": served / wall, "shares": shares, "clients": cpu.clients,
            "servers": g1 - g0 if group.available else None, "own": own,
            "machine": cpu.machine, "other": cpu.machine - own if own is not None else None}


def requests_since(log, offset):
    """Request lines a server logged after offset bytes of its log."""
    with open(log, errors="replace") as f:
        f.seek(offset)
        return sum(1 for line in f if " request client=" in line)


def wait_advertised(ctx, host, servers, timeout=15):
    """Until stap-find-servers on host lists every server at its own host's address."""
    def all_found():
        out = host.run([PY, CLIENT, "stap-find-servers", "--all"], env=ctx.box.env).stdout
        return all(f" {srv.host.address} {srv.port} " in out for srv in servers)

    wait_until(all_found, timeout, "not every server was advertised", interval=0.3,
               error=RuntimeError)


class _Addr:
    """A server address with no log (the real server) for ctx.ours()."""

    def __init__(self, address, box):
        self.address, self.box = address, box
        self.tail = LogTail("/nonexistent")


def attach(srv, sample):
    attach_log(srv, sample)
    return sample


def fmt_r(r):
    return "-" if r is None else f"{r:.2f}x"


# --------------------------------------------------------------------------
# 3. The result cache: identical repeated requests
# --------------------------------------------------------------------------

def bench_resultcache(ctx, report):
    if not ctx.has_result_cache:
        report.not_measured("our server has no result cache (not available)")
        return
    srv = ctx.server_b()
    ctx.warm_local()
    n = ctx.opts.reps
    for p, script in ((4, ctx.hit_script), (2, ctx.p2_script)):
        ctx.ours(srv, p, script)      # a miss that fills the cache
        probe = ctx.ours(srv, p, script)
        if probe.cache != "hit":
            report.note(f"-p{p}: repeat request not answered from the result cache "
                        f"(log says cache={probe.cache!r}); rows below are not cache hits")
    progress(f"3: identical repeated requests, {n} x 4")
    hit4 = Series("stap-client -p4, result cache hit")
    hit2 = Series("stap-client -p2, result cache hit")
    loc4 = Series("local stap -p4 (stap cache hit)")
    loc2 = Series("local stap -p2")
    ctx.local(4, ctx.hit_script)
    ctx.local(2, ctx.p2_script)
    interleaved([(hit4, lambda: ctx.ours(srv, 4, ctx.hit_script)),
                 (loc4, lambda: ctx.local(4, ctx.hit_script)),
                 (hit2, lambda: ctx.ours(srv, 2, ctx.p2_script)),
                 (loc2, lambda: ctx.local(2, ctx.p2_script))], n)
    report.row(loc4)
    report.row(hit4, loc4)
    report.row(loc2)
    report.row(hit2, loc2)
    for s in (hit4, hit2):
        ms = s.median * 1000 if s.median is not None else None
        report.summary(f"{s.name}: {fmt_s(s.median)} s end to end   target <= 150 ms: "
                       f"{verdict(ms, 150)}", key=s.name, ms=ms)
        if s.median is not None and s.server_median is not None:
            report.summary(f"  of which server {s.server_median * 1000:.0f} ms, client + "
                           f"transport {(s.median - s.server_median) * 1000:.0f} ms")


# --------------------------------------------------------------------------
# 4. 16 concurrent distinct compiles; server memory
# --------------------------------------------------------------------------

def bench_concurrency(ctx, report):
    srv = ctx.server_a()
    ctx.warm_ours(srv)
    jobs = ctx.opts.jobs
    ns = ctx.opts.single_reps
    progress(f"4: {ns} single cold compiles, then {jobs} at once (--max-threads 2)")
    single = report.row(Series("one cold -p4 compile via stap-client"))
    with CpuWindow(srv.pid) as cpu1:
        for _ in range(ns):
            single.add(ctx.ours(srv, 4, ctx.unique_script("single")))
    scripts = [ctx.unique_script(f"conc{i}") for i in range(jobs)]
    results = [None] * jobs
    srv.tail.new()

    def one(i):
        argv = [PY, CLIENT, "stap-client", f"--server={srv.address}", "-r", ctx.krel, "-p4",
                scripts[i]]
        results[i] = timed(argv, env=srv.box.env, cwd=ctx.cwd, timeout=900)

    rest_before = rss_kib(srv.pid)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(jobs)]
    with RssSampler(srv.pid) as sampler, CpuWindow(srv.pid) as cpu:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    clean_modules(ctx.cwd)
    each = report.row(Series(f"each of {jobs} concurrent compiles (own time)"))
    for s in results:
        each.add(s)
    total = Series(f"all {jobs} concurrent compiles (wall)")
    total.add(Sample(wall, all(s.ok for s in results)))
    failed = [s for s in results if not s.ok]
    busy = sum(1 for s in failed if hasattr(s, "proc") and b"busy" in s.proc.stderr)
    ideal = jobs * single.median / 2 if single.median else None
    ideal_s = Series(f"ideal: {jobs} x single / 2 workers")
    if ideal:
        ideal_s.add(Sample(ideal, True))
    report.row(ideal_s)
    report.row(total, ideal_s)
    r = wall / ideal if ideal else None
    report.summary(f"{jobs - len(failed)}/{jobs} succeeded ({busy} busy replies)   "
                   f"target: all succeed: {'met' if not failed else 'MISSED'}",
                   key="concurrency_ok", ok=jobs - len(failed), failed=len(failed), busy=busy)
    report.summary(f"wall {wall:.1f} s vs ideal {fmt_s(ideal)} s: {fmt_r(r)}   "
                   f"target <= 1.20x: {verdict(r, 1.2)}", key="concurrency_ratio", ratio=r,
                   wall=wall, ideal=ideal)
    per = cpu1.server / ns if cpu1.server is not None else None
    if per:
        floor = jobs * per / os.cpu_count()
        report.summary(f"one compile uses {per:.1f} CPU-s of server+stap for {single.median:.1f} s "
                       f"wall (parallelism {per / single.median:.2f}); CPU floor for {jobs}: "
                       f"{jobs} x {per:.1f} / {os.cpu_count()} CPUs = {floor:.1f} s; wall/floor "
                       f"{fmt_r(wall / floor)}", key="cpu_floor", cpu_per_compile=per,
                       floor=floor)
    if cpu.server is not None:
        alone = (cpu.server + cpu.clients) / os.cpu_count()
        report.summary(f"burst on an otherwise idle machine would take about {alone:.1f} s "
                       f"(server+compiles+clients CPU / {os.cpu_count()} CPUs): "
                       f"{fmt_r(alone / ideal if ideal else None)} of ideal",
                       key="burst_alone", seconds=alone)
    report.summary(f"singles: {cpu1.text()}", **cpu1.to_json())
    report.summary(f"burst: {cpu.text()}", key="burst_cpu", **cpu.to_json())
    time.sleep(1.0)
    rest_after = rss_kib(srv.pid)
    mem = {"rss_at_rest_after_start_kib": getattr(srv, "rss_start", None),
           "rss_before_load_kib": rest_before,
           "rss_peak_under_load_kib": sampler.peak,
           "vmhwm_kib": rss_kib(srv.pid, "VmHWM"),
           "rss_at_rest_after_load_kib": rest_after,
           "real_serverd_rss_kib": ctx.shared.get("real_rss_kib"),
           "real_serverd_vmhwm_kib": ctx.shared.get("real_hwm_kib")}
    report.extra["memory"] = mem
    report.summary("server RSS (VmRSS of the stap-serverd process): " + ", ".join(
        f"{k.replace('_kib', '')} {v / 1024:.1f} MiB" for k, v in mem.items() if v))


# --------------------------------------------------------------------------
# 5. Discovery latency (network namespaces only) and start-up time
# --------------------------------------------------------------------------

def bench_discovery(ctx, report):
    import netns
    problem = netns.skip_reason()
    if problem:
        report.not_measured(problem)
        return
    n = ctx.opts.find_reps
    for avahi in (True, False):
        label = "avahi" if avahi else "no avahi (mDNS fallback)"
        if avahi and netns.avahi_skip_reason():
            report.note(f"{label}: not measured: {netns.avahi_skip_reason()}")
            continue
        progress(f"5: stap-find-servers, {label}")
        try:
            with netns.TestNetwork(avahi=avahi) as net:
                discovery_on(ctx, report, net, avahi, label, n)
        except Exception as e:
            report.note(f"{label}: not measured: {e}")


def discovery_on(ctx, report, net, avahi, label, n):
    a, b = net.hosts
    box = make_sandbox(parent=ctx.top)
    srv = start_our_server(box, ctx.krel, ctx.rt, host=a, listen="::", advertise="auto",
                           log=box.path("server.log"))
    try:
        started = time.perf_counter()
        mine = re.compile(rf"^\S+ (\S+) {srv.port} ", re.M)
        find = [*b.prefix(), PY, CLIENT, "stap-find-servers", "--all"]
        addresses = set()

        def run_find():
            s = timed(find, env=box.env, timeout=30,
                      ok=lambda p: mine.search(p.stdout.decode(errors="replace")))
            if s.ok:
                addresses.update(mine.findall(s.proc.stdout.decode(errors="replace")))
            return s

        first = None
        while time.perf_counter() - started < 20:
            s = run_find()
            if s.ok:
                first = time.perf_counter() - started
                break
            time.sleep(0.1)
        with open(srv.log, errors="replace") as f:
            how = re.findall(r"advertised as .*? through (\S+)|not advertised: .*", f.read())
        report.note(f"{label}: server says advertised through {how[-1] if how else '?'}; "
                    f"first found {fmt_s(first)} s after stap-start-server returned")
        series = report.row(Series(f"stap-find-servers --all, {label}"))
        for _ in range(n):
            series.add(run_find())
        if addresses - {a.address}:
            report.note(f"{label}: stap-find-servers reported the server at "
                        f"{', '.join(sorted(addresses))} (host A is {a.address})")
        if avahi:
            real = report.row(Series(f"real stap --list-servers=online, {label}"))
            rl = [*b.prefix(), "stap", "--list-servers=online"]
            renv = real_client_env(box.top)
            for _ in range(n):
                real.add(timed(rl, env=renv, timeout=30,
                               ok=lambda p: f"port={srv.port}".encode() in p.stdout + p.stderr))
            report.rows[-1] = (real, None)
            report.rows[-2] = (series, real)
        med = series.median
        report.summary(f"stap-find-servers ({label}): {fmt_s(med)} s   target about 1 s: "
                       f"{verdict(med, 1.2)}", key=f"find_{'avahi' if avahi else 'mdns'}",
                       seconds=med, first_found=first)
    finally:
        srv.stop()


def bench_startup(ctx, report):
    n = ctx.opts.start_reps
    box = make_sandbox(parent=ctx.top)
    progress(f"5: stap-start-server, first start then {n} more")

    def start_stop():
        t = time.perf_counter()
        try:
            srv = start_our_server(box, ctx.krel, ctx.rt, log=box.path("start.log"))
        except RuntimeError as e:
            return Sample(time.perf_counter() - t, False, str(e))
        srv.stop()
        return Sample(srv.start_seconds, True)

    first = report.row(Series("stap-start-server, first (key generation)"))
    first.add(start_stop())
    later = report.row(Series("stap-start-server, existing certificate"))
    for _ in range(n):
        later.add(start_stop())
    report.summary(f"later start: {fmt_s(later.median)} s to the pid   target <= 0.5 s: "
                   f"{verdict(later.median, 0.5)}", key="start_later", seconds=later.median)
    if "real_ready" in ctx.shared:
        report.note(f"real stap-serverd (existing certificate) listened "
                    f"{ctx.shared['real_ready']:.2f} s after launch (no pid-printing wrapper)")


# --------------------------------------------------------------------------
# Where the time of one stap-client round trip goes
# --------------------------------------------------------------------------

def bench_profile(ctx, report):
    srv = ctx.server_b() if ctx.has_result_cache else ctx.server_a()
    n = ctx.opts.reps
    progress("profile: interpreter, imports, one -p2 round trip")
    sys_path = f"import sys; sys.path.insert(0, {LIB!r}); "
    cases = [
        (Series("python3 -c pass"), lambda: timed([PY, "-c", "pass"])),
        (Series("python3 -S -c pass (no site)"), lambda: timed([PY, "-S", "-c", "pass"])),
        (Series("import stap_client"),
         lambda: timed([PY, "-c", sys_path + "import stap_client"])),
        (Series("import stap_client + nss"),
         lambda: timed([PY, "-c", sys_path + "import stap_client; stap_client.nss_modules()"])),
        (Series("stap-client --help"),
         lambda: timed([PY, installed_command("stap-client"), "--help"], ok=lambda p: True)),
        (Series("stap-client -p2 round trip"), lambda: ctx.ours(srv, 2, ctx.p2_script)),
    ]
    cases[-1][1]()
    interleaved(cases, n)
    base = cases[0][0]
    for s, _ in cases:
        report.row(s, base if s is not base else None)

    # -X importtime: the slowest imports
    proc = subprocess.run([PY, "-X", "importtime", CLIENT, "stap-client",
                           f"--server={srv.address}", "-r", ctx.krel, "-p2", ctx.p2_script],
                          env=srv.box.env, cwd=ctx.cwd, capture_output=True, text=True,
                          timeout=120)
    imports = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            imports.append((int(m.group(2)), int(m.group(1)), len(m.group(3)), m.group(4)))
    top = [i for i in imports if i[2] <= 2]
    top.sort(reverse=True)
    total_us = sum(i[0] for i in imports if i[2] == 1)
    report.summary(f"imports (python3 -X importtime): {total_us / 1000:.0f} ms in all; "
                   "slowest top-level (cumulative ms): " + ", ".join(
                       f"{name} {cum / 1000:.1f}" for cum, _, _, name in top[:8]),
                   key="imports", total_ms=total_us / 1000,
                   top=[(name, cum / 1000) for cum, _, _, name in top[:15]])

    # cProfile of one round trip
    prof = os.path.join(ctx.top, "client.prof")
    subprocess.run([PY, "-m", "cProfile", "-o", prof, CLIENT, "stap-client",
                    f"--server={srv.address}", "-r", ctx.krel, "-p2", ctx.p2_script],
                   env=srv.box.env, cwd=ctx.cwd, capture_output=True, timeout=120)
    if os.path.exists(prof):
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        funcs = []
        for (fname, line, func), (_cc, _nc, tt, ct, _callers) in st.stats.items():
            funcs.append((ct, tt, f"{os.path.basename(fname)}:{line}({func})"))
        funcs.sort(reverse=True)
        mine = [f for f in funcs if "stap_client.py" in f[2]][:12]
        report.summary("cProfile, stap_client.py functions by cumulative ms: " + "; ".join(
            f"{name} {ct * 1000:.0f}" for ct, _, name in mine), key="cprofile_cumulative",
            top=[(name, ct * 1000, tt * 1000) for ct, tt, name in mine])
        bytt = sorted(funcs, key=lambda f: f[1], reverse=True)[:10]
        report.summary("cProfile, most own time (ms): " + "; ".join(
            f"{name} {tt * 1000:.0f}" for _, tt, name in bytt), key="cprofile_tottime",
            top=[(name, tt * 1000) for _, tt, name in bytt])

    # The server's phases, in-process (no TLS), for a -p4 stap-cache hit and a -p2
    for p, script in ((4, ctx.hit_script), (2, ctx.p2_script)):
        proc = subprocess.run([PY, os.path.join(BENCH, "server_phases.py"), ctx.krel,
                               "", script, str(p), str(n), "--",
                               "--cache-dir", COMPILE_CACHE, *(ctx.cache_off or [])],
                              env=srv.box.env, capture_output=True, text=True, timeout=300)
        try:
            phases = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            report.note(f"server phases -p{p}: failed: {tail(proc.stderr)}")
            continue
        report.summary(f"server phases, -p{p} stap run (in-process CompileService.handle, "
                       "median ms): "
                       + "; ".join(f"{k.strip()} {v:.1f}" for k, v in phases.items()
                                   if isinstance(v, float)),
                       key=f"server_phases_p{p}", **phases)
    loc = Series("local stap -p4 (stap cache hit), same moment")
    for _ in range(n):
        loc.add(ctx.local(4, ctx.hit_script))
    report.row(loc)

    # The server's signing step, measured alone
    db = os.path.join(srv.box.env["STAP_SYSCONFDIR"], "systemtap", "ssl", "server")
    if shutil.which("signtool") and os.path.isdir(db):
        sign = Series("signtool -Z (sign a small reply)")
        verify = Series("signtool -v (verify it)")
        for i in range(n):
            d = os.path.join(ctx.top, f"sign{i}")
            os.makedirs(os.path.join(d, "stap000000"))
            for name in ("rc", "stdout", "stderr", "version"):
                with open(os.path.join(d, name), "w") as f:
                    f.write("0")
            jar = os.path.join(ctx.top, f"sign{i}.jar")
            sign.add(timed(["signtool", "-d", f"sql:{db}", "-k", "stap-server", "-Z", jar, d]))
            verify.add(timed(["signtool", "-d", f"sql:{db}", "-v", jar]))
        report.row(sign)
        report.row(verify)


# --------------------------------------------------------------------------
# 7. Kernels fetched on demand (issue 21) against installing the headers
# --------------------------------------------------------------------------

# Releases the archive offers and the host normally lacks; tests/test_fetch_kernels.py takes the
# -50 ones first, so this bench starts with -53 to stay out of their way.
KERNEL_CANDIDATES = ("6.1.0-53-amd64", "6.1.0-53-cloud-amd64", "6.1.0-50-amd64",
                     "6.1.0-50-cloud-amd64")
APT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "DEBIAN_FRONTEND": "noninteractive"}


def installed_packages():
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n"],
                          capture_output=True, text=True, check=True)
    return {line.split()[0] for line in proc.stdout.splitlines() if line.split()[1:2] == ["ii"]}


def fetchable_release():
    """(release, None) for a release the archive has whose headers were never installed here, or
    (None, why not)."""
    installed = installed_packages()
    for rel in KERNEL_CANDIDATES:
        if f"linux-headers-{rel}" in installed or os.path.exists(f"/lib/modules/{rel}"):
            continue
        show = subprocess.run(["apt-cache", "show", "--no-all-versions", f"linux-headers-{rel}"],
                              capture_output=True, text=True)
        if show.returncode == 0 and "Filename:" in show.stdout:
            return rel, None
    return None, (f"each of {', '.join(KERNEL_CANDIDATES)} is installed or not in the archive "
                  "(apt-get update); this bench installs and purges one, never one installed "
                  "before")


def disk_bytes(top):
    """Bytes of the blocks under top (as du counts them), links not followed."""
    total = 0
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def user_owned_dir(box, name):
    path = box.path(name)
    os.makedirs(path, 0o755)
    pw = pwd.getpwnam(box.user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def install_and_compile(ctx, rel, script):
    """What a user does instead: apt-get install the headers (an empty archive cache), then a local
    stap -p4 (a new stap cache); the headers are purged again.  (install, compile) Samples; the
    runtime fix stap 4.8 needs for rel's headers is made between the two, untimed."""
    before = installed_packages()
    archives = tempfile.mkdtemp(prefix="archives.", dir=ctx.top)
    os.makedirs(os.path.join(archives, "partial"))
    install = timed(["apt-get", "install", "-y", "-q", "-o", f"Dir::Cache::Archives={archives}",
                     "-o", "DPkg::Lock::Timeout=300", f"linux-headers-{rel}"], env=APT_ENV,
                    timeout=900)
    compile_ = Sample(0.0, False, "not run: the install failed")
    try:
        if install.ok:
            rt = runtime_fixture(rel)
            home = tempfile.mkdtemp(prefix="user-home.", dir=ctx.top)
            env = {**local_env(), "HOME": home, "SYSTEMTAP_DIR": os.path.join(home, ".systemtap")}
            compile_ = timed(["stap", "-r", rel, *(["-R", rt] if rt else []), "-p4", script],
                             env=env, cwd=ctx.cwd, timeout=900)
            clean_modules(ctx.cwd)
    finally:
        added = sorted(installed_packages() - before)
        if added:
            subprocess.run(["apt-get", "purge", "-y", "-q", "-o", "DPkg::Lock::Timeout=300",
                            *added], env=APT_ENV, capture_output=True, timeout=900)
        shutil.rmtree(archives, ignore_errors=True)
    left = sorted(set(added) & installed_packages())
    if left:
        raise RuntimeError(f"apt-get purge left {', '.join(left)} installed")
    return install, compile_


def fetching_client(srv, rel, script, timeout=900):
    """stap-client -r rel -p4 script, as the server's account (whose client trusts it)."""
    argv = [*as_user(srv.box), PY, CLIENT, "stap-client", f"--server={srv.address}", "-r", rel,
            "-p4", script]
    s = timed(argv, env=srv.box.env, cwd=srv.box.top, timeout=timeout)
    clean_modules(srv.box.top)
    attach_log(srv, s)
    return s


def start_fetching_server(ctx, box, n):
    """Our server as box's account with --fetch-kernels, a new kernel cache (so a new download
    cache) and a new compile cache; result cache off."""
    kernels = user_owned_dir(box, f"kernels-{n}")
    compiles = user_owned_dir(box, f"compile-cache-{n}")
    srv = start_our_server(box, ctx.krel, None, "--fetch-kernels", "--kernel-cache", kernels,
                           *(ctx.cache_off or []), cache_dir=compiles,
                           log=box.path(f"server-kernels-{n}.log"))
    ctx.stack.callback(srv.stop)
    srv.tail = LogTail(srv.log)
    srv.kernels = kernels
    return srv


LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?"
FETCHED = re.compile(LOG_TIME + r"kernel cache: fetched (\S+) \(.*?; (\d+) bytes downloaded, "
                     r"(\d+) unpacked\) in ([\d.]+) s", re.M)
KNOWN = re.compile(LOG_TIME + r"stap knowledge for (\S+) \S+ ready in ([\d.]+) s", re.M)
REPLIED = re.compile(LOG_TIME + r" request .*?release='([^']+)'", re.M)


def log_time(stamp):
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def where_the_time_went(srv, rel):
    """From the server's log, for the first request for rel: fetch seconds, seconds from the end
    of the fetch to the reply (the compile, and the warm-up when the compile waited for it), the
    warm-up's seconds and when it ended after the reply (negative: before).  Keys missing when
    not logged."""
    with open(srv.log, errors="replace") as f:
        text = f.read()
    fetched = next((m for m in FETCHED.finditer(text) if m.group(2) == rel), None)
    known = next((m for m in KNOWN.finditer(text) if m.group(2) == rel), None)
    replied = next((m for m in REPLIED.finditer(text) if m.group(2) == rel), None)
    out = {}
    if fetched:
        out.update(fetch=float(fetched.group(5)), downloaded=int(fetched.group(3)),
                   unpacked=int(fetched.group(4)))
    if fetched and replied:
        out["to_reply"] = log_time(replied.group(1)) - log_time(fetched.group(1))
    if known:
        out["warm_up"] = float(known.group(3))
        if replied:
            out["warm_up_after_reply"] = log_time(known.group(1)) - log_time(replied.group(1))
    return out


def bench_kernels(ctx, report):
    rel, why = fetchable_release()
    if rel is None:
        report.not_measured(why)
        return
    report.note(f"release {rel} (not installed; the user's side installs its headers and purges "
                f"them again); installed release {ctx.krel}")
    box = make_sandbox(TEST_USER, parent=ctx.top)
    ours = Series(f"first -p4 for {rel}: our server fetches")
    install = Series(f"  apt-get install linux-headers-{rel}")
    local = Series(f"  then local stap -r {rel} -p4 (new stap cache)")
    user = Series("first -p4: user installs headers + local stap")
    phases = []
    srv = None
    for i in range(ctx.opts.kernel_reps):
        script = ctx.unique_script(f"kernel{i}")
        progress(f"7a: first module for {rel}, rep {i + 1}/{ctx.opts.kernel_reps}: our server")
        if srv is not None:
            srv.stop()
        srv = start_fetching_server(ctx, box, i)
        ours.add(fetching_client(srv, rel, script))
        if not knowledge_ready(srv, (rel,)):  # so the user's way is not timed beside it
            report.note(f"rep {i + 1}: the server's warm-up did not end within 10 minutes")
        phases.append(where_the_time_went(srv, rel))
        progress(f"7a: rep {i + 1}: apt-get install linux-headers-{rel} + local stap -p4")
        a, b = install_and_compile(ctx, rel, script)
        install.add(a)
        local.add(b)
        user.add(Sample(a.seconds + b.seconds, a.ok and b.ok, a.error or b.error))
    report.row(user)
    report.row(install)
    report.row(local)
    report.row(ours, user)
    r = ours.median / user.median if ours.median and user.median else None
    report.summary(f"first module, ours / user's way: {fmt_ratio_text(r)}   target <= 1.0x: "
                   f"{verdict(r, 1.0)}", key="kernel_first", ratio=r, ours=ours.median,
                   user=user.median)
    first_module_breakdown(report, ours, phases, install, local)
    if srv is None or not ours.good:
        return
    cached_vs_installed(ctx, report, srv, rel)
    kernel_disk(report, srv, rel)


def fmt_ratio_text(r):
    return "not measured" if r is None else f"{r:.2f}x"


def first_module_breakdown(report, ours, phases, install, local):
    """Where our first module's time went (the fetch; from the fetch to the reply: the compile,
    and the warm-up when the compile waited for it), each against its counterpart on the user's
    side."""
    def med(key):
        values = [p[key] for p in phases if key in p]
        return statistics.median(values) if values else None
    fetch, compile_, warm, after = (med(k) for k in ("fetch", "to_reply", "warm_up",
                                                     "warm_up_after_reply"))
    if fetch is None or compile_ is None or warm is None:
        report.note("the server's log lacks a fetch, warm-up or request line: no breakdown")
        return
    how = (f"ended {after:.1f} s after the reply" if after > 0 else
           f"ended {-after:.1f} s before the reply, so the compile after it took about "
           f"{compile_ - warm:.1f}")
    client_s = fmt_s(ours.median - ours.server_median if ours.server_median else None)
    report.summary(f"our first module, median s: fetch (apt-get download + dpkg-deb) {fetch:.1f}"
                   f", then to the reply {compile_:.1f}; the server's knowledge warm-up (stap -p4 "
                   f"of its own script) took {warm:.1f} and {how}; client + transport {client_s}",
                   key="kernel_first_phases", fetch=fetch, to_reply=compile_, warm_up=warm,
                   warm_up_after_reply=after)
    if install.median is None or local.median is None:
        return
    report.summary(f"against the user's way: fetch - apt-get install {fetch - install.median:+.1f}"
                   f" s; fetch to reply - local stap -p4 {compile_ - local.median:+.1f} s",
                   key="kernel_first_gap", fetch=fetch - install.median,
                   compile=compile_ - local.median)


def cached_vs_installed(ctx, report, srv, rel):
    """Cold compiles (a new script each) for the fetched release and the installed one, on the same
    server, both releases' knowledge warm."""
    progress(f"7b: warm-up compile for {ctx.krel} on the fetching server")
    fetching_client(srv, ctx.krel, ctx.unique_script("kwarm"))
    if not knowledge_ready(srv, (rel, ctx.krel)):
        report.note("the server's knowledge warm-ups did not end within 10 minutes")
    n = ctx.opts.cold_reps
    progress(f"7b: new scripts for {rel} (cached) and {ctx.krel} (installed), {n} x 2")
    inst = Series(f"new script -p4, installed {ctx.krel}")
    cached = Series(f"new script -p4, cached {rel}")
    interleaved([(inst, lambda: fetching_client(srv, ctx.krel, ctx.unique_script("inst"))),
                 (cached, lambda: fetching_client(srv, rel, ctx.unique_script("cached")))], n)
    report.row(inst)
    report.row(cached, inst)
    if inst.median and cached.median:
        pct = (cached.median / inst.median - 1) * 100
        report.summary(f"cached release vs installed: {pct:+.1f} %   target within 5 %: "
                       f"{verdict(abs(pct), 5)}", key="kernel_cached", percent=pct)
    if "hit" in cached.caches + inst.caches:
        report.note("the result cache answered some requests (could not turn it off)")


def knowledge_ready(srv, releases, timeout=600):
    """Whether the server's log says its knowledge of each release is ready within timeout s: the
    warm-up runs in the background after a kernel's first compile, and a timed compile that came
    meanwhile would wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(srv.log, errors="replace") as f:
            if {m.group(2) for m in KNOWN.finditer(f.read())} >= set(releases):
                return True
        time.sleep(1)
    return False


def kernel_disk(report, srv, rel):
    tree = disk_bytes(os.path.join(srv.kernels, "trees", rel))
    debs = disk_bytes(os.path.join(srv.kernels, "debs"))
    mb = (tree + debs) / 1e6
    report.summary(f"disk for {rel} (no vmlinux): unpacked tree {tree / 1e6:.1f} MB + kept "
                   f"downloads {debs / 1e6:.1f} MB = {mb:.1f} MB   target <= 100 MB: "
                   f"{verdict(mb, 100)}", key="kernel_disk", tree=tree, debs=debs)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

RUNNERS = {"overhead": ("1. stap-client round trip vs local stap (-p4)", bench_overhead),
           "sandbox": ("1c. the cost of the bubblewrap sandbox (-p4, result cache off)",
                       bench_sandbox),
           "buildenv": ("1d. a request in a build environment (Debian 13, stap 5.1) vs the "
                        "host's (-p4, result cache off)", bench_buildenv),
           "interop": ("2. ours vs the real stap-serverd 4.8 / stap --use-server "
                       "(one network namespace)", bench_interop),
           "load": ("2b. 30 and 100 concurrent clients, --max-threads 2, every pairing",
                    bench_load),
           "fleet": ("2c. 60 clients spread over 1, 2 and 3 servers (--max-threads 1), "
                     "each on a host of its own (network namespaces on one link)", bench_fleet),
           "resultcache": ("3. identical repeated requests (server result cache)",
                           bench_resultcache),
           "concurrency": ("4. concurrent distinct -p4 compiles, --max-threads 2; memory",
                           bench_concurrency),
           "discovery": ("5a. stap-find-servers latency (two network namespaces)",
                         bench_discovery),
           "startup": ("5b. stap-start-server time to the pid", bench_startup),
           "profile": ("6. where one stap-client round trip spends its time", bench_profile),
           "kernels": ("7. kernels fetched on demand vs installing the headers (-p4)",
                       bench_kernels)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--only", action="append", metavar="NAME",
                   help=f"run only these (repeatable or comma-separated): {', '.join(BENCHMARKS)}")
    p.add_argument("--reps", type=int, help="repetitions of fast cases (default 5, quick 3)")
    p.add_argument("--cold-reps", type=int,
                   help="repetitions of cold compiles (default 5, quick 2)")
    p.add_argument("--jobs", type=int, default=16, help="concurrent compiles (default 16)")
    p.add_argument("--kernel-reps", type=int,
                   help="first modules for a release not fetched yet, each way (kernels; "
                   "default 2, quick 1)")
    opts = p.parse_args(argv)
    q = opts.quick
    opts.reps = opts.reps or (3 if q else 5)
    opts.cold_reps = opts.cold_reps or (2 if q else 5)
    opts.single_reps = 1 if q else 3
    opts.find_reps = 3 if q else 5
    opts.start_reps = 2 if q else 5
    opts.fleet_rounds = 1 if q else 3
    opts.kernel_reps = opts.kernel_reps or (1 if q else 2)
    selected = []
    for item in opts.only or []:
        selected += [x.strip() for x in item.split(",") if x.strip()]
    unknown = [x for x in selected if x not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    opts.selected = [b for b in BENCHMARKS if b in selected] if selected else list(BENCHMARKS)
    return opts


def host_info(ctx):
    proc = subprocess.run(["stap", "--version"], capture_output=True, text=True)
    stap = proc.stdout + proc.stderr
    return {"hostname": platform.node(), "nproc": os.cpu_count(), "kernel": platform.release(),
            "krel": ctx.krel, "runtime": ctx.rt, "python": sys.version.split()[0],
            "stap": (stap.splitlines() or [""])[0],
            "loadavg_start": os.getloadavg(),
            "git": subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                  capture_output=True, text=True).stdout.strip()}


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    signal.signal(signal.SIGTERM, _terminate)
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench: run as root (network namespaces, the compile account, the real "
              "stap-serverd as nobody)", file=sys.stderr)
        return 1
    started = time.time()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    reports = []
    with contextlib.ExitStack() as stack:
        # Every process the benchmark starts (servers, their sandboxed compiles, clients) runs in
        # one cgroup, so that "other processes" is the machine less exactly that.
        group = stack.enter_context(CpuGroup("stap-bench"))
        if group.available:
            group.add(os.getpid())
            BENCH_CPU["group"] = group
        ctx = Context(opts, stack)
        info = host_info(ctx)
        print(f"stap-server benchmarks {stamp}: {info['nproc']} CPUs, release {ctx.krel}, "
              f"runtime {ctx.rt or 'stock'}, {info['stap']}, git {info['git']}, "
              f"load {info['loadavg_start'][0]:.2f}")
        cache = (f"available ({' '.join(ctx.cache_off)} turns it off)"
                 if ctx.has_result_cache else "not available")
        print(f"result cache: {cache}; reps {opts.reps}, cold reps {opts.cold_reps}\n",
              flush=True)
        for key in opts.selected:
            title, fn = RUNNERS[key]
            report = Report(key, title)
            t = time.perf_counter()
            try:
                with CpuWindow(None) as cpu:
                    fn(ctx, report)
                report.note(f"background load during this benchmark: {cpu.background()} "
                            "(the benchmark's own processes and servers not counted)")
                report.extra["cpu"] = cpu.to_json()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                report.not_measured(f"{type(e).__name__}: {e}")
                traceback.print_exc()
            report.extra["seconds"] = time.perf_counter() - t
            reports.append(report)
            print(report.render() + f"\n  ({report.extra['seconds']:.0f} s)\n", flush=True)
        info["loadavg_end"] = os.getloadavg()
    result = {"timestamp": stamp, "duration_seconds": time.time() - started, "host": info,
              "options": {k: v for k, v in vars(opts).items()},
              "result_cache": "available" if ctx.has_result_cache else "not available",
              "warm_up_seconds": ctx.warm,
              "benchmarks": {r.key: r.to_json() for r in reports}}
    outdir = os.path.join(BENCH, "results")
    os.makedirs(outdir, exist_ok=True)
    for name in (f"{stamp}.json", "latest.json"):
        with open(os.path.join(outdir, name), "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(f"total {result['duration_seconds']:.0f} s; results in "
          f"{os.path.relpath(os.path.join(outdir, stamp + '.json'), os.getcwd())} and latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
