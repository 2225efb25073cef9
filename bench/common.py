"""Benchmark infrastructure: timing, sandboxes, our server, the real
stap-serverd 4.8 in a network namespace, log parsing, tables.

Nothing here listens on a wildcard address or advertises in the machine's
root network namespace: our servers there use --listen 127.0.0.1
--advertise none; the real stap-serverd (which listens on every address)
and every discovery benchmark run inside network namespaces (tests/netns.py).
Every process started here is ended by its pid.
"""

import contextlib
import dataclasses
import json
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PY = "/usr/bin/python3"
# Our commands as `make install` installs them (here into a DESTDIR): each a symlink to one
# launcher that imports the byte-compiled module (running stap_client.py itself would compile it
# from source at every start).  installed_command(NAME) is such a symlink; CLIENT and SERVER are
# the launcher, run as `PY LAUNCHER COMMAND ...`, which dispatches on COMMAND as the symlinks do
# on their names.
INSTALLED = os.path.join(BENCH, "launchers")
LIB = os.path.join(INSTALLED, "usr/lib/stap-server")
CLIENT = SERVER = os.path.join(LIB, "launcher")


def install_commands():
    """make install into INSTALLED, afresh (it writes the modules' byte code whatever
    PYTHONDONTWRITEBYTECODE says)."""
    shutil.rmtree(INSTALLED, ignore_errors=True)
    subprocess.run(["make", "-C", ROOT, "-s", "install", f"DESTDIR={INSTALLED}", "prefix=/usr",
                    "sysconfdir=/etc", f"PYTHON={PY}"], check=True, stdout=subprocess.DEVNULL)


def installed_command(name):
    return os.path.join(INSTALLED, "usr/bin", name)


install_commands()
REAL_SERVERD = "/usr/lib/systemtap/stap-serverd"
# Kept between runs (world-readable: the compile account reads it): the
# patched runtime, stap's caches of every peer, so that later runs are warm.
WORK = "/tmp/stap-bench"
COMPILE_CACHE = os.path.join(WORK, "compile-cache")   # our server's --cache-dir
LOCAL_HOME = os.path.join(WORK, "local-home")         # local stap's SYSTEMTAP_DIR parent
REAL_HOME = os.path.join(WORK, "real-serverd-home")   # the real server's HOME (nobody)
SCRIPTS = os.path.join(WORK, "scripts")               # fixed scripts: stap-cache hits
REAL_PORT = 5555                                      # inside its own namespace

# tests/ is not a package: pytest imports its helpers (shared.py, netns.py) as
# top-level modules, and an __init__.py there would have it import conftest
# twice (as tests.conftest and, for the tests' own `import conftest`, as
# conftest); so the benchmarks import them as pytest does, from tests/ on the path.
sys.path.insert(0, os.path.join(ROOT, "tests"))
from shared import (  # noqa: E402,F401  (run.py imports them from here)
    Sandbox,
    fixed_runtime_for,
    headers_release,
    make_sandbox,
    stop_pid,
    wait_until,
)

HIT_SCRIPT = 'probe begin { printf("stap-bench: cache hit\\n"); exit() }\n'
P2_SCRIPT = 'probe begin { printf("stap-bench: pass 2\\n"); exit() }\n'


