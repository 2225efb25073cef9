"""Network-namespace test harness: the test network of SPEC section 11.

Two hosts, A and B, each a network namespace joined by a veth pair
(10.200.0.1/24 and 10.200.0.2/24, with a 224.0.0.0/4 route on the veth), or a
single host with loopback only, or N hosts on one link: a bridge in a
namespace of its own with a veth pair to each host (10.202.0.1/24,
10.202.0.2/24, ...; one multicast domain).  Every host also gets a *holder*
process: a `sleep` running in a private mount and UTS namespace with a tmpfs
on /run and its own host name (stap-host-a, stap-host-b, ...).  Commands run
inside a host enter the holder's namespaces, so a host never sees the
machine's own /run (its D-Bus socket, a real avahi) and two hosts never
share one.

Optionally a host runs a private `dbus-daemon --system` and
`avahi-daemon --no-drop-root --no-chroot -f CONF` in those namespaces.

Usage (plain code or pytest):

    with TestNetwork(avahi=(True, False)) as net:
        a, b = net.hosts
        a.run(['avahi-browse', '-a', '-t', '-p'])

    with TestNetwork(hosts=4) as net:      # A, B, C, D on one bridge
        a, b, c, d = net.hosts

    from netns import network_factory   # the fixture below, in a test module

    def test_x(network_factory):
        a, b = network_factory(avahi=True).hosts
        ...

Everything started here is ended by pid and the namespaces are deleted when
the `with` block exits, whatever happened inside it.  Nothing here binds a
socket or starts a daemon in the machine's root network namespace.
"""

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile

from shared import read_text, stop_pid, wait_until

# Addresses of the two-host network (SPEC section 11).
SUBNET_PREFIX = 24
HOST_ADDRESSES = ("10.200.0.1", "10.200.0.2")
HOST_NAMES = ("stap-host-a", "stap-host-b")
# The routed network: A and B on two subnets, router R between them.
ROUTED_ADDRESSES = ("10.201.1.2", "10.201.2.2")
ROUTER_ADDRESSES = ("10.201.1.1", "10.201.2.1")
ROUTER_NAME = "stap-router"
# The bridged network: N hosts on one link, the bridge in a namespace of its own.
BRIDGED_SUBNET = "10.202.0"         # host i (from 0) is 10.202.0.<i + 1>
SWITCH_NAME = "stap-switch"
BRIDGE = "br0"
MAX_HOSTS = 26                      # one letter each: stap-host-a ... stap-host-z

VETH = "veth0"          # the same name inside each namespace
AVAHI_READY_TIMEOUT = 10.0
END_GRACE = 2.0         # seconds a process gets after SIGTERM before SIGKILL

_counter = itertools.count()


def skip_reason():
    """Why the harness cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def avahi_skip_reason():
    """Why hosts with avahi cannot run here, or None when they can."""
    reason = skip_reason()
    if reason:
        return reason
    for tool in ("dbus-daemon", "avahi-daemon", "avahi-browse",
                 "avahi-publish-service"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def host_letter(i):
    """a, b, c, ... for host i (from 0): its name, its namespace's suffix."""
    return chr(ord("a") + i)


def host_name(i):
    """stap-host-a, stap-host-b, ... (HOST_NAMES for the first two)."""
    return f"stap-host-{host_letter(i)}"


def _check(argv, timeout=10):
    """Run a setup command; raise with its stderr when it fails."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f'{" ".join(argv)}: exit {proc.returncode}: '
                           f'{proc.stderr.strip()}')
    return proc.stdout


AVAHI_CONF = """\
[server]
host-name={hostname}
use-ipv4=yes
use-ipv6={ipv6}
{allow}
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
publish-hinfo=no
publish-workstation=no

[reflector]