def progress(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail(data, lines=3):
    if isinstance(data, bytes):
        data = data.decode(errors="replace")
    return " | ".join((data or "").strip().splitlines()[-lines:])


# --------------------------------------------------------------------------
# Samples and statistics
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Sample:
    seconds: float
    ok: bool
    error: str = ""
    server_seconds: float = None   # our server's own time for the request (log)
    cache: str = None              # our server's result cache verdict (log)


class Series:
    """The samples of one case."""

    def __init__(self, name):
        self.name = name
        self.samples = []

    def add(self, sample):
        self.samples.append(sample)
        return sample

    @property
    def good(self):
        return [s.seconds for s in self.samples if s.ok]

    @property
    def median(self):
        g = self.good
        return statistics.median(g) if g else None

    @property
    def server_median(self):
        g = [s.server_seconds for s in self.samples if s.ok and s.server_seconds is not None]
        return statistics.median(g) if g else None

    @property
    def errors(self):
        return sorted({s.error for s in self.samples if not s.ok and s.error})

    @property
    def caches(self):
        return sorted({s.cache for s in self.samples if s.cache})

    def to_json(self):
        g = self.good
        return {"name": self.name, "n": len(self.samples), "ok": len(g),
                "median": self.median, "min": min(g) if g else None,
                "max": max(g) if g else None, "samples": [s.seconds for s in self.samples],
                "server_median": self.server_median, "cache": self.caches,
                "errors": self.errors}


def interleaved(cases, reps):
    """Run each case reps times, rotating the order every repetition so that
    drift and background load fall on every case alike.  cases: list of
    (Series, callable returning a Sample)."""
    for i in range(reps):
        k = i % len(cases)
        for series, fn in cases[k:] + cases[:k]:
            series.add(fn())


def timed(argv, *, env=None, cwd=None, timeout=300, ok=None):
    """Wall time of one command; Sample(ok=False) on a non-zero exit or timeout."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Sample(time.perf_counter() - t, False, f"timed out after {timeout} s")
    seconds = time.perf_counter() - t
    good = proc.returncode == 0 and (ok is None or ok(proc))
    err = "" if good else (f"exit {proc.returncode}: {tail(proc.stderr)}" if proc.returncode
                           else f"exit 0 but not as expected: stdout {tail(proc.stdout)} "
                           f"stderr {tail(proc.stderr)}")
    s = Sample(seconds, good, err)
    s.proc = proc
    return s


def fmt_s(x):
    return "-" if x is None else f"{x:.3f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

class Report:
    """One benchmark's output: rows of series (with an optional ratio against
    another series), summary lines, notes; printed and kept for JSON."""

    def __init__(self, key, title):
        self.key = key
        self.title = title
        self.rows = []       # (Series, reference Series or None, label of reference)
        self.lines = []      # (text, data dict)
        self.notes = []
        self.status = "measured"
        self.extra = {}

    def row(self, series, ref=None):
        self.rows.append((series, ref))
        return series

    def summary(self, text, **data):
        self.lines.append((text, data))

    def note(self, text):
        self.notes.append(text)

    def not_measured(self, reason):
        self.status = "not measured"
        self.note(f"not measured: {reason}")

    def render(self):
        out = [f"== {self.title} =="]
        if self.rows:
            w = max(40, max(len(s.name) for s, _ in self.rows) + 2)
            out.append(f"{'case':<{w}}{'n':>4} {'median s':>9} {'min':>7} {'max':>7} "
                       f"{'ratio':>7}  {'vs':<22}{'server s':>8}  cache")
            for s, ref in self.rows:
                g = s.good
                n = f"{len(g)}/{len(s.samples)}" if len(g) != len(s.samples) else str(len(g))
                r = ratio(s.median, ref.median) if ref else None
                out.append(f"{s.name:<{w}}{n:>4} {fmt_s(s.median):>9} "
                           f"{fmt_s(min(g) if g else None):>7} {fmt_s(max(g) if g else None):>7} "
                           f"{fmt_ratio(r) if ref else '':>7}  {(ref.name[:21] if ref else ''):<22}"
                           f"{fmt_s(s.server_median) if s.server_median is not None else '':>8}  "
                           f"{','.join(s.caches)}")
                for e in s.errors[:2]:
                    out.append(f"    failed: {e[:150]}")
        for text, _ in self.lines:
            out.append(f"  {text}")
        for n in self.notes:
            out.append(f"  note: {n}")
        return "\n".join(out)

    def to_json(self):
        return {"title": self.title, "status": self.status,
                "rows": [dict(s.to_json(), vs=ref.name if ref else None,
                              ratio=ratio(s.median, ref.median) if ref else None)
                         for s, ref in self.rows],
                "summary": [dict(text=t, **d) for t, d in self.lines],
                "notes": self.notes, **self.extra}


def verdict(value, limit):
    if value is None:
        return "not measured"
    return "met" if value <= limit else "MISSED"


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

def rss_kib(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler:
    """Samples a pid's VmRSS every interval seconds in a thread."""

    def __init__(self, pid, interval=0.05):
        self.pid, self.interval = pid, interval
        self.peak = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            v = rss_kib(self.pid)
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------
# Environment: kernel release, runtime fixture, sandboxes
# --------------------------------------------------------------------------