[rlimits]
"""


class Host:
    """One simulated machine: a network namespace plus its holder process."""

    def __init__(self, netns, hostname, address, workdir):
        self.netns = netns            # name for `ip netns`
        self.hostname = hostname      # short name in the host's UTS namespace
        self.address = address        # IPv4 address on the test network
        self.workdir = workdir        # private scratch directory (logs, conf)
        self.holder = None            # Popen of the namespace holder
        self.dbus = None              # Popen of the private dbus-daemon
        self.avahi = None             # Popen of the private avahi-daemon
        self._children = []           # everything started through popen()

    # -- entering the host ------------------------------------------------

    def prefix(self, private=True):
        """argv prefix that runs a command inside this host.

        private=True (the default) also enters the holder's mount and UTS
        namespaces: the host's own /run (its avahi's D-Bus socket) and host
        name.  private=False uses `ip netns exec`: the network only, with
        the machine's /run.
        """
        if private and self.holder is not None:
            return ["nsenter", "-t", str(self.holder.pid), "-m", "-u", "-n",
                    "--"]
        return ["ip", "netns", "exec", self.netns]

    def run(self, argv, timeout=30, private=True, check=False, **kwargs):
        """subprocess.run(argv) inside the host; text output captured."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.prefix(private) + list(argv),
                              timeout=timeout, check=check, **kwargs)

    def popen(self, argv, private=True, **kwargs):
        """subprocess.Popen(argv) inside the host, ended at cleanup.

        The returned pid is the command's own pid: `ip netns exec`, `nsenter`
        (without a pid namespace) and `unshare -m -u` exec without forking.
        """
        proc = subprocess.Popen(self.prefix(private) + list(argv), **kwargs)
        self._children.append(proc)
        return proc

    @property
    def has_avahi(self):
        return self.avahi is not None and self.avahi.poll() is None

    # -- life cycle ---------------------------------------------------------

    def start_holder(self):
        """Private mount + UTS namespaces with a tmpfs /run and the host name."""
        script = ("mount -t tmpfs -o mode=0755 stap-test-run /run && "
                  f"hostname {self.hostname} && echo ready && exec sleep infinity")
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns,
             "unshare", "-m", "-u", "--propagation", "private",
             "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            err = self.holder.stderr.read() if self.holder.poll() is not None else ""
            raise RuntimeError(f"{self.hostname}: namespace holder failed: {err.strip()}")
        # Wait for the exec into sleep so the pid's namespaces are final
        # (and go on after 5 s regardless, as the namespaces exist by now).
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: _comm(self.holder.pid) == "sleep", 5, "", interval=0.01,
                       error=TimeoutError)

    def start_avahi(self, ipv6=False, interfaces=None):
        """Private system bus + avahi-daemon; wait until avahi serves."""
        self.run(["mkdir", "-p", "/run/dbus"], check=True)
        log = open(os.path.join(self.workdir, "dbus.log"), "w")
        self.dbus = self.popen(["dbus-daemon", "--system", "--nofork",
                                "--nopidfile"],
                               stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT)
        log.close()
        self._wait_for(lambda: self.run(["test", "-S",
                                         "/run/dbus/system_bus_socket"],
                                        timeout=5).returncode == 0,
                       "dbus-daemon socket", self.dbus,
                       os.path.join(self.workdir, "dbus.log"))

        conf = os.path.join(self.workdir, "avahi-daemon.conf")
        allow = f'allow-interfaces={",".join(interfaces)}' if interfaces else ""
        with open(conf, "w") as f:
            f.write(AVAHI_CONF.format(hostname=self.hostname,
                                      ipv6="yes" if ipv6 else "no",
                                      allow=allow))
        log_path = os.path.join(self.workdir, "avahi.log")
        log = open(log_path, "w")
        self.avahi = self.popen(["avahi-daemon", "--no-drop-root",
                                 "--no-chroot", "--no-proc-title", "-f", conf],
                                stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        # avahi says so on stderr once it has probed its host name; the
        # D-Bus API answers from then on.
        self._wait_for(lambda: "Server startup complete" in read_text(log_path),
                       "avahi-daemon startup", self.avahi, log_path)

    def _wait_for(self, ready, what, proc, log_path,
                  timeout=AVAHI_READY_TIMEOUT):
        def ready_or_exited():
            if ready():
                return True
            if proc.poll() is not None:
                raise RuntimeError(f"{self.hostname}: {what}: process exited "
                                   f"{proc.returncode}: {read_text(log_path)[-2000:]}")
            return False

        wait_until(ready_or_exited, timeout,
                   lambda: (f"{self.hostname}: {what}: not ready after "
                            f"{timeout} s: {read_text(log_path)[-2000:]}"),
                   error=RuntimeError)

    def stop_avahi(self):
        """End this host's avahi and bus (e.g. to test the fallback)."""
        for proc in (self.avahi, self.dbus):
            if proc is not None:
                stop_pid(proc, timeout=END_GRACE)
        self.avahi = self.dbus = None

    def cleanup(self):
        """End every process this host started, newest first, by pid."""
        for proc in reversed(self._children):
            stop_pid(proc, timeout=END_GRACE)
        self._children.clear()
        self.avahi = self.dbus = None
        if self.holder is not None:
            stop_pid(self.holder, timeout=END_GRACE)
            for stream in (self.holder.stdout, self.holder.stderr):
                stream.close()
            self.holder = None

    def __repr__(self):
        return f"Host({self.hostname}, {self.netns}, {self.address})"


def _comm(pid):
    return read_text(f"/proc/{pid}/comm").strip()


class TestNetwork:
    """Context manager building the hosts of one network; cleans up on exit.

    avahi: one bool per host (or one bool for all): run an avahi daemon there.
    single: one host with loopback only (multicast enabled on lo, a
    224.0.0.0/4 route on it), instead of the two-host veth network.
    ipv6: let avahi use IPv6 too (link-local addresses on the veth).
    routed: A and B on two subnets with a router R between them
    (net.router; forwarding on, each host's default route through it), so
    that multicast does not reach from one to the other.
    hosts: N hosts (1 to MAX_HOSTS) on one link instead: each host's veth0
    (10.202.0.1, 10.202.0.2, ...) is a port of one bridge in a namespace of
    its own (net.switch), which floods multicast to every port, so that
    each host's multicast DNS reaches all the others.
    """

    __test__ = False   # not a pytest test class despite the name

    def __init__(self, avahi=False, single=False, ipv6=False, routed=False, hosts=None):
        if hosts is not None and (single or routed):
            raise ValueError("hosts= is a network of its own: not with single or routed")
        if hosts is not None and not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts= takes 1 to {MAX_HOSTS} hosts")
        count = hosts if hosts is not None else 1 if single else 2
        if isinstance(avahi, bool):
            avahi = (avahi,) * count
        if len(avahi) != count:
            raise ValueError("one avahi flag per host")
        self.avahi_flags = tuple(avahi)
        self.single = single
        self.ipv6 = ipv6
        self.routed = routed
        self.bridged = hosts is not None
        self.router = None
        self.switch = None            # the bridge's namespace (bridged network)
        self.hosts = []
        self._netns = []
        self._workdir = None

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False

    def _build(self):
        self._workdir = tempfile.mkdtemp(prefix="stap-netns-")
        tag = f"stapt{os.getpid()}x{next(_counter)}"
        count = len(self.avahi_flags)
        for i in range(count):
            name = f"{tag}{host_letter(i)}"
            _check(["ip", "netns", "add", name])
            self._netns.append(name)
            _check(["ip", "-n", name, "link", "set", "lo", "up"])
            workdir = os.path.join(self._workdir, host_name(i))
            os.mkdir(workdir)
            if self.bridged:
                address = f"{BRIDGED_SUBNET}.{i + 1}"
            else:
                address = "127.0.0.1" if self.single else \
                    (ROUTED_ADDRESSES if self.routed else HOST_ADDRESSES)[i]
            self.hosts.append(Host(name, host_name(i), address, workdir))

        if self.single:
            self._setup_loopback(self._netns[0])
        elif self.routed:
            self.router = self._setup_router(f"{tag}r")
        elif self.bridged:
            self.switch = self._setup_bridge(f"{tag}sw")  # hosts end in one letter
        else:
            self._setup_veth(*self._netns)

        for host, avahi in zip(self.hosts, self.avahi_flags):
            host.start_holder()
            if avahi:
                host.start_avahi(ipv6=self.ipv6)

    @staticmethod
    def _setup_veth(ns_a, ns_b):
        # Create the pair directly inside the namespaces: nothing appears in
        # the root namespace, and both ends can share one name.
        _check(["ip", "-n", ns_a, "link", "add", VETH, "type", "veth",
                "peer", "name", VETH, "netns", ns_b])
        for ns, address in ((ns_a, HOST_ADDRESSES[0]), (ns_b, HOST_ADDRESSES[1])):
            _check(["ip", "-n", ns, "addr", "add",
                    f"{address}/{SUBNET_PREFIX}", "dev", VETH])
            _check(["ip", "-n", ns, "link", "set", VETH, "up"])
            _check(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", VETH])

    def _setup_router(self, name):
        """R, joined to A and to B by a veth pair each, forwarding between
        them; A and B route everything through it."""
        _check(["ip", "netns", "add", name])
        self._netns.append(name)
        _check(["ip", "-n", name, "link", "set", "lo", "up"])
        _check(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        for host, ours, theirs, side in zip(self.hosts, ROUTER_ADDRESSES, ROUTED_ADDRESSES, "ab"):
            _check(["ip", "-n", host.netns, "link", "add", VETH, "type", "veth",
                    "peer", "name", f"veth{side}", "netns", name])
            _check(["ip", "-n", host.netns, "addr", "add", f"{theirs}/{SUBNET_PREFIX}",
                    "dev", VETH])
            _check(["ip", "-n", name, "addr", "add", f"{ours}/{SUBNET_PREFIX}",
                    "dev", f"veth{side}"])
            for ns, dev in ((host.netns, VETH), (name, f"veth{side}")):
                _check(["ip", "-n", ns, "link", "set", dev, "up"])
            _check(["ip", "-n", host.netns, "route", "add", "default", "via", ours])
        workdir = os.path.join(self._workdir, ROUTER_NAME)
        os.mkdir(workdir)
        router = Host(name, ROUTER_NAME, ROUTER_ADDRESSES[0], workdir)
        router.start_holder()
        return router

    def _setup_bridge(self, name):
        """The switch: a namespace holding only a bridge, with one veth pair
        to each host (port-a, port-b, ... there; veth0 in the host)."""
        _check(["ip", "netns", "add", name])
        self._netns.append(name)
        _check(["ip", "-n", name, "link", "set", "lo", "up"])
        # No spanning tree and no forward delay: a port forwards as soon as
        # it is up.  No multicast snooping: every multicast frame goes out of
        # every other port, whatever groups the hosts joined (the bridge
        # sends no IGMP queries of its own to learn them anyway).
        _check(["ip", "-n", name, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0",
                "forward_delay", "0", "mcast_snooping", "0"])
        _check(["ip", "-n", name, "link", "set", BRIDGE, "up"])
        for i, host in enumerate(self.hosts):
            # Made inside the namespaces, as for the two-host pair: nothing
            # appears in the root namespace.
            port = f"port-{host_letter(i)}"
            _check(["ip", "-n", host.netns, "link", "add", VETH, "type", "veth",
                    "peer", "name", port, "netns", name])
            _check(["ip", "-n", name, "link", "set", port, "master", BRIDGE])
            _check(["ip", "-n", name, "link", "set", port, "up"])
            _check(["ip", "-n", host.netns, "addr", "add", f"{host.address}/{SUBNET_PREFIX}",
                    "dev", VETH])
            _check(["ip", "-n", host.netns, "link", "set", VETH, "up"])
            _check(["ip", "-n", host.netns, "route", "add", "224.0.0.0/4", "dev", VETH])
        workdir = os.path.join(self._workdir, SWITCH_NAME)
        os.mkdir(workdir)
        # No holder: nothing runs on the switch (run() there is `ip netns exec`).
        return Host(name, SWITCH_NAME, None, workdir)

    @staticmethod
    def _setup_loopback(ns):
        # lo carries no multicast by default; avahi ignores loopback
        # interfaces entirely, so a single host's avahi sees only its own
        # services (which it reports to local browsers anyway).
        _check(["ip", "-n", ns, "link", "set", "lo", "multicast", "on"])
        _check(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "lo"])

    def cleanup(self):
        """End all processes, delete the namespaces and the scratch dir."""
        for host in self.hosts + [h for h in (self.router, self.switch) if h]:
            with contextlib.suppress(Exception):
                host.cleanup()
        for name in self._netns:
            subprocess.run(["ip", "netns", "del", name],
                           stdin=subprocess.DEVNULL, capture_output=True)
        self._netns.clear()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def logs(self):
        """The daemons' logs, for assertion messages."""
        out = []
        for host in self.hosts:
            for name in ("dbus.log", "avahi.log"):
                text = read_text(os.path.join(host.workdir, name))
                if text:
                    out.append(f"--- {host.hostname} {name}\n{text}")
        return "\n".join(out)


# -- pytest fixtures (import them into a test module or conftest) ----------

try:
    import pytest
except ImportError:        # the harness itself needs no pytest
    pytest = None

if pytest is not None:
    def _require(avahi):
        reason = avahi_skip_reason() if avahi else skip_reason()
        if reason:
            pytest.skip(reason)

    @pytest.fixture
    def network_factory():
        """make(**TestNetwork options) -> a network, cleaned up after the
        test; skips the test when the machine cannot build it."""
        with contextlib.ExitStack() as stack:
            def make(avahi=False, **kwargs):
                flags = (avahi,) if isinstance(avahi, bool) else avahi
                _require(any(flags))
                return stack.enter_context(TestNetwork(avahi=avahi, **kwargs))
            yield make