def prepare_work():
    for d in (WORK, COMPILE_CACHE, LOCAL_HOME, SCRIPTS):
        os.makedirs(d, 0o755, exist_ok=True)
        os.chmod(d, 0o755)
    for name, text in (("hit.stp", HIT_SCRIPT), ("p2.stp", P2_SCRIPT)):
        path = os.path.join(SCRIPTS, name)
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        os.chmod(path, 0o644)


def runtime_fixture(krel):
    """The -R runtime that local stap and the real stap-serverd need for krel's headers, made by
    our server's table of fixes (our server needs no -R), or None."""
    return fixed_runtime_for(krel, WORK)


def local_env():
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": LOCAL_HOME,
            "SYSTEMTAP_DIR": os.path.join(LOCAL_HOME, ".systemtap"), "LANG": "C.UTF-8"}


def server_help():
    proc = subprocess.run([PY, SERVER, "stap-serverd", "--help"], capture_output=True,
                          text=True, timeout=30)
    return proc.stdout + proc.stderr


def result_cache_off_args(help_text):
    """The option that turns our server's result cache off, or None."""
    if "--no-result-cache" in help_text:
        return ["--no-result-cache"]
    if "--result-cache-size" in help_text:
        return ["--result-cache-size", "0"]
    return None


# --------------------------------------------------------------------------
# Our server
# --------------------------------------------------------------------------

LOG_FIELD = re.compile(r"(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")


def parse_request_line(line):
    if " request " not in line:
        return None
    rest = line.split(" request ", 1)[1]
    fields = {}
    for k, v in LOG_FIELD.findall(rest):
        if v[:1] in "'\"":
            v = v[1:-1]
        fields[k] = v
    return fields


class LogTail:
    """The request lines our server logged since the last call."""

    def __init__(self, path):
        self.path, self.offset = path, 0

    def new(self):
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except OSError:
            return []
        return [r for r in map(parse_request_line, text.splitlines()) if r]


@dataclasses.dataclass
class OurServer:
    pid: int
    port: int
    log: str
    box: Sandbox
    host: object = None     # netns Host or None (root namespace)
    start_seconds: float = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        forget_server(self.pid)
        stop_pid(self.pid)
        release_server(self.pid)


def start_our_server(box, krel, rt, *extra, log=None, host=None, listen="127.0.0.1",
                     advertise="none", timeout=60):
    """stap-start-server; returns an OurServer (raises RuntimeError on failure)."""
    log = log or box.path(f"server.{time.monotonic_ns()}.log")
    args = [PY, SERVER, "stap-start-server", "--listen", listen, "-r", krel, "--log", log,
            "--cache-dir", COMPILE_CACHE]
    if advertise:
        args += ["--advertise", advertise]
    args += list(extra)  # rt is for the peers: our server fixes the runtime itself
    prefix = host.prefix() if host else []
    t = time.perf_counter()
    proc = subprocess.run(prefix + args, env=box.env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    if proc.returncode != 0 or not proc.stdout.strip().isdigit():
        raise RuntimeError(f"stap-start-server failed (exit {proc.returncode}): "
                           f"{tail(proc.stderr)}")
    pid = int(proc.stdout.strip())
    track_server(pid)
    status_path = f"/run/stap-server/stap-serverd.{pid}.json"
    try:
        if host:
            text = host.run(["cat", status_path]).stdout
        else:
            with open(status_path) as f:
                text = f.read()
        port = json.loads(text)["port"]
    except Exception as e:
        stop_pid(pid)
        raise RuntimeError(f"no status file {status_path}: {e}") from None
    return OurServer(pid=pid, port=port, log=log, box=box, host=host, start_seconds=seconds)


# --------------------------------------------------------------------------
# The real stap-serverd 4.8 (as nobody, inside a network namespace)
# --------------------------------------------------------------------------

def real_serverd_problem():
    if os.geteuid() != 0:
        return "needs root (network namespace, setpriv to nobody)"
    if not os.access(REAL_SERVERD, os.X_OK):
        return f"{REAL_SERVERD} is not installed (Debian package systemtap-server)"
    for tool in ("setpriv", "ss", "nsenter", "ip"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "no account nobody"
    return None


class RealServer:
    """The real stap-serverd, run as nobody inside host's namespaces."""

    def __init__(self, host, krel, rt, port=REAL_PORT, extra=()):
        self.host, self.krel, self.rt, self.port = host, krel, rt, port
        self.extra = list(extra)  # more stap-serverd options, e.g. --max-threads=2
        self.proc = None
        self.ready_seconds = None
        self.log = os.path.join(REAL_HOME, "serverd.log")

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self, timeout=30):
        pw = pwd.getpwnam("nobody")
        os.makedirs(REAL_HOME, 0o755, exist_ok=True)
        os.chown(REAL_HOME, pw.pw_uid, pw.pw_gid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                "env", "-i", "PATH=/usr/bin:/bin", f"HOME={REAL_HOME}",
                f"SYSTEMTAP_DIR={REAL_HOME}/.systemtap", "LANG=C.UTF-8",
                REAL_SERVERD, "--port", str(self.port), "-r", self.krel]
        if self.rt:
            argv += ["-R", self.rt]
        argv += [f"--log={self.log}"] + self.extra
        out = open(os.path.join(REAL_HOME, "serverd.out"), "w")
        t = time.perf_counter()
        # nsenter, setpriv and env exec: proc.pid is stap-serverd's own pid
        self.proc = self.host.popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        # our child: its CPU shows in RUSAGE_CHILDREN once reaped (stop())
        out.close()

        def listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"stap-serverd exited {self.proc.returncode}: "
                                   f"{tail(open(os.path.join(REAL_HOME, 'serverd.out')).read())}")
            ss = self.host.run(["ss", "-Hltn", f"sport = :{self.port}"], timeout=10).stdout
            return bool(ss.strip())

        try:
            wait_until(listening, timeout, f"stap-serverd not listening after {timeout} s",
                       error=RuntimeError)
        except RuntimeError:
            self.stop()  # still running but not listening in time (an exited one is reaped)
            raise
        self.ready_seconds = time.perf_counter() - t

    def stop(self):
        if self.proc:
            stop_pid(self.proc, timeout=15)


def real_client_env(top):
    home = os.path.join(top, "real-client")
    os.makedirs(home, 0o755, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
            "SYSTEMTAP_DIR": os.path.join(home, ".systemtap"), "LANG": "C.UTF-8"}


def clean_modules(directory):
    for name in os.listdir(directory):
        if name.endswith((".ko", ".ko.sgn")):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


# --------------------------------------------------------------------------
# CPU accounting: who used the CPUs during a measurement
# --------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid):
    """CPU seconds of pid and its reaped descendants (utime+stime+cutime+cstime)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_busy():
    """Busy CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


_SERVERS = {}   # pid of a server we started (not our child) -> CPU seconds when last seen
_SERVER_GROUPS = {}  # pid -> the CpuGroup its compiles are counted in
BENCH_CPU = {}  # "group": the CpuGroup the whole benchmark runs in (run.py's main makes it)


def track_server(pid):
    _SERVERS[pid] = 0.0
    group = CpuGroup(f"server-{pid}")
    if group.available:  # from now on its compiles start inside it
        group.add(pid)
        _SERVER_GROUPS[pid] = group


def release_server(pid):
    group = _SERVER_GROUPS.pop(pid, None)
    if group:
        group.__exit__()


def server_cpu(pid):
    """CPU seconds of a server we started and of its compiles: its cgroup's count, which also
    sees compiles reaped inside the sandbox's pid namespace; else what /proc tells of pid."""
    group = _SERVER_GROUPS.get(pid)
    return group.seconds() if group else process_cpu(pid)


def forget_server(pid):
    """Called just before stopping it: keep the CPU it used."""
    if pid in _SERVERS:
        cpu = server_cpu(pid)
        if cpu is not None:
            _SERVERS[pid] = cpu
        _SERVERS[pid] = -abs(_SERVERS[pid]) - 1e-9   # negative: stopped, value frozen


def own_servers_cpu():
    total = 0.0
    for pid, last in _SERVERS.items():
        if last < 0:
            total += -last
            continue
        cpu = server_cpu(pid)
        if cpu is not None:
            _SERVERS[pid] = cpu
        total += _SERVERS[pid]
    return total


def bench_cpu():
    """CPU seconds of every process of the benchmark so far (its cgroup), or None."""
    group = BENCH_CPU.get("group")
    return group.seconds() if group else None


def own_children_cpu():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuWindow:
    """CPU used during a with-block: by the server pid (with its compiles),
    by our own child processes (clients), and by everything else (the
    machine less the benchmark's cgroup, where there is one)."""

    def __init__(self, server_pid):
        self.pid = server_pid

    def __enter__(self):
        self.t = time.perf_counter()
        self.s0 = server_cpu(self.pid) if self.pid else None
        self.c0, self.m0 = own_children_cpu(), machine_busy()
        self.o0, self.g0 = own_servers_cpu(), bench_cpu()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        s1 = server_cpu(self.pid) if self.pid else None
        self.server = s1 - self.s0 if s1 is not None and self.s0 is not None else None
        self.clients = own_children_cpu() - self.c0
        self.machine = machine_busy() - self.m0
        self.own_servers = own_servers_cpu() - self.o0
        g1 = bench_cpu()
        ours = g1 - self.g0 if g1 is not None else self.own_servers + self.clients
        self.other = max(0.0, self.machine - ours)  # the two clocks differ by a tick or so

    def background(self):
        n = os.cpu_count()
        return (f"other processes on the machine used {self.other:.1f} of "
                f"{self.wall * n:.0f} CPU-s ({self.other / (self.wall * n) * 100:.0f} %)")

    def text(self):
        n = os.cpu_count()
        return (f"{self.wall:.1f} s wall x {n} CPUs = {self.wall * n:.1f} CPU-s available; "
                f"used: server+compiles {self.server:.1f}, clients {self.clients:.1f}, "
                f"other processes on the machine {self.other:.1f}; idle "
                f"{self.wall * n - self.machine:.1f}")

    def to_json(self):
        return {"wall": self.wall, "server_cpu": self.server, "clients_cpu": self.clients,
                "own_servers_cpu": self.own_servers,
                "machine_busy": self.machine, "other_cpu": self.other}


class CpuGroup:
    """Exact CPU-seconds of the processes added and of every process they
    start from then on: a cgroup of its own (a cgroup v2 leaf, else cgroup
    v1 cpuacct), which also counts what process_cpu() cannot see (compiles
    reaped inside the sandbox's pid namespace).  Removed on exit; processes
    still in it go back to this process's own cgroup.  Where no cgroup can
    be made, `available` is False and seconds() is None."""

    ROOTS = (("v2", "/sys/fs/cgroup"), ("v2", "/sys/fs/cgroup/unified"),
             ("v1", "/sys/fs/cgroup/cpuacct"))

    def __init__(self, name):
        self.path = self.kind = self.home = None
        outer = BENCH_CPU.get("group")  # inside the benchmark's own group, which then counts it too
        for kind, root in [(outer.kind, outer.path)] if outer else self.ROOTS:
            marker = "cgroup.controllers" if kind == "v2" else "cpuacct.usage"
            if not os.path.exists(os.path.join(root, marker)):
                continue
            path = os.path.join(root, f"{name}-{os.getpid()}-{time.monotonic_ns()}")
            try:
                os.mkdir(path)
            except OSError:
                continue
            self.path, self.kind = path, kind
            self.home = root if outer else root + self._own_cgroup(kind)
            break

    @staticmethod
    def _own_cgroup(kind):
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if (kind == "v2" and controllers == "") or \
                        (kind == "v1" and "cpuacct" in controllers.split(",")):
                    return path.rstrip("/")
        return ""

    @property
    def available(self):
        return self.kind is not None

    def add(self, pid):
        if self.path:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def seconds(self):
        if not self.path:
            return None
        if self.kind == "v2":
            with open(os.path.join(self.path, "cpu.stat")) as f:
                usage = dict(line.split() for line in f)
            return int(usage["usage_usec"]) / 1e6
        with open(os.path.join(self.path, "cpuacct.usage")) as f:
            return int(f.read()) / 1e9

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.path:
            return
        for _ in range(50):
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                left = f.read().split()
            for pid in left:
                with contextlib.suppress(OSError), \
                        open(os.path.join(self.home, "cgroup.procs"), "w") as f:
                    f.write(pid)
            try:
                os.rmdir(self.path)
                break
            except OSError:
                time.sleep(0.1)   # a process just exiting still counts as a member
        self.path = None
