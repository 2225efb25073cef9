#!/usr/bin/python3
"""Server side of the systemtap compile server.

Commands (chosen by the name this file is run under, or by the first
argument when run as ``python3 stap_server.py COMMAND ...``):

  stap-serverd [OPTIONS]               the server itself, in the foreground
  stap-start-server [OPTIONS]          start stap-serverd detached; print its pid
  stap-stop-server PID                 stop a server started by stap-start-server
  stap-find-or-start-server [OPTIONS]  0 if a compatible server exists, else start one

Data flows top to bottom: options -> the server certificate -> a request
(TLS, archive, the real stap) -> the reply -> the listener -> commands.
"""

import argparse
import calendar
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import enum
import errno
import functools
import hashlib
import io
import ipaddress
import itertools
import json
import logging
import logging.handlers
import lzma
import os
import pathlib
import posixpath
import pwd
import re
import resource
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import stap_client as client
from stap_client import CertDB, Error, Limits, ReplyContent  # the names the server uses most

try:  # the built-in multicast DNS responder needs dnspython
    dns = client.require_dnspython()
except client.DiscoveryError:
    dns = None

PROG = "stap-serverd"
_RENEW_BEFORE = 30 * 86400  # renew a certificate expiring within 30 days
_START_TIMEOUT = 30  # stap-start-server's bound, key generation included
_COMPILE_ACCOUNT = "stap-compile"  # a root server's compile step runs as this account

# Resource limits of every compile: (option suffix, default, unit, what it bounds).
COMPILE_LIMITS = (
    ("file-size", 512 << 20, "BYTES", "largest file one compile process may write"),
    ("memory", 8 << 30, "BYTES", "address space of each compile process"),
    ("processes", 256, "N", "processes of one compile at once"),
    ("cpu", 900, "SECONDS", "CPU time of each compile process"),
    ("disk", 1 << 30, "BYTES", "everything one compile writes in its request directory"),
)

# Every option that names a file or directory is one of these two (a unit test holds the parser to
# it).  A secret's file is masked wherever the compile's sandbox would show it, and the server
# refuses to start unless only its own account can read and write it.
SECRET_FILE_OPTIONS = ("--tsig-key",)
# The server's own database, log and directories (masked by private_paths), and the trees the
# compile is meant to read (--build-env: a build environment's root, the compile's view of /).
OTHER_PATH_OPTIONS = ("--ssl", "--log", "-R", "-I", "--tmpdir", "--cache-dir", "--build-env",
                      "--kernel-cache")
# The options that change a compiled module or its reply, each with the configuration field that
# brings it into result_key's digest; a unit test holds every other option to its list of the rest.
OUTPUT_OPTIONS = {"-R": "stap_options", "-I": "stap_options", "-B": "stap_options",
                  "-D": "stap_options", "--user": "user", "--ssl": "db", "--no-sandbox": "sandbox",
                  "--build-env": "build_envs", "--cache-dir": "cache_dir"}
LOG_MODE, LOG_DIR_MODE = 0o640, 0o750  # the log names every client and the start of every script

# --------------------------------------------------------------------------
# Server configuration
# --------------------------------------------------------------------------


class _OptionParser(argparse.ArgumentParser):
    """argparse, but a bad option is our one-line error with exit status 1."""

    def error(self, message):
        raise Error(message)


def build_option_parser(prog):
    p = _OptionParser(prog=prog, description="A systemtap compile server: runs stap passes 1-4 "
                      "for trusted clients over TLS and returns a signed reply.",
                      epilog="Also runs as: python3 stap_server.py stap-serverd OPTIONS")
    add = p.add_argument
    add("--port", type=int, default=0, help="TCP port (default: one the kernel picks)")
    add("--listen", default="::", metavar="ADDR",
        help="address to listen on (default: every address, IPv4 and IPv6)")
    add("--ssl", metavar="DIR", help="server certificate database (default: "
        "$sysconfdir/systemtap/ssl/server for root, $SYSTEMTAP_DIR/ssl/server otherwise)")
    add("--log", metavar="FILE", help="log file")
    add("-r", dest="releases", action="append", default=[], metavar="RELEASE",
        help="serve this kernel release (repeatable; default: the running kernel)")
    add("-i", dest="installed", action="store_true",
        help="serve every kernel release whose build tree is installed (with any -r)")
    add("--fetch-kernels", action="store_true", help="serve any release the host's package "
        "archive carries: fetch its headers with apt-get download (as this account, never "
        "root) into the kernel cache when a request names one not installed")
    add("--kernel-cache", metavar="DIR", help="where fetched kernels are kept (default: the "
        "--cache-dir directory's name with -kernels added)")
    add("--kernel-cache-size", type=int, default=8 << 30, metavar="BYTES",
        help="bound of the kernel cache, least recently used out first (default 8 GiB)")
    add("-a", dest="arch", help="serve this architecture (default: this machine's)")
    add("-R", dest="runtime", metavar="DIR", help="stap runtime directory")
    add("-I", dest="includes", action="append", default=[], metavar="DIR",
        help="extra tapset directory (repeatable)")
    add("-B", dest="kbuild", action="append", default=[], metavar="OPT",
        help="option for kbuild make (repeatable)")
    add("-D", dest="defines", action="append", default=[], metavar="NAME=VAL",
        help="macro for the generated C code (repeatable)")
    add("--max-threads", type=int, default=os.cpu_count() or 1, metavar="N",
        help="concurrent compiles (default: CPU count)")
    add("--max-wait", type=float, default=900, metavar="SECONDS",
        help="requests wait for a compile slot in arrival order; one whose expected wait "
        "(from recent compile times) is longer gets a 'busy' reply (default 900)")
    add("--queue", type=int, default=None, metavar="N", help="at most N requests waiting "
        "for a compile slot (default: no limit but --max-wait and --max-pending-bytes)")
    add("--user", metavar="NAME", help="account that runs the compile step when started as "
        f"root (default: {_COMPILE_ACCOUNT}; never root or nobody)")
    add("--no-sandbox", dest="sandbox", action="store_false",
        help="run stap without bubblewrap (unsafe: warned at start and in every log line)")
    add("--allow-guru", action="store_true", help="let clients use guru mode (-g, embedded "
        "C); such compiles stay sandboxed, use a throw-away stap cache and are never cached")
    add("--build-env", dest="build_envs", action="append", default=[], metavar="NAME=DIR",
        help="also build with the systemtap of the root file system DIR, owned by root or the "
        "server's account and not writable by others (repeatable; tools/make-build-env makes "
        "one): each request goes to the environment on its client's side of stap 5.0")
    # The real stap-serverd's names and meanings, so that configurations carry over (its
    # defaults, 5 KB and 50 KB, would refuse ordinary -I tapset trees).
    add("--max-compressed-request", type=int, default=16 << 20, metavar="BYTES",
        help="largest request as sent, compressed (default 16 MiB)")
    add("--max-request-size", "--max-unpacked-size", dest="max_request_size", type=int,
        default=256 << 20, metavar="BYTES", help="largest request once unpacked (default 256 MiB)")
    add("--max-pending-bytes", type=int, default=256 << 20, metavar="BYTES",
        help="disk held by the requests not answered yet, all clients together: as sent while "
        "they are received or wait, as unpacked while they compile (default 256 MiB); past it "
        "a request gets a busy reply")
    add("--tmpdir-min-free", type=int, default=None, metavar="BYTES",
        help="free space to keep in --tmpdir: a request that would leave less gets a busy reply "
        "(default: 5%% of its file system, at most 1 GiB)")
    add("--io-timeout", type=float, default=30, metavar="SECONDS",
        help="request read limit (default 30)")
    add("--handshake-timeout", type=float, default=5, metavar="SECONDS",
        help="TLS handshake limit (default 5)")
    add("--max-per-address", type=int, default=16, metavar="N", help="connections one client "
        "address (an IPv6 /64) may have open before its request is read (default 16)")
    add("--compile-timeout", type=float, default=900, metavar="SECONDS",
        help="wall-clock limit of one stap run (default 900)")
    for name, default, unit, what in COMPILE_LIMITS:
        add(f"--compile-{name}", type=int, default=default, metavar=unit,
            help=f"{what} (default {default})")
    add("--result-cache-size", type=int, default=64 << 20, metavar="BYTES",
        help="memory for replies to repeat requests (default 64 MiB; 0: off)")
    add("--renew-check", type=float, default=3600, metavar="SECONDS", help="how often a "
        "running server checks whether its certificate expires within 30 days and renews it "
        "(default 3600)")
    add("--tmpdir", metavar="DIR", help="where request directories go")
    add("--cache-dir", metavar="DIR", help="where the server keeps what stap learns once per "
        "kernel (its configuration header, made by a warm-up run of the server's own), read-only "
        "to compiles (default: /var/cache/stap-server for root, "
        "$SYSTEMTAP_DIR/compile-cache otherwise)")
    add("--dns-update", metavar="ZONE", help="also register in this DNS zone (wide-area "
        "DNS-SD, for clients on other subnets) by DNS UPDATE signed with --tsig-key, sent to "
        "--dns-server; the records go when the server stops")
    add("--dns-server", metavar="ADDRESS[:PORT]",
        help="the primary server of the --dns-update zone")
    add("--tsig-key", metavar="FILE", help="the TSIG key that the zone accepts updates with "
        "(BIND's key statement, as tsig-keygen writes it)")
    add("--load-refresh", type=float, default=10, metavar="SECONDS",
        help="refresh the advertised load hint at most this often (default 10)")
    add("--advertise", choices=("auto", *LINK_PUBLISHERS, "none"), default="auto",
        help="how to announce the server (default: avahi if running, else the built-in "
        "mDNS responder)")
    return p


def _state_dir(kind):
    """Where this user's status ("run"), log ("log") and stap knowledge ("cache") files live."""
    system, own = {"run": ("/run/stap-server", "run"), "log": ("/var/log/stap-server", "log"),
                   "cache": ("/var/cache/stap-server", "compile-cache")}[kind]
    return system if client.is_root() else os.path.join(client.systemtap_dir(), own)


def _status_path(pid):
    return os.path.join(_state_dir("run"), f"stap-serverd.{pid}.json")


def parse_config(argv, prog=PROG):
    """The server's configuration, a frozen ServerConfig: its options, checked, with what they imply
    filled in (defaults that depend on the user, the database, the compile account, the archive
    limits, the options every stap run gets); built once, never changed."""
    o = build_option_parser(prog).parse_args(argv)
    limits = {n: getattr(o, f"compile_{n}".replace("-", "_")) for n, *_ in COMPILE_LIMITS}
    for name in ["max-threads", "max-per-address", "max-compressed-request", "max-request-size",
                 "max-pending-bytes"] + [f"compile-{n}" for n in limits]:
        if getattr(o, name.replace("-", "_")) < 1:
            raise Error(f"--{name} must be at least 1")
    if o.fetch_kernels and not o.sandbox:
        raise Error("--fetch-kernels needs the sandbox: only there is a fetched kernel "
                    "presented as installed (drop --no-sandbox)")
    if o.fetch_kernels and client.is_root():
        raise Error("--fetch-kernels: apt and dpkg-deb never run as root for a client; start "
                    "the server as an unprivileged account (the packaged unit's stap-server)")
    tmpdir = os.path.abspath(o.tmpdir or tempfile.gettempdir())
    cache_dir = os.path.abspath(o.cache_dir or _state_dir("cache"))
    db = CertDB(o.ssl or client.server_db_path())
    runtime = o.runtime and os.path.abspath(o.runtime)
    includes = tuple(map(os.path.abspath, o.includes))
    derived = dict(  # each field of one type, whatever the options were
        releases=tuple(_served_releases(o.releases, o.installed, o.fetch_kernels)), tmpdir=tmpdir,
        compile_limits=limits, arch=o.arch or os.uname().machine, cache_dir=cache_dir,
        stap_options=tuple((["-R", runtime] if runtime else [])
                           + [x for d in includes for x in ("-I", d)]
                           + [x for b in o.kbuild for x in ("-B", b)]
                           + [x for d in o.defines for x in ("-D", d)]),
        log=o.log or os.path.join(_state_dir("log"), "stap-server.log"), runtime=runtime,
        user=compile_user(o.user),  # its passwd entry; None: compiles run as the server's own user
        limits=Limits(max_total_bytes=o.max_request_size,  # else the client's bounds
            too_large="Uncompressed request size of {total} bytes is not within the expected "
            "range of 1 to {limit} bytes (--max-request-size)"),  # the real server's words
        tmpdir_min_free=_default_min_free(tmpdir) if o.tmpdir_min_free is None
        else o.tmpdir_min_free,
        db=db, dns_update=dns_update_target(o),  # (zone, server, port, key file) or None
        build_envs=tuple(map(build_env_option, o.build_envs)),  # their versions: at start
        includes=includes, kernel_cache=os.path.abspath(o.kernel_cache or cache_dir + "-kernels"))
    for option, path in secret_files(o):
        check_secret_file(option, path)
    if o.build_envs and not o.sandbox:
        raise Error("--build-env needs the sandbox: it is the compile's view of the environment")
    return ServerConfig(**{**vars(o), **derived, "mok_info": MokStore(db.path).check()})


# --------------------------------------------------------------------------
# Build environments: root file systems holding another systemtap
# --------------------------------------------------------------------------

_HOST_ENV = "host"  # the default environment: the host's own system directories


@dataclasses.dataclass(frozen=True)
class BuildEnv:
    name: str
    root: str  # "/" for the host
    version: str = None  # its stap's version, asked at start


def build_env_option(value):
    """A --build-env NAME=DIR, checked: DIR a directory (not a link) owned by root or the server's
    account that group and others cannot write (its programs run every compile)."""
    name, sep, root = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name == _HOST_ENV or not root:
        raise Error(f"--build-env {value}: expected NAME=DIR, NAME letters, digits, '_.-' "
                    f"(not '{_HOST_ENV}')")
    root = os.path.abspath(root)
    try:
        st = os.lstat(root)
    except OSError as e:
        raise Error(f"--build-env {value}: {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise Error(f"--build-env {value}: {root} must be a directory (not a link) owned by root "
                    f"or uid {os.geteuid()} that group and others cannot write")
    return BuildEnv(name, root)


def _version_distance(a, b):
    """How far apart two versions are: 5.3 is closer to 6.0 than 5.1 is."""
    (a1, a2), (b1, b2) = client.version_tuple(a), client.version_tuple(b)
    return abs((a1 - b1) * 1000 + a2 - b2)


def choose_build_env(envs, req):
    """The environment for req: one whose stap is on the client's side of the 5.0 runtime boundary,
    the closest version first (the first listed, the host, among equals); for passes 1-3 the
    closest of all when no environment is on its side; Error when a module is wanted and none
    is."""
    new = client.new_runtime
    side = [e for e in envs if new(e.version) == new(req.version)]
    if not side and builds_module(req):  # pass 4, or pass 5 lowered to it
        have = ", ".join(sorted({e.version for e in envs}, key=client.version_tuple))
        need = "5.0 or later" if new(req.version) else "older than 5.0"
        raise Error(f"this server builds modules with stap {have}; a systemtap {req.version} "
                    f"client needs one built by stap {need} (its staprun cannot run the "
                    "others); passes 1-3 work")
    return min(side or envs, key=lambda e: _version_distance(e.version, req.version))


def kernel_trees(release):
    """The host's directories that make up release's kernel tree, as real paths: /lib/modules/REL,
    the trees its links name (build, source) and those the top-level links of these name (Debian:
    the -common twin, linux-kbuild's scripts and tools)."""
    top = os.path.realpath(f"/lib/modules/{release}")
    trees = [top] if os.path.isdir(top) else []
    for tree in trees:  # grows as links name more
        try:
            links = [e.path for e in os.scandir(tree) if e.is_symlink()]
        except OSError:
            continue
        for target in map(os.path.realpath, links):
            if os.path.isdir(target) and not any(target == t or inside(target, t) for t in trees):
                trees.append(target)
    return trees


def _make_mount_points(env, releases):
    """Empty directories in env's root where the sandbox shows the host's kernel trees (bwrap
    cannot make them under a read-only bind); Error when the server may not make them."""
    for tree in (t for r in releases for t in kernel_trees(r)):
        try:
            os.makedirs(_rooted(env.root, tree), 0o755, exist_ok=True)
        except OSError as e:
            raise Error(f"--build-env {env.name}: cannot make the mount point "
                        f"{_rooted(env.root, tree)}: {e.strerror}") from None


def _rooted(root, path):
    return os.path.join(root, path.lstrip("/"))


def system_view(root, releases):
    """bwrap's binds of the system directories: root's (the host's: "/") read-only at /usr, /etc...
    and, for another root, the host's kernel trees of releases read-only at their own paths on top
    (the headers the server serves).  Returns (argv, binds: (host path, where the sandbox shows
    it))."""
    argv, binds = [], []
    for d in _SYSTEM_DIRS:
        source = _rooted(root, d)
        if os.path.islink(source):
            argv += ["--symlink", os.readlink(source), d]
        elif os.path.isdir(source):
            argv += ["--ro-bind", source, d]
            binds.append((source, d))
    if root != "/":
        for tree in (t for r in releases for t in kernel_trees(r)):
            argv += ["--ro-bind", tree, tree]
            binds.append((tree, tree))
    return argv, binds


def _default_min_free(tmpdir):
    """5 % of the temporary directory's file system, at most 1 GiB (0 when it cannot be asked)."""
    try:
        st = os.statvfs(tmpdir)
    except OSError:
        return 0
    return min(st.f_blocks * st.f_frsize // 20, 1 << 30)


def dns_update_target(opts):
    """(zone, server address, port, key file) for --dns-update, or None."""
    given = [opts.dns_update, opts.dns_server, opts.tsig_key]
    if not any(given):
        return None
    if not all(given):
        raise Error("--dns-update, --dns-server and --tsig-key go together")
    host, port = client.parse_server_spec(opts.dns_server)
    return (opts.dns_update.rstrip(".") + ".", host, port or 53, os.path.abspath(opts.tsig_key))


def secret_files(config):
    """(option, absolute path) of each file that a SECRET_FILE_OPTIONS option names."""
    return [(o, os.path.abspath(v)) for o in SECRET_FILE_OPTIONS
            if (v := getattr(config, o.lstrip("-").replace("-", "_"), None))]


def check_secret_file(option, path):
    """Refuse a secret file that is a link, not a regular file, another account's, or open to
    group or others: one line naming the file and the fix."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise Error(f"cannot read {option} {path}: {e.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise Error(f"{option} {path} is a symbolic link; name the key file itself (mode 0600, "
                    "the server account's)")
    if not stat.S_ISREG(st.st_mode):
        raise Error(f"{option} {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise Error(f"{option} {path} belongs to uid {st.st_uid}, not to the server's account "
                    f"(uid {os.geteuid()}); give the server a copy of its own: as uid "
                    f"{os.geteuid()}, install -m 600 {path} NEWFILE")
    if mode & 0o066:
        raise Error(f"{option} {path}: group or others may read or write it (mode {mode:04o}); "
                    f"chmod 600 {path}")


def _served_releases(requested, installed=False, fetching=False):
    """The requested releases (default: the running one, unless installed) that have a build tree,
    with installed every release that has one.  A fetching server needs none: it fetches the others
    when asked."""
    releases = requested or ([] if installed else [os.uname().release])
    if installed:
        releases += sorted(set(installed_releases()) - set(releases))
        if not releases and not fetching:
            raise Error("-i: no kernel build tree is installed (/lib/modules/*/build)")
    usable = [r for r in releases if os.path.isdir(f"/lib/modules/{r}/build")]
    missing = sorted(set(releases) - set(usable))
    if fetching:
        return usable
    if not usable:
        raise Error(f"no kernel build tree for {', '.join(missing)} "
                    "(install its headers, or name an installed release with -r)")
    for r in missing:
        logging.warning("not serving %s: no build tree /lib/modules/%s/build", r, r)
    return usable


# What a server that is not root needs to compile as another account, as a root server does: hand
# it the request directory (chown), read back and remove what it left there (dac_override), stop it
# (kill) and become it (setgid, setuid).  The packaged unit gives its account these.
_SWITCH_CAPABILITIES = {"chown": 0, "dac_override": 1, "kill": 5, "setgid": 6, "setuid": 7}


def _can_switch_user():
    """Root, or a server holding every capability that compiling as another account takes."""
    if client.is_root():
        return True
    with open("/proc/self/status") as f:  # CapEff: the capability bits this process has in effect
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return all(caps >> bit & 1 for bit in _SWITCH_CAPABILITIES.values())


def _drop_ambient_capabilities():
    """No program the server runs inherits its capabilities: a process switched to the compile
    account keeps them up to its exec, and an ambient set would carry them through it."""
    pr_cap_ambient, pr_cap_ambient_clear_all = 47, 4
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_cap_ambient, pr_cap_ambient_clear_all, 0, 0, 0)
def installed_releases():
    """Every release with a build tree, /lib/modules/RELEASE/build, that is a plain release name."""
    try:
        names = os.listdir("/lib/modules")
    except OSError:
        return []
    return [r for r in names if client.is_release_name(r)
            and os.path.isdir(f"/lib/modules/{r}/build")]


def compile_user(name):
    """The passwd entry of the dedicated account a root (or capable) server compiles as; None: as
    ourselves.  Never root, never the shared nobody (whatever else runs as that account could
    tamper with compiles) and never the server's own account, which owns its key."""
    if not _can_switch_user():
        if name:
            raise Error("--user needs a server started by root or holding the capabilities "
                        + ", ".join(f"CAP_{c.upper()}" for c in _SWITCH_CAPABILITIES))
        return None
    name = name or _COMPILE_ACCOUNT
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise Error(f"no compile account {name} (create it with: useradd --system "
                    f"--no-create-home --shell /usr/sbin/nologin {name}; or name "
                    "another with --user)") from None
    if pw.pw_uid == 0 or pw.pw_name == "nobody":
        raise Error(f"--user {name}: the compile account must be a dedicated "
                    "unprivileged account, not root or nobody")
    if pw.pw_uid == os.geteuid():
        raise Error(f"--user {name}: the compile account must not be the server's own, "
                    "which owns its key")
    return pw


# --------------------------------------------------------------------------
# The server certificate
# --------------------------------------------------------------------------

def ensure_server_certificate(db):
    """The server's certificate DER: made on first start, renewed when it expires within 30 days;
    trusted in the local client database."""
    if not db.exists():
        logging.info("creating certificate database %s", db.path)
        db.create(mode=0o700)
    db.check_permissions(owner=os.geteuid(), secret=True)
    der = newest_certificate(db)
    if der is None or expires_within(der, _RENEW_BEFORE):
        der = _generate_certificate(db)
        logging.info("new server certificate: serial %s, SHA-256 fingerprint %s", certinfo(der),
                     client.fingerprint(der))
    if client.read_entry(db.path, client.SERVER_CERT_FILE) != der:  # users copy it to trust us
        _replace_file(os.path.join(db.path, client.SERVER_CERT_FILE), der)
    _trust_locally(der)
    return der


def newest_certificate(db):
    return max(db.certificates(), key=not_after, default=None)


def not_after(der):
    """Expiry of a certificate as a Unix time, read from its DER (NSS is not initialised yet when
    the server checks its certificate)."""
    try:
        _, _, start, end = client.tbs_fields(der).validity
        _not_before, (_, _, start, end) = client.der_children(der, start, end)
        stamp = der[start:end].decode()
        fmt = "%y%m%d%H%M%SZ" if len(stamp) == 13 else "%Y%m%d%H%M%SZ"  # UTC/GeneralizedTime
        return calendar.timegm(time.strptime(stamp, fmt))
    except (IndexError, ValueError):
        raise Error("cannot read the certificate's validity") from None


def expires_within(der, seconds):
    return not_after(der) - time.time() < seconds


def _generate_certificate(db):
    """A self-signed RSA-3072/SHA-256 certificate valid for a year, replacing any older one; the
    subject is the one every stap server shares."""
    host = socket.gethostname()
    db.make_self_signed(client.SERVER_NICKNAME, client.SERVER_SUBJECT,
                        dict.fromkeys([host, f"{host.split('.')[0]}.local", "localhost"]))
    der = newest_certificate(db)
    if der is None:
        raise Error(f"certutil made no certificate in {db.path}")
    return der


def _replace_file(path, data):
    """Write a file readable by all, whole or not at all: readers never see half of it."""
    with open(os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
        os.fchmod(f.fileno(), 0o644)  # whatever the umask
        f.write(data)
    os.replace(path + ".new", path)


def _trust_locally(der):
    """Trust our certificate in this user's (root: every user's) client database, creating it if
    missing and never wiping it."""
    db = CertDB(client.local_client_db_path())
    if not db.exists() or der not in db.certificates():
        client.add_certificate(der, db.path)
        logging.info("trusted the server certificate in %s", db.path)


# --------------------------------------------------------------------------
# Request handling: archive in, the real stap, reply out
# --------------------------------------------------------------------------

_MAX_ARGV_BYTES = 1 << 20  # all of stap's arguments; the kernel allows 2 MiB with the environment
_MAX_ARG_BYTES = (128 << 10) - 1  # one argument (the kernel's MAX_ARG_STRLEN)
@dataclasses.dataclass
class Request:
    version: str
    release: str
    arch: str
    args: list
    env: dict
    lowered: bool  # the client wants pass 5, which it runs itself
    guru: bool = False  # guru mode or embedded C, allowed by --allow-guru
    signed: bool = False  # built for stapusr/stapsys: staprun wants our signature
    notices: bytes = b""  # the server's own words for the client's stderr
    moks: tuple = ()  # the client's enrolled systemtap MOKs (or "missing"): sign for Secure Boot
    build_env: "BuildEnv" = None  # where it compiles (None: the host), chosen per request
    kernel: object = None  # a FetchedKernel, for a release that is not installed
    traces: bool = False  # its scripts name kernel.trace: it waits for the tracepoint queries


def parse_request(archive, config):
    """Read a request from its archive (a client.RequestArchive), nothing unpacked yet; raise Error
    with the line the client sees."""
    read = archive.read
    version = (read("version") or b"").decode(errors="replace").strip() or "1.0"
    sysinfo = (read("sysinfo") or b"").decode(errors="replace").strip()
    m = re.match(r"^sysinfo:\s*(\S+)\s+(\S+)$", sysinfo)
    if not m:
        raise Error("request has no valid sysinfo entry")
    names = list(itertools.takewhile(archive.size, (f"argv{n}" for n in itertools.count(1))))
    if not names:
        raise Error("request has no argv1 entry")
    check_argv_size([archive.size(n) for n in names])
    args = [read(n).decode("utf-8", "surrogateescape") for n in names]
    release, arch = m.group(1), m.group(2)
    args, release, lowered, scripts = client_arguments(args, archive, release)
    _check_release(release, "release")
    options = args[:args.index("--")] if "--" in args else args
    signed = any(a in ("--privilege=stapusr", "--privilege=stapsys", "--unprivileged")
                 for a in options)
    if release not in config.releases and not config.fetch_kernels:
        raise Error(f"this server does not serve {release} {arch} (it serves "
                    + ", ".join(f"{r} {config.arch}" for r in config.releases) + ")")
    passes = [a[2:] for a in options if re.fullmatch(r"-p[1-5]", a)]
    if arch != config.arch and passes and passes[-1] == "4":  # stap parses for any arch here
        raise Error(f"this server builds {config.arch} modules only: stap cannot build for "
                    f"{arch} here (passes 1-3 for {arch} work)")
    guru = guru_reason(args, itertools.chain(scripts, _shipped_tapsets(archive)))
    if guru and not config.allow_guru:
        raise Error(f"{guru}: guru mode is not allowed on this server")
    env, notices = locale_env(read("locale"))
    return Request(version, release, arch, args, env, lowered, guru=bool(guru), signed=signed,
                   notices=notices, moks=mok_fingerprints(read("mok_fingerprints")),
                   traces=_names_tracepoints(scripts, archive))


_MOK_FINGERPRINT = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){19}$")  # SHA-1, as mokutil prints it
_MOK_MISSING = "missing"  # the client must sign but has no systemtap MOK enrolled (real clients)
_MAX_MOKS = 64  # fingerprints in one request


def mok_fingerprints(data):
    """The request's mok_fingerprints entry: the SHA-1 fingerprints of the client's enrolled
    systemtap MOKs, lower case, in its order, or ("missing",); () when the client does not need a
    module signed for Secure Boot.  Real servers skip a malformed line; it is refused here, since
    the client would get a module its kernel will not load."""
    lines = [l.strip() for l in (data or b"").decode(errors="replace").splitlines() if l.strip()]
    if len(lines) > _MAX_MOKS:
        raise Error(f"the request names {len(lines)} MOK fingerprints (at most {_MAX_MOKS})")
    for line in lines:
        if line != _MOK_MISSING and not _MOK_FINGERPRINT.match(line.lower()):
            raise Error(f"MOK fingerprint value {ascii(line[:80])} isn't in the correct format "
                        "(a SHA-1 fingerprint as mokutil prints it: 20 hex bytes joined by "
                        f"colons; or '{_MOK_MISSING}')")
    return tuple(dict.fromkeys(l.lower() for l in lines))


def client_arguments(args, archive, release):
    """Check the client's stap arguments and return (arguments to pass, release, lowered, scripts):
    no forbidden options, paths inside the request, pass 5 (a real client sends no -p for it)
    lowered to 4, -k dropped; scripts are the texts stap will parse, as (label, bytes)."""
    out, operands, scripts, listing, last_pass = [], [], [], False, None
    for kind, name, *value in client.scan_stap_args(args):
        value = value[0] if value else None
        if kind == "arg":
            operands.append(name)
            continue
        how = client.treatment(name)
        if how.server == client.LOCAL:
            continue  # the client's own business
        if how.server not in (None, client.PATH):
            raise Error(f"option {name} is not allowed: it {how.server} on the server")
        if name == "-r":
            if "/" in value:
                raise Error(f"-r {value}: a build tree path is not allowed; give a release")
            release = _check_release(value, "-r")
            continue  # the server supplies -r itself
        if how.server == client.PATH:
            _confine(value, archive, name)
        if name == "-m" and not re.match(r"^[A-Za-z0-9_]+$", value):
            raise Error(f"-m {value}: a module name is letters, digits and underscores")
        if name == "-p":
            last_pass = value
            value = "4" if value == "5" else value
        if name == "-e":
            scripts.append(("-e", value.encode("utf-8", "surrogateescape")))
        listing |= name in ("-l", "-L")
        joint = "=" if name.startswith("--") else ""  # --name=value, -Xvalue
        out.append(name if value is None else name + joint + value)
    if not scripts and operands and not listing:
        script = operands.pop(0)
        _confine(script, archive, "script")
        scripts.append((script, archive.read(posixpath.normpath(script)) or b""))  # b"": a dir
        out.append(script)
    lowered = last_pass in (None, "5") and not listing
    if last_pass is None and lowered:
        out.append("-p4")
    if operands:
        out += ["--"] + operands
    return out, release, lowered, scripts


def _check_release(release, what):
    """release, if it is a plain kernel release name; else an Error before anything runs."""
    if not client.is_release_name(release):
        raise Error(f"{what} {_cut(release, 80)!r} is not a kernel release name (letters, digits "
                    "and . _ + ~ -, starting with a letter or digit, no .., at most 64 "
                    "characters)")
    return release


def _confine(path, archive, what):
    """A path must stay inside the request; one that does not exist there is passed on, for stap to
    answer in its own words (a missing script), or ignore (a missing -I directory), as with the real
    server."""
    if not archive.contains(path):
        raise Error(f"{what} path {path} is not inside the request")


def check_argv_size(sizes):
    """stap's argument list (the sizes of its arguments in bytes) must fit the kernel's limits, or
    the exec fails; checked before the arguments are read."""
    longest, total = max(sizes), sum(n + 1 for n in sizes)
    if longest > _MAX_ARG_BYTES or total > _MAX_ARGV_BYTES:
        raise Error(f"the request's arguments are too long ({total} bytes, the longest "
                    f"{longest}; limits {_MAX_ARGV_BYTES} in all, {_MAX_ARG_BYTES} each)")


def _shipped_tapsets(archive):
    """(label, bytes) of every tapset file the client shipped with -I, one at a time: stap parses
    those with guru rights, embedded C included."""
    return ((name, archive.read(name)) for name in archive.files("tapset/")
            if name.endswith((".stp", ".stpm")))


def walk_files(top):
    """The path of every file under top, in a stable order."""
    for root, dirs, files in os.walk(top):
        dirs.sort()
        yield from (os.path.join(root, name) for name in sorted(files))


# stap's lexer, as far as guru checks need it: comments, strings, embedded C.
_STAP_TOKEN = re.compile(rb'(?P<comment>#[^\n]*|//[^\n]*|/\*.*?\*/)'
                         rb'|(?P<string>"(?:[^"\\\n]|\\.)*")|(?P<embedded>%\{)', re.S)
_HEADER_SPEC = re.compile(rb'^"[\w.-]*((?:<[^<>"]+>)+)"$')  # "kernel<linux/sched.h>"


def guru_reason(args, scripts):
    """Why this request needs guru mode or names a server-side file, or None.  The sandbox hides the
    server's files from the compile anyway; this gives the client a reason before stap runs."""
    if "-g" in (args[:args.index("--")] if "--" in args else args):  # clusters already split
        return "option -g"
    for label, text in scripts:
        for m in _STAP_TOKEN.finditer(text):
            if m.group("embedded"):
                return f"embedded C in {label}"
            header = m.group("string") and _HEADER_SPEC.match(m.group("string"))
            if header and any(h.startswith(b"/") or b".." in h.split(b"/")
                              for h in re.findall(rb"<([^<>]+)>", header.group(1))):
                raise Error(f"{label}: header {header.group(1).decode(errors='replace')} "
                            "names a file on the server; name headers relative to the "
                            "kernel or system include directories")
    return None


_LOCALE_VALUE = re.compile(r"^[A-Za-z0-9@_.=-]*$")  # what the real server passes on


def locale_env(data):
    """(the client's locale settings that are safe to pass, the server's words on each line it
    dropped, as the real server says them)."""
    env, notices = {}, []
    for line in (data or b"").decode(errors="replace").splitlines():
        key, eq, value = line.partition("=")
        if not eq:
            notices.append(f"Localization key=value line '{line[:200]}' cannot be parsed")
        elif key not in client.LOCALE_KEYS:
            notices.append(f"Localization key '{key[:200]}' not found in global list")
        elif not _LOCALE_VALUE.match(value):
            notices.append(f"Localization value '{value[:200]}' contains illegal characters")
        else:
            env[key] = value
    return env, "".join(f"Server: {n}\n" for n in notices).encode()


# --------------------------------------------------------------------------
# The compile step: stap in a bubblewrap sandbox, as the compile account
# --------------------------------------------------------------------------

# Where the compile sees its request directory.
_SANDBOX_WORK = "/stap/request"
_STAP_DIR = ".systemtap"  # the compile's SYSTEMTAP_DIR, in work/: stap's cache is its own
# What the compile sees of the host, read-only: programs, libraries, headers, kernel build trees,
# configuration.  Nothing else exists in the sandbox.
_SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SANDBOX_TMPFS = 16 << 20  # the sandbox's /tmp; the real scratch space is the request's tmp/
_MAX_OUTPUT = 16 << 20  # stdout or stderr kept for a reply
_DISK_CHECK_INTERVAL = 0.25  # seconds between looks at a compile's disk use
_STOPPED_COMPILE_CLEANUP = 10  # seconds a stopped compile has to remove its directory


def _stap_program():
    return os.environ.get("SYSTEMTAP_STAP") or "stap"


class Workspace:
    """One request's private directory, owned by the server, mode 0700: the client's files and
    stap's scratch space live in work/, the only part the compile account owns and the only part the
    sandbox sees.  The server reaches into work/ only through descriptors it opened itself, without
    following links."""

    def __init__(self, tmpdir, prefix="stap-server."):
        self.path = tempfile.mkdtemp(prefix=prefix, dir=tmpdir)  # 0700
        self.work = os.path.join(self.path, "work")
        self.work_fd = None
        try:
            os.mkdir(self.work, 0o700)
        except OSError:
            self.remove()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def hand_over(self, account, knowledge=None):
        """Give work/, a fresh work/tmp and stap's own cache for this compile (work/.systemtap,
        holding copies of the kernel's knowledge, {path in stap's cache: bytes}) to the compile
        account; the client's files stay the server's (read-only to the compile)."""
        self.work_fd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        os.mkdir("tmp", 0o700, dir_fd=self.work_fd)
        made = ["tmp"] + self.private_cache(knowledge or {})
        if account is not None:
            # as made above: only the server can write work/ until the fchown below
            for name in made:
                os.chown(name, account.pw_uid, account.pw_gid, dir_fd=self.work_fd,
                         follow_symlinks=False)
            os.fchown(self.work_fd, account.pw_uid, account.pw_gid)
            # bwrap (0.8 resolves even a --bind-fd source by path) runs as the compile account and
            # must get through to work/: traverse only.
            os.chmod(self.path, 0o711)

    def private_cache(self, knowledge):
        """Make work/.systemtap/cache with a copy of each knowledge file in it (0644, the
        server's), or a link for a SharedFile; return the directories made, which the compile
        account gets."""
        try:
            os.mkdir(_STAP_DIR, 0o755, dir_fd=self.work_fd)
        except FileExistsError:
            raise Error(f"request entry {_STAP_DIR} is not allowed: the compile's own stap "
                        "cache goes there") from None
        made = [_STAP_DIR, f"{_STAP_DIR}/cache"]
        os.mkdir(made[1], 0o755, dir_fd=self.work_fd)
        for rel, data in sorted(knowledge.items()):
            sub = f"{made[1]}/{os.path.dirname(rel)}"
            if sub not in made:
                os.mkdir(sub, 0o755, dir_fd=self.work_fd)
                made.append(sub)
            if isinstance(data, SharedFile):
                os.symlink(data.target, f"{made[1]}/{rel}", dir_fd=self.work_fd)
                continue
            fd = os.open(f"{made[1]}/{rel}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o644, dir_fd=self.work_fd)
            with open(fd, "wb") as f:
                f.write(data)
        return made

    def stap_knowledge(self, kind=None):
        """{path in stap's cache: bytes} of the kernel configuration headers (stapconf_*.h; or the
        files of another kind of knowledge) that stap left in this request's own cache; read
        through descriptors, links and other odd entries skipped."""
        kind = kind or _CONFIG_KNOWLEDGE
        found = {}
        for sub, name, sub_fd in self.cache_entries(kind.file):
            data = _read_regular(name, sub_fd, kind.limit)
            if data is not None and len(found) < kind.most:
                found[f"{sub}/{name}"] = data
        return found

    def cache_entries(self, pattern):
        """(XX, name, descriptor of XX) of each entry of this request's own stap cache, in
        cache/XX/, whose name matches pattern; no link is followed."""
        with contextlib.ExitStack() as stack:
            cache_fd = _open_subdir(f"{_STAP_DIR}/cache", self.work_fd, stack)
            for sub in sorted(os.listdir(cache_fd)) if cache_fd is not None else []:
                sub_fd = _open_subdir(sub, cache_fd, stack) if re.fullmatch(r"[0-9a-f]{2}", sub)\
                    else None
                for name in os.listdir(sub_fd) if sub_fd is not None else []:
                    if pattern.fullmatch(name):
                        yield sub, name, sub_fd

    def built_tracepoint_queries(self):
        """Whether stap built tracepoint query modules itself in this request's cache (regular
        files; the server's are links there)."""
        return any(is_regular(name, sub_fd, TRACEQUERY_KNOWLEDGE.limit)
                   for _, name, sub_fd in self.cache_entries(TRACEQUERY_KNOWLEDGE.file))

    def disk_use(self):
        """Bytes under work/, read through its descriptor."""
        return _tree_size(".", self.work_fd)

    def module(self, limit):
        """(name, bytes) of the one .ko stap left in work/tmp, or None; anything but a regular file
        within the size limit is ignored."""
        with contextlib.ExitStack() as stack:
            tmp_fd = _open_subdir("tmp", self.work_fd, stack)
            names = [] if tmp_fd is None else [n for n in os.listdir(tmp_fd) if n.endswith(".ko")]
            data = _read_regular(names[0], tmp_fd, limit) if len(names) == 1 else None
            return (names[0], data) if data is not None else None

    def remove(self):
        if self.work_fd is not None:
            os.close(self.work_fd)
        with contextlib.suppress(OSError):  # shut the compile account out, then remove
            os.chmod(self.path, 0o700)
        shutil.rmtree(self.path, ignore_errors=True)  # fd-based: never follows links


def _open_subdir(path, dir_fd, stack):
    """A descriptor of the directory path under dir_fd (closed with stack), or None; no component
    may be a link."""
    fd = dir_fd
    for part in path.split("/"):
        try:
            fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError:
            return None
        stack.callback(os.close, fd)
    return fd


def _read_regular(name, dir_fd, limit):
    """The bytes of a regular file at most limit long, or None; a link, a fifo or a device is not
    opened for reading."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return f.read(limit + 1)[:limit]


def prepare_compile_step(config):
    """At start: the directory of stap's knowledge, a sandbox that works (or a loud warning under
    --no-sandbox); returns the configuration with the stap version of each build environment."""
    _prepare_knowledge(config)
    if not config.sandbox:
        logging.warning("WARNING: --no-sandbox: compiles run unconfined and can read "
                        "everything the compile account can; results are not cached")
        return config
    why = _sandbox_trial(config, ["true"])[1]
    if why:
        raise Error(f"cannot sandbox compiles: {why}; install bubblewrap and prlimit "
                    "(Debian: bubblewrap, util-linux) and allow unprivileged user "
                    "namespaces (sysctl user.max_user_namespaces, "
                    "kernel.unprivileged_userns_clone), or start with --no-sandbox")
    return dataclasses.replace(config, build_envs=tuple(_ask_build_env(config, env)
                                                        for env in config.build_envs))


def _sandbox_trial(config, command, root="/"):
    """Run command in a compile's sandbox (with the build environment at root) as the compile
    account, within the limits: (its output, None), or (None, why it failed)."""
    try:
        ws = Workspace(config.tmpdir)
    except OSError as e:
        raise Error(f"cannot make request directories in {config.tmpdir}: {e.strerror}") from None
    with ws:
        ws.hand_over(config.user)
        argv = _sandbox_argv(config, ws.work_fd, root, config.releases) + limits_argv(config)\
            + command
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=30, cwd="/",
                                  pass_fds=(ws.work_fd,), **_as_compile_account(config))
        except FileNotFoundError as e:
            return None, f"{e.filename} is not installed"
        except subprocess.TimeoutExpired:
            return None, "bwrap did not finish within 30 s"
        if proc.returncode:
            return None, client.last_line(proc.stderr) or f"exit status {proc.returncode}"
        return proc.stdout + proc.stderr, None


def _ask_build_env(config, env):
    """env with its stap's version, asked with `stap -V` in its own sandbox (the host's kernel
    trees get mount points in its root first); Error when it has no working stap."""
    _make_mount_points(env, config.releases)
    out, why = _sandbox_trial(config, [_stap_program(), "-V"], env.root)
    version = _version_of(out) if out else None
    if not version:
        raise Error(f"--build-env {env.name}: `stap -V` in {env.root} failed: "
                    f"{why or 'it printed no version'}")
    logging.info("build environment %s: %s, stap %s", env.name, env.root, version)
    return dataclasses.replace(env, version=version)


def _as_compile_account(config):
    """subprocess arguments that run a program as the compile account."""
    account = config.user
    return dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[]) if account else {}


def private_paths(config):
    """The server's own files and directories, and the files its options name as secrets: none of
    them exists for the compile."""
    home = pwd.getpwuid(os.geteuid()).pw_dir
    return [config.db.path, config.log, _state_dir("run"), config.tmpdir, config.cache_dir,
            config.kernel_cache, client.systemtap_dir(), os.environ.get("HOME") or home, home] + [
                path for _, path in secret_files(config)]


def inside(path, top):
    return path != top and path.startswith(top.rstrip("/") + "/")


def _sandbox_argv(config, work_fd, root="/", releases=(), extra=()):
    """bwrap's part of the compile's command line: no network, its own process tree, the system
    directories (of the build environment at root, with the host's kernel trees of releases)
    read-only, the server's own files masked, the request's work/ the only writable place (stap's
    cache included: work/.systemtap); extra: more bwrap arguments showing the server's own trees
    read-only (a fetched kernel's, a fixed runtime), added before the masks."""
    view, binds = system_view(root, releases)  # binds: (host path, where the sandbox shows it)
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", *view,
            "--proc", "/proc", "--dev", "/dev", "--size", str(_SANDBOX_TMPFS), "--tmpfs", "/tmp"]
    for p in server_trees(config) + [shutil.which(_stap_program()) or _stap_program()]:
        p = os.path.realpath(p)  # unless shown there already (another environment: its own)
        if os.path.exists(p) and not any(p == t or inside(p, t) for _, t in binds):
            argv += ["--ro-bind", p, p]  # the server's own -R/-I trees, a stand-in stap
            binds.append((p, p))
    return argv + ["--bind-fd", str(work_fd), _SANDBOX_WORK, *extra, *private_masks(config, binds),
                   "--remount-ro", "/", "--chdir", _SANDBOX_WORK, "--"]


def private_masks(config, binds):
    """Cover each private path wherever a bind shows it, after all the binds (a later bind would
    uncover it): a directory by an empty read-only one, a file by /dev/null.  Parents first; a
    path inside one covered already is hidden with it (and no mount point could be made in that
    empty directory)."""
    argv, covered = [], []
    for real in sorted({os.path.realpath(p) for p in private_paths(config)}, key=len):
        if not os.path.lexists(real):
            continue
        for host, there in binds:
            spot = there + real[len(host):]
            if not (real == host or inside(real, host)) or\
                    any(spot == c or inside(spot, c) for c in covered):
                continue
            argv += (["--size", "4096", "--tmpfs", spot, "--remount-ro", spot]
                     if os.path.isdir(real) else ["--ro-bind", "/dev/null", spot])
            covered.append(spot)
    return argv


def server_trees(config):
    """The server's own -R and -I directories."""
    return ([config.runtime] if config.runtime else []) + list(config.includes)


def limits_argv(config):
    """prlimit inside the sandbox, so that the process count is the compile's own (counted per user
    namespace) and not the account's."""
    lim = config.compile_limits
    nproc = [f"--nproc={lim['processes']}"] if config.sandbox else []  # else: the whole account's
    return ["prlimit", f"--fsize={lim['file-size']}", f"--as={lim['memory']}", *nproc,
            f"--cpu={lim['cpu']}:{lim['cpu'] + 5}", "--core=0", "--"]


def stap_argv(config, req, work, runtime=None):
    """The real stap, as an argument list: the server's options for req's build environment
    (runtime, a fixed copy, replaces its -R: stap takes the last), a private --tmpdir,
    --client-options, then the client's arguments."""
    return ([_stap_program(), "-r", req.release, "-a", req.arch] + _env_options(config, req)
            + (["-R", runtime] if runtime else [])
            + [f"--tmpdir={work}/tmp", "--client-options"] + req.args)


def _env_options(config, req):
    """The server's stap options for req's build environment: -R (the first) names the host stap's
    runtime, which another environment's stap must not build with."""
    host = req.build_env is None or req.build_env.root == "/"
    return list(config.stap_options[0 if host or not config.runtime else 2:])


def _compile_env(req, work, cache):
    return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": work,
            "SYSTEMTAP_DIR": cache, "TMPDIR": f"{work}/tmp", "LANG": "C.UTF-8", **req.env}


def run_compile(config, req, ws, knowledge=None):
    """One stap run in its sandbox, as the compile account, within the resource limits; stdin is
    /dev/null, stdout and stderr go to files the server opened (and reads back) itself; stap's
    cache is the request's own, with copies of the kernel's knowledge in it.  A ReplyContent with
    the module as (name, bytes) and the server's paths hidden."""
    ws.hand_over(config.user, knowledge)
    on_host = req.build_env is None or req.build_env.root == "/"
    fixed = fixed_runtime(config, req.release, req.kernel) if on_host else None  # host's runtime
    if config.sandbox:
        root = req.build_env.root if req.build_env else "/"
        work, runtime = _SANDBOX_WORK, fixed and fixed.view
        prefix = _sandbox_argv(config, ws.work_fd, root, [] if req.kernel else [req.release],
                               runtime_binds(fixed) + kernel_binds(req.kernel)
                               + shared_binds(knowledge or {}))
    else:
        work, prefix, runtime = ws.work, [], fixed and fixed.path
    cache = f"{work}/{_STAP_DIR}"
    argv = prefix + limits_argv(config) + stap_argv(config, req, work, runtime)
    with tempfile.TemporaryFile(dir=ws.path) as out, tempfile.TemporaryFile(dir=ws.path) as err:
        try:
            proc = subprocess.Popen(argv, cwd=ws.work if not config.sandbox else "/",
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=_compile_env(req, work, cache),
                                    start_new_session=True, pass_fds=(ws.work_fd,),
                                    **_as_compile_account(config))
        except OSError as e:
            raise Error(f"cannot run the compile step: {e.strerror}") from None
        rc, breach = _watch_compile(proc, ws, config)
        stdout, stderr = _read_back(out), _read_back(err)
    breach = breach or limit_breached(rc, stderr, config)
    if breach:
        stderr += f"stap-serverd: ERROR: the compile exceeded its {breach}\n".encode()
    elif rc:
        stderr += runtime_failure(stderr, runtime or _source_runtime(config), fixed)
    module = ws.module(config.compile_limits["file-size"]) if rc == 0 else None
    hide = (ws.path, work, cache, fixed and fixed.path)
    return ReplyContent(rc=1 if rc else 0, stdout=hide_paths(stdout, hide),
                        stderr=hide_paths(stderr, hide), module=module)


_STOPPING = threading.Event()  # set by CompileServer.drain() once requests have had their grace


def _watch_compile(proc, ws, config):
    """Wait for the compile; kill its whole process group when it runs past the wall-clock limit,
    writes more than the disk limit or the server stops.  Returns (exit status, the limit it broke
    or None)."""
    deadline = time.monotonic() + config.compile_timeout
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=_DISK_CHECK_INTERVAL), None
        if time.monotonic() > deadline:
            _kill_group(proc)
            return 1, f"wall-clock limit ({config.compile_timeout:g} s, --compile-timeout)"
        if ws.disk_use() > config.compile_limits["disk"]:
            _kill_group(proc)
            return 1, limit_text(config, "disk")
        if _STOPPING.is_set():
            _kill_group(proc)
            return 1, "time at the server's stop"


def _read_back(f):
    f.seek(0)
    data = f.read(_MAX_OUTPUT + 1)
    if len(data) > _MAX_OUTPUT:
        data = data[:_MAX_OUTPUT] + b"\n[output cut at %d bytes]\n" % _MAX_OUTPUT
    return data


# How a broken rlimit shows: the signal that killed the compile's top process (128 + signal, through
# bwrap), or the words its children printed.
_LIMIT_SIGNS = (
    ("file-size", 128 + signal.SIGXFSZ, rb"File size limit exceeded"),
    ("cpu", 128 + signal.SIGXCPU, rb"CPU time limit exceeded"),
    ("memory", None, rb"Cannot allocate memory|MemoryError|bad_alloc|memory exhausted"
                     rb"|[Oo]ut of memory"),
    ("processes", None, rb"[Cc]annot fork|fork: Resource temporarily unavailable|fork: retry"),
)


def limit_breached(rc, stderr, config):
    for name, status, words in _LIMIT_SIGNS:
        if rc != 0 and (rc == status or re.search(words, stderr)):
            return limit_text(config, name)
    return None


def limit_text(config, name):
    """e.g. "file size limit (536870912 bytes, --compile-file-size)"."""
    unit = {"BYTES": " bytes", "SECONDS": " s", "N": ""}[
        next(u for n, _, u, _ in COMPILE_LIMITS if n == name)]
    return (f"{name.replace('-', ' ')} limit ({config.compile_limits[name]}{unit}, "
            f"--compile-{name})")


# Failures of a compile that are the server's to fix, as they show in its stderr (the client sees
# all of it; the log line names the cause): a limit the server killed it for, a full disk, bwrap.
_SERVER_SIDE_CAUSES = (
    (rb"^stap-serverd: ERROR: (the compile exceeded its .*)$", "{0}"),
    (rb"No space left on device", "No space left on device in --tmpdir {tmpdir} or the stap "
                                  "cache {cache}"),
    (rb"^(bwrap: .*)$", "sandbox failure: {0}"),
)


def server_side_cause(stderr, config):
    """The log's words for why a compile failed when the server is to blame, or None."""
    for pattern, words in _SERVER_SIDE_CAUSES:
        m = re.search(pattern, stderr, re.MULTILINE)
        if m:
            return words.format(*(g.decode(errors="replace") for g in m.groups()),
                                tmpdir=config.tmpdir, cache=config.cache_dir)
    return None


def _kill_group(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def hide_paths(data, paths):
    for p in sorted((p for p in paths if p), key=len, reverse=True):
        data = data.replace(p.encode(), b"<server>")
    return data


# --------------------------------------------------------------------------
# stap's knowledge of a kernel: made once by the server's own warm-up, copied into each compile
# --------------------------------------------------------------------------
#
# The first pass 4 for a kernel spends 10-60 s probing its headers for stapconf_HASH.h.  No
# compile writes anything another compile reads: each has its own stap cache (work/.systemtap).
# The header is shared only from CACHE_DIR/knowledge/RELEASE-ARCH-STAMP/, the server's own,
# made from a run of the server's own script and copied into each compile's cache.  The first
# compile for a kernel does not wait for that warm-up (it would pay the probing twice): it probes
# in its own cache, as a local stap would, and the warm-up runs after it, in the background.

_KNOWLEDGE = "knowledge"
_KNOWLEDGE_FILE = re.compile(r"stapconf_[0-9a-f]+_\d+\.h")
_KNOWLEDGE_FILE_LIMIT = 1 << 20
_KNOWLEDGE_FILES = 16
_WARM_UP_SCRIPT = "probe begin { exit() }"
_WARM_UP_RETRY = 600  # seconds before a failed warm-up is tried again
_WARM_UP_PREFIX = "stap-warm-up."  # a warm-up's directory: no request's, and it may outlive one


@dataclasses.dataclass(frozen=True)
class _KnowledgeKind:
    """What one kind of warm-up runs and keeps of the cache stap made."""
    words: str  # in the log: "stap knowledge for RELEASE ARCH: ..."
    args: tuple  # the warm-up's stap arguments: the server's own script
    file: re.Pattern  # the names kept, in stap's cache/XX/
    limit: int  # bytes of one file
    most: int  # files
    none: str  # why a warm-up that succeeded made nothing


_CONFIG_KNOWLEDGE = _KnowledgeKind("stap knowledge", ("-p4", "-e", _WARM_UP_SCRIPT),
                                   _KNOWLEDGE_FILE, _KNOWLEDGE_FILE_LIMIT, _KNOWLEDGE_FILES,
                                   "it made no stapconf header")


def _prepare_knowledge(config):
    """At start: make CACHE_DIR and CACHE_DIR/knowledge, or check them and each kernel's directory
    in it (ours, not a link, not writable by group or others)."""
    root = os.path.join(config.cache_dir, _KNOWLEDGE)
    os.makedirs(config.cache_dir, 0o755, exist_ok=True)
    for path in (config.cache_dir, root):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
        os.close(_open_server_dir(path))
    for name in sorted(os.listdir(root)):
        if not name.startswith(".new-"):  # a crashed warm-up's: never renamed into place
            os.close(_open_server_dir(os.path.join(root, name)))


def _open_server_dir(path):
    """A descriptor of path, a directory of ours (not a link) that group and others cannot write;
    Error otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        fd = None
    if fd is None or os.fstat(fd).st_uid != os.geteuid() or os.fstat(fd).st_mode & 0o022:
        if fd is not None:
            os.close(fd)
        raise Error(f"{path} must be a directory of uid {os.geteuid()} "
                    "that group and others cannot write")
    return fd


def builds_module(req):
    """Whether the request runs pass 4, the one pass that needs the kernel's knowledge."""
    options = req.args[:req.args.index("--")] if "--" in req.args else req.args
    passes = [a[2:] for a in options if re.fullmatch(r"-p[1-5]", a)]
    return passes[-1:] == ["4"]


class _KernelKnowledge:
    """One kernel's knowledge in this process: files ({path in stap's cache: bytes}) once loaded
    or made; the lock makes one warm-up at a time, which requests for the kernel wait for (for the
    configuration knowledge, the kernel's first compile holds it too, until its warm-up ends)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.files = None
        self.failed = None  # time.monotonic() of a failed warm-up


KNOWN_KERNELS = {}  # knowledge path -> _KernelKnowledge, in this process
_knowledge_lock = threading.Lock()


def _known_kernel(path):
    """The _KernelKnowledge of the knowledge directory path in this process, made on first use."""
    with _knowledge_lock:
        return KNOWN_KERNELS.setdefault(path, _KernelKnowledge())


def knowledge_path(config, req):
    """CACHE_DIR/knowledge/RELEASE-ARCH-STAMP: where the knowledge of req's kernel lives."""
    stamp = installation_stamp(config, req.release, req.build_env, req.kernel)[:16]
    return os.path.join(config.cache_dir, _KNOWLEDGE, f"{req.release}-{config.arch}-{stamp}")


def kernel_knowledge(config, req):
    """(the knowledge files a compile of req gets copies of, {} when it needs none or there is
    none; the path of the knowledge to make after it, or None).  A path: req is the kernel's first
    compile, the server has no knowledge of the kernel; it runs at once with none (its stap makes
    its own in its own cache, never kept) and holds the kernel's lock, which learn_knowledge's
    warm-up after it releases: requests for the kernel meanwhile wait for both."""
    if not builds_module(req):
        return {}, None
    path = knowledge_path(config, req)
    known = _known_kernel(path)
    with contextlib.ExitStack() as held:
        held.enter_context(known.lock)
        if known.files is None or (not known.files
                                   and time.monotonic() - known.failed > _WARM_UP_RETRY):
            known.files = load_knowledge(path)
            if known.files is None:
                held.pop_all()  # the lock stays held until the warm-up after this compile
                return {}, path
        return known.files, None


def learn_knowledge(config, req, path):
    """After the kernel's first compile (which holds the lock of the knowledge at path): the
    server's warm-up, in the background, for the requests after it, which wait for it; it releases
    the lock."""
    known = KNOWN_KERNELS[path]

    def warm():
        try:
            known.files = warm_up(config, req.release, path, req.build_env, req.kernel)
            known.failed = None if known.files else time.monotonic()
        finally:
            known.lock.release()
    _in_background(warm, "stap knowledge warm-up")


_WARM_UPS = set()  # the warm-ups' threads running, which a stopping server stops and waits for


def _in_background(work, name):
    """A warm-up after a compile: for the requests after it, in a thread of its own, so the
    compile's reply does not wait for it; CompileServer.drain() stops it and waits for it to remove
    its own directory."""
    def run():
        try:
            work()
        finally:
            _WARM_UPS.discard(threading.current_thread())
    thread = threading.Thread(target=run, daemon=True, name=name)
    _WARM_UPS.add(thread)
    thread.start()


def load_knowledge(path, kind=_CONFIG_KNOWLEDGE, read=_read_regular):
    """The files of a knowledge directory made before ({path in stap's cache: what read(name,
    dir_fd, limit) gave}), or None when there is none (a directory that is not the server's own
    is skipped, with a warning)."""
    try:
        top = _open_server_dir(path)
    except Error as e:
        if os.path.lexists(path):
            logging.warning("WARNING: stap knowledge skipped: %s", e)
        return None
    files = {}
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, top)
        for sub in sorted(os.listdir(top)):
            sub_fd = _open_subdir(sub, top, stack)
            for name in sorted(os.listdir(sub_fd)) if sub_fd is not None else []:
                data = read(name, sub_fd, kind.limit) if kind.file.fullmatch(name) else None
                if data is not None:
                    files[f"{sub}/{name}"] = data
    return files or None


def warm_up(config, release, path, env=None, kernel=None, kind=_CONFIG_KNOWLEDGE):
    """Run stap once as a compile runs (in the build environment env, None: the host; for the
    fetched kernel, if one), on the server's own script, keep the kernel's knowledge (of kind) it
    made in its own cache, and store it at path; {} (and a warning) when it made none."""
    logging.info("%s for %s %s: warming up (%s)", kind.words, release, config.arch, path)
    started = time.monotonic()
    req = Request("", release, config.arch, list(kind.args), {}, lowered=False,
                  build_env=env, kernel=kernel)
    ws = Workspace(config.tmpdir, _WARM_UP_PREFIX)
    try:
        compiled = run_compile(config, req, ws)
        files = ws.stap_knowledge(kind) if compiled.rc == 0 else {}
    except (Error, OSError) as e:
        compiled, files = ReplyContent(1, b"", str(e).encode()), {}
    finally:
        ws.remove()
    if not files:
        why = client.last_line(compiled.stderr) if compiled.rc else kind.none
        logging.warning("WARNING: %s for %s %s: the warm-up failed (%s); compiles "
                        "go on without it", kind.words, release, config.arch, why)
        return {}
    store_knowledge(path, files)
    names = sorted(files) if len(files) <= _KNOWLEDGE_FILES else [f"{len(files)} files"]
    logging.info("%s for %s %s ready in %.1f s: %s", kind.words, release, config.arch,
                 time.monotonic() - started, ", ".join(names))
    return files


def store_knowledge(path, files):
    """Write files into a new directory beside path and rename it into place, so that a crash
    leaves nothing half-made; a failure (another server got there first) leaves path as it is."""
    made = None
    try:
        made = tempfile.mkdtemp(prefix=".new-", dir=os.path.dirname(path))
        for rel, data in files.items():
            os.makedirs(os.path.join(made, os.path.dirname(rel)), 0o755, exist_ok=True)
            with open(os.open(os.path.join(made, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                              | os.O_NOFOLLOW, 0o644), "wb") as f:
                f.write(data)
                os.fsync(f.fileno())  # renamed whole after a power cut, never empty
        os.chmod(made, 0o755)
        os.rename(made, path)
    except OSError as e:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        if not os.path.isdir(path):
            logging.warning("WARNING: cannot store stap knowledge in %s: %s", path, e.strerror)


# For a kernel.trace probe stap 4.8 builds a tracepoint query module for each header of the
# kernel's tracepoints (cache/XX/tracequery_HASH_N.o, an empty file for a header without any; for
# the 6.1 headers 172 objects, 40 MB, about 90 CPU-seconds) and, on a cache hit, only opens them
# for reading.  The server makes them once per kernel with its own warm-up (-p2, its own script)
# into CACHE_DIR/knowledge/RELEASE-ARCH-STAMP.tracequery/; a compile sees that directory
# read-only at _SANDBOX_TRACEQUERY and finds links to it in its own cache, where stap looks.

TRACEQUERY_KNOWLEDGE = _KnowledgeKind(
    "stap tracepoint knowledge",
    ("-p2", "-e", 'probe kernel.trace("sched_switch")?, begin { exit() }'),
    re.compile(r"tracequery_[0-9a-f]+_\d+\.o"), 64 << 20, 4096, "it made no tracepoint query")
_TRACEQUERY_DIR = ".tracequery"  # their directory: the kernel's knowledge directory's name + this
_SANDBOX_TRACEQUERY = "/stap/tracequery"
_TRACE_PROBE = re.compile(rb"\bkernel\s*\.\s*trace\b")


@dataclasses.dataclass(frozen=True)
class SharedFile:
    """A knowledge file a compile reads where the server keeps it, through a link in its own
    cache: top, the server's directory, is shown to the compile read-only at view."""
    top: str
    view: str
    rel: str  # path in top, and in stap's cache

    @property
    def target(self):
        return f"{self.view}/{self.rel}"


def _names_tracepoints(scripts, archive):
    """Whether the scripts stap parses for a request (its -e or script file, its shipped tapsets)
    name kernel.trace: then the compile needs the kernel's tracepoint query modules."""
    return any(_TRACE_PROBE.search(text or b"")
               for _, text in itertools.chain(scripts, _shipped_tapsets(archive)))


def trace_knowledge(config, req):
    """{path in stap's cache: SharedFile} of the kernel's tracepoint query modules, for any
    compile of req's kernel ({} when there are none yet): a tapset's probe alias may use
    kernel.trace too.  The first request for a kernel whose scripts name kernel.trace waits for
    the server's warm-up, as others naming it meanwhile; other requests never wait for it."""
    path = knowledge_path(config, req) + _TRACEQUERY_DIR
    known = _known_kernel(path)
    if not known.lock.acquire(blocking=req.traces):
        return {}  # a warm-up is running
    try:
        if known.files is None or (req.traces and not known.files
                                   and time.monotonic() - known.failed > _WARM_UP_RETRY):
            names = load_knowledge(path, TRACEQUERY_KNOWLEDGE, is_regular)
            if names is None and not req.traces:
                return {}
            if names is None:
                names = warm_up(config, req.release, path, req.build_env, req.kernel,
                                TRACEQUERY_KNOWLEDGE)
                known.failed = None if names else time.monotonic()
            view = _SANDBOX_TRACEQUERY if config.sandbox else path
            known.files = {rel: SharedFile(path, view, rel) for rel in names}
        return known.files
    finally:
        known.lock.release()


def _learn_tracepoints(config, req):
    """After a compile that built tracepoint query modules itself although its scripts name no
    kernel.trace (a tapset's probe alias does): make the kernel's in the background, for the
    requests after it, unless the server has them or is making them."""
    traced = dataclasses.replace(req, traces=True)
    path = knowledge_path(config, req) + _TRACEQUERY_DIR
    known = _known_kernel(path)
    if known.files is None and not known.lock.locked():
        _in_background(lambda: trace_knowledge(config, traced), "tracepoint warm-up")


def is_regular(name, dir_fd, limit):
    """True if name in dir_fd is a regular file at most limit long (links are not followed), or
    None."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return True if stat.S_ISREG(st.st_mode) and st.st_size <= limit else None


def shared_binds(knowledge):
    """bwrap arguments that show the server's directories a compile's knowledge links into,
    read-only."""
    shown = sorted({(f.top, f.view) for f in knowledge.values() if isinstance(f, SharedFile)})
    return [arg for top, view in shown if top != view for arg in ("--ro-bind", top, view)]


# The stap runtime, fixed per kernel: the known fixes are data
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _RuntimeFix:
    """A known change the installed runtime needs for some kernels: it applies when the kernel's
    header (relative to its source tree) matches kernel_test and the runtime's file matches
    runtime_test; then every match of old in that file becomes new."""
    name: str
    why: str
    header: str
    kernel_test: bytes
    file: str
    runtime_test: bytes
    old: bytes
    new: bytes


RUNTIME_FIXES = (
    _RuntimeFix("task_work_cancel_func",
                "the kernel renamed task_work_cancel to task_work_cancel_func",
                "include/linux/task_work.h", rb"\btask_work_cancel_func\b",
                "stp_task_work.c", rb'kallsyms_lookup_name\("task_work_cancel"\)',
                rb"\btask_work_cancel\b", b"task_work_cancel_func"),
)
STOCK_RUNTIME = "/usr/share/systemtap/runtime"
SANDBOX_RUNTIME = "/stap/runtime"  # where a compile sees a fixed runtime, read-only
FIXED_RUNTIMES = ".runtime"  # in the cache directory; no account name starts with a dot
_MAX_FIX_INPUT = 1 << 20  # bytes of a header or runtime file a feature test reads


@dataclasses.dataclass(frozen=True)
class _FixedRuntime:
    path: str  # the server's copy
    view: str  # the same, as the compile sees it
    fixes: tuple


def _source_runtime(config):
    """The runtime stap would use: the server's -R, else the installed one."""
    return config.runtime or STOCK_RUNTIME


def header_trees(release, kernel=None):
    """The release's build and source trees: a header can sit in either (Debian keeps most in the
    -common twin that source names); for a fetched kernel, the /usr/src trees it unpacked."""
    if kernel is not None:
        src = os.path.join(kernel.root, "usr", "src")
        return [os.path.join(src, n) for n in sorted(os.listdir(src))]
    return [f"/lib/modules/{release}/build", f"/lib/modules/{release}/source"]


def _file_matches(path, pattern):
    try:
        with open(path, "rb") as f:
            return re.search(pattern, f.read(_MAX_FIX_INPUT)) is not None
    except OSError:
        return False


def needed_fixes(trees, runtime):
    """The fixes of RUNTIME_FIXES that runtime needs to build for the kernel of trees."""
    return tuple(fix for fix in RUNTIME_FIXES
                 if _file_matches(os.path.join(runtime, fix.file), fix.runtime_test)
                 and any(_file_matches(os.path.join(tree, fix.header), fix.kernel_test)
                         for tree in trees))


_fixed = {}  # release -> (time, FixedRuntime or None)
_fixed_lock = threading.Lock()


def fixed_runtime(config, release, kernel=None):
    """The FixedRuntime to build for release (kernel: a FetchedKernel) with, or None when the
    runtime needs no fix; looked up again after _STAMP_TTL, each fix logged when a release first
    gets its copy."""
    now = time.monotonic()
    with _fixed_lock:
        cached = _fixed.get(release)
        if cached and now - cached[0] < _STAMP_TTL:
            return cached[1]
        fixed = runtime_copy(config, header_trees(release, kernel))
        if fixed and fixed != (cached and cached[1]):
            for fix in fixed.fixes:
                logging.info("runtime fix %s for %s: %s (runtime %s)", fix.name, release,
                             fix.why, fixed.path)
        _fixed[release] = (now, fixed)
        return fixed


def runtime_copy(config, trees):
    """The fixed copy of the runtime for the kernel of trees, or None when it needs no fix.  A copy
    is made once per source runtime (its files' stamps) and set of fixes, in the cache directory."""
    source = _source_runtime(config)
    fixes = needed_fixes(trees, source)
    if not fixes:
        return None
    digest = hashlib.sha256(b"".join([f.name.encode() + b"\0" for f in fixes]
                                     + [stat_line(p) for p in walk_files(source)]))
    name = digest.hexdigest()[:16]
    path = os.path.join(config.cache_dir, FIXED_RUNTIMES, name)
    if not os.path.isdir(path):
        _make_fixed_runtime(source, fixes, path)
    return _FixedRuntime(path, f"{SANDBOX_RUNTIME}/{name}", fixes)


def _make_fixed_runtime(source, fixes, path):
    """Copy source with fixes applied to path: made under a temporary name and renamed, readable by
    the compile account, writable only by the server."""
    parent = os.path.dirname(path)
    os.makedirs(parent, 0o755, exist_ok=True)
    os.close(_open_server_dir(parent))
    new = tempfile.mkdtemp(prefix=".new.", dir=parent)
    try:
        shutil.copytree(source, new, symlinks=True, dirs_exist_ok=True)
        for fix in fixes:
            file = pathlib.Path(new, fix.file)
            file.write_bytes(re.sub(fix.old, fix.new, file.read_bytes()))
        for top, dirs, files in os.walk(new):
            for entry in (os.path.join(top, name) for name in dirs + files):
                if not os.path.islink(entry):
                    os.chmod(entry, 0o755 if os.path.isdir(entry) else 0o644)
        os.chmod(new, 0o755)
        os.rename(new, path)
    except OSError as e:
        shutil.rmtree(new, ignore_errors=True)
        if os.path.isdir(path):
            return  # another server made it meanwhile
        raise Error(f"cannot make a fixed stap runtime in {parent}: {e.strerror}") from None


def runtime_binds(fixed):
    """bwrap arguments that show a fixed runtime to the compile, read-only."""
    return ["--ro-bind", fixed.path, fixed.view] if fixed else []


def runtime_failure(stderr, runtime, fixed):
    """The server's line after stap's output when pass 4 failed in the runtime, or b""."""
    m = re.search(rb"^" + re.escape(runtime.encode())
                  + rb"/([^:\s]+):\d+(?::\d+)?: (?:fatal )?error:", stderr, re.M)
    if not m:
        return b""
    known = (f"even with the known fixes {', '.join(f.name for f in fixed.fixes)} applied"
             if fixed else "and no known runtime fix applies")
    return (f"stap-serverd: ERROR: pass 4 failed in the stap runtime "
            f"({m.group(1).decode(errors='replace')}) {known}: this systemtap may be too old "
            "for this kernel\n").encode()


# --------------------------------------------------------------------------
# Kernels fetched from the distribution's archive (--fetch-kernels)
# --------------------------------------------------------------------------
#
# apt-get download (the host's apt configuration and keys; every file is checked against the
# signed index's SHA256) as the server's account, never root; dpkg-deb -x (no maintainer
# script) into a temporary directory, renamed into the kernel cache; compiles see the tree
# read-only at the paths the packages use.

_FETCH_TIMEOUT = 300  # seconds for one apt-get download
_FAILED_FETCH_TTL = 300  # seconds a failed fetch is answered from memory
_KERNEL_TREES = "trees"  # in the kernel cache: RELEASE/ is the unpacked root of its packages
_DOWNLOADS = "debs"  # in the kernel cache: the verified .deb files
# From linux-image-RELEASE-dbg, when a script needs them: SYMBOLS/RELEASE/System.map-RELEASE
# (3.6 MB) and, apart, DEBUGINFO/RELEASE/vmlinux-RELEASE (600 MB), so kprobes do not pay for DWARF.
SYMBOLS = "symbols"
DEBUGINFO = "debuginfo"
_DEBUG_FILES = {SYMBOLS: "System.map-{}", DEBUGINFO: "vmlinux-{}"}  # in /usr/lib/debug/boot
_DEBUG_NEEDS = {SYMBOLS: "the symbol table", DEBUGINFO: "the debuginfo"}
_FULL_MARGIN = 1 << 20  # bytes: a kernel cache with less free after a failed unpack is full


class _HostFault(Error):
    """The server's host lacks what a kernel needs (room in the kernel cache, a compiler): not
    remembered as a failed fetch, as the administrator's remedy works at once."""


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str  # the archive's file name, NAME_VERSION_ARCH.deb
    sha256: str
    depends: str


@dataclasses.dataclass
class FetchedKernel:
    release: str
    root: str  # the unpacked packages: ROOT/usr/src/..., ROOT/lib/modules/RELEASE
    size: int
    users: int = 0
    debug: dict = dataclasses.field(default_factory=dict)  # SYMBOLS or DEBUGINFO -> its file

    def parts(self):
        """The kernel's directories in the cache: its tree and the -dbg files fetched for it."""
        return [self.root] + [os.path.dirname(f) for f in self.debug.values()]


def apt_package(name):
    """The archive's candidate of package name (from apt's signed lists), or None."""
    return _apt_packages([name]).get(name)


def _apt_packages(names):
    """{name: Package} of the archive's candidates of names, from one apt-cache call (each call
    reads apt's lists, a second where apt keeps no binary cache of them); names the archive lacks
    are left out."""
    res = client.run_tool(["apt-cache", "show", "--no-all-versions", *names], check=False)
    found = {}
    for record in re.split(r"\n\s*\n", res.stdout.decode(errors="replace")):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+): ?(.*)$", record, re.M))
        name = fields.get("Package")
        if name in names and name not in found and all(
                k in fields for k in ("Version", "Filename", "SHA256")):
            found[name] = Package(name, fields["Version"], os.path.basename(fields["Filename"]),
                                  fields["SHA256"].lower(), fields.get("Depends", ""))
    return found


def _installed_version(name):
    res = client.run_tool(["dpkg-query", "-W", "-f", "${Version}", name], check=False)
    return res.stdout.decode().strip() if res.returncode == 0 else None


def missing_compiler(headers):
    """The compiler package that the headers package headers depends on (gcc-N, directly or through
    Debian's linux-compiler-gcc-N-ARCH) and that this host lacks, or None.  The compile runs the
    host's compiler, so only its program counts, not how it was installed."""
    for dep in headers.depends.split(","):
        wanted = [m.group(1) for alt in dep.split("|")
                  if (m := re.match(r"^\s*(?:linux-compiler-)?(gcc-[0-9]+)\b", alt))]
        if wanted and not any(shutil.which(name) for name in wanted):
            return wanted[0]
    return None


def _likely_dependencies(release):
    """The packages Debian's linux-headers-RELEASE depends on, as their names usually go (the
    -common twin of the release's ABI, -common-rt for rt; linux-kbuild-MAJOR.MINOR or -ABI): asked
    for with the headers, they make one apt-cache call do where two would (each reads apt's lists,
    a second where apt keeps no binary cache of them).  A guess that misses costs a second call."""
    m = re.match(r"^((\d+\.\d+)[^-]*(?:-\d+)?)-([a-z].*)$", release)
    if not m:
        return []
    abi, version, flavour = m.groups()
    return [f"linux-headers-{abi}-common" + ("-rt" if flavour.startswith("rt-") else ""),
            f"linux-kbuild-{version}", f"linux-kbuild-{abi}"]


def kernel_packages(release):
    """The packages that present release's headers: linux-headers-RELEASE, the -common twin it
    depends on, and the linux-kbuild it asks for when the installed one is older or missing."""
    found = _apt_packages([f"linux-headers-{release}", *_likely_dependencies(release)])
    headers = found.get(f"linux-headers-{release}")
    if headers is None:
        raise Error(f"the archive has no kernel {release} (no package linux-headers-{release})")
    compiler = missing_compiler(headers)
    if compiler:
        raise _HostFault(f"the kernel {release} is built with {compiler}, which this server lacks "
                         f"(its administrator can install the package {compiler})")
    wanted = []
    for dep in (d.strip() for d in headers.depends.split(",")):
        m = re.match(r"^(linux-headers-\S+-common\S*|linux-kbuild-\S+)(?:\s*\((>=|=)\s*(\S+)\))?",
                     dep)
        if not m:
            continue
        if m.group(1).startswith("linux-kbuild-"):
            have = _installed_version(m.group(1))
            if have and (not m.group(3) or client.run_tool(
                    ["dpkg", "--compare-versions", have, "ge", m.group(3)],
                    check=False).returncode == 0):
                continue  # the installed kbuild will do
        wanted.append(m.group(1))
    if any(name not in found for name in wanted):  # the guess missed
        found.update(_apt_packages([name for name in wanted if name not in found]))
    for name in wanted:
        if name not in found:
            raise Error(f"the archive has no {name}, which linux-headers-{release} needs")
    return [headers] + [found[name] for name in wanted]


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tree_size(top, dir_fd=None):
    """Bytes under top (relative to dir_fd), each entry counted as at least one block (an inode bomb
    is a disk bomb too); links are never followed."""
    total = 0
    with contextlib.suppress(OSError):  # no top: nothing (fwalk, unlike walk, raises)
        for _, dirs, files, fd in os.fwalk(top, dir_fd=dir_fd, follow_symlinks=False):
            for name in dirs + files:
                with contextlib.suppress(OSError):  # gone meanwhile
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    total += max(st.st_blocks * 512, 4096)
    return total


class KernelCache:
    """Unpacked kernel header packages, one root per release, bounded in bytes (least recently
    used first out, never one a compile is using); one fetch per release at a time, the others
    wait for it; a failed fetch is remembered for _FAILED_FETCH_TTL seconds."""

    def __init__(self, top, max_bytes):
        self.top, self.max_bytes = top, max_bytes
        self.kernels = collections.OrderedDict()  # release -> FetchedKernel, oldest use first
        self.fetching = set()
        self.failed = {}  # release -> (time, message)
        self.cond = threading.Condition()
        self.opened = False

    def open(self):
        """Make the cache's directories, or check those there, and take in the trees of earlier
        runs (oldest use first); half-made ones of a crash are removed."""
        for d in (self.top, *map(self.path, (_KERNEL_TREES, _DOWNLOADS, SYMBOLS, DEBUGINFO))):
            os.makedirs(d, 0o755, exist_ok=True)
            os.close(_open_server_dir(d))
        trees = self.path(_KERNEL_TREES)
        found = []
        for name in os.listdir(trees):
            path = os.path.join(trees, name)
            if not client.is_release_name(name):
                shutil.rmtree(path, ignore_errors=True)
            else:
                found.append((os.lstat(path).st_mtime, name, path))
        for _, name, path in sorted(found):
            self.kernels[name] = FetchedKernel(name, path, 0, debug=self.debug_files(name))
            self.kernels[name].size = sum(map(_tree_size, self.kernels[name].parts()))
        for part in (SYMBOLS, DEBUGINFO):  # half-made ones and those of a removed tree
            for name in os.listdir(self.path(part)):
                if name not in self.kernels or part not in self.kernels[name].debug:
                    shutil.rmtree(self.path(part, name), ignore_errors=True)
        self.opened = True

    def debug_files(self, release):
        """{SYMBOLS or DEBUGINFO: its file} of the -dbg files fetched for release before."""
        files = {part: self.path(part, release, _DEBUG_FILES[part].format(release))
                 for part in (SYMBOLS, DEBUGINFO)}
        return {part: f for part, f in files.items() if os.path.isfile(f)}

    def path(self, *parts):
        return os.path.join(self.top, *parts)

    @contextlib.contextmanager
    def using(self, release):
        """The FetchedKernel of release, fetched first if needed, kept from eviction meanwhile."""
        kernel = self.acquire(release)
        try:
            yield kernel
        finally:
            with self.cond:
                kernel.users -= 1
                self.evict()

    def acquire(self, release):
        with self.cond:
            if not self.opened:
                self.open()
            while release in self.fetching:
                self.cond.wait()
            kernel = self.kernels.get(release)
            if kernel is None:
                failed = self.failed.get(release)
                if failed and time.monotonic() - failed[0] < _FAILED_FETCH_TTL:
                    raise Error(failed[1])
                self.fetching.add(release)
        if kernel is None:
            kernel = self.fetch_alone(release, lambda: self.fetch(release))
        with self.cond:
            kernel.users += 1
            self.kernels[release] = kernel
            self.kernels.move_to_end(release)
            with contextlib.suppress(OSError):
                os.utime(kernel.root)  # the order of use survives a restart
            self.evict()
        return kernel

    def fetch_alone(self, key, fetch):
        """fetch()'s result, by the thread that put key in self.fetching, whose waiters are woken
        when it is done; a failure is remembered in self.failed."""
        try:
            return fetch()
        except Error as e:
            if not isinstance(e, _HostFault):  # the administrator mends that at once
                with self.cond:
                    self.failed[key] = (time.monotonic(), str(e))
            raise
        finally:
            with self.cond:
                self.fetching.discard(key)
                self.cond.notify_all()

    def evict(self):
        """Remove the least recently used trees that no compile is using while over the bound.
        Called with the lock held."""
        total = sum(k.size for k in self.kernels.values())
        for release, kernel in list(self.kernels.items()):
            if total <= self.max_bytes:
                break
            if kernel.users == 0:
                del self.kernels[release]
                total -= kernel.size
                for part in kernel.parts():
                    shutil.rmtree(part, ignore_errors=True)
                logging.info("kernel cache: removed %s (%d bytes; cache over %d bytes)",
                             release, kernel.size, self.max_bytes)

    def fetch(self, release):
        """Download (or take from the download cache) and unpack release's packages."""
        start = time.monotonic()
        packages = kernel_packages(release)
        indexed = time.monotonic()
        got = self.download(packages)
        downloaded, fetched = sum(size for _, size in got), time.monotonic()
        root = self.unpack(release, [path for path, _ in got])
        unpacked, size = time.monotonic(), _tree_size(root)
        logging.info("kernel cache: fetched %s (%s; %d bytes downloaded, %d unpacked) in %.1f s "
                     "(apt-cache %.1f s, apt-get download %.1f s, dpkg-deb %.1f s)",
                     release, ", ".join(f"{p.name} {p.version}" for p in packages), downloaded,
                     size, time.monotonic() - start, indexed - start, fetched - indexed,
                     unpacked - fetched)
        return FetchedKernel(release, root, size)

    def unpack(self, release, debs):
        """The root of release's tree in the cache, debs unpacked into it: each into a temporary
        directory of its own, all at once (one dpkg-deb per package), then merged (the packages
        write disjoint trees: a path two of them have is refused) and renamed into place."""
        news = []
        try:
            for _ in debs:
                news.append(tempfile.mkdtemp(prefix=".new.", dir=self.path(_KERNEL_TREES)))
            with concurrent.futures.ThreadPoolExecutor(len(debs)) as pool:
                runs = [pool.submit(client.run_tool, ["dpkg-deb", "-x", deb, new], check=False,
                                    timeout=_FETCH_TIMEOUT) for deb, new in zip(debs, news)]
            for deb, run in zip(debs, runs):
                res = run.result()  # raises what run_tool raised: a timeout, or fork failed
                if res.returncode != 0 and self.full():
                    raise self.full_error(f"cannot unpack the kernel {release}")  # deb: sound
                if res.returncode != 0:
                    os.unlink(deb)  # the checked file went bad on disk: fetch it again next time
                    raise Error(f"cannot unpack {os.path.basename(deb)} for {release}: "
                                f"{client.last_line(res.stderr)}")
            for deb, new in zip(debs[1:], news[1:]):
                _merge_tree(new, news[0], os.path.basename(deb))
            if not os.path.isdir(os.path.join(news[0], "lib", "modules", release)):
                raise Error(f"linux-headers-{release} has no /lib/modules/{release}")
            root = self.path(_KERNEL_TREES, release)
            os.rename(news[0], root)
            return root
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.full_error(f"cannot unpack the kernel {release}") from None
            raise Error(f"cannot unpack the kernel {release}: {e.strerror}") from None
        finally:
            for new in news:
                shutil.rmtree(new, ignore_errors=True)

    def full(self):
        """The kernel cache's file system is out of space or inodes for the server's account (what
        the unpacking tar said is in the server's locale; this is not)."""
        try:
            st = os.statvfs(self.top)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _FULL_MARGIN or (st.f_files and st.f_favail == 0)

    def full_error(self, failed):
        return _HostFault(f"{failed}: the kernel cache {self.top} is full "
                               f"({os.strerror(errno.ENOSPC)})")

    def download(self, packages):
        """[(path of each package's checked .deb in the download cache, bytes downloaded)], in the
        order of packages, from one apt-get download of those not in the download cache: a cached
        file whose SHA256 is not the signed index's is downloaded again.  When apt fails, the files
        it got whole are kept, and the first package it did not get is named."""
        paths = [self.path(_DOWNLOADS, p.filename) for p in packages]
        sizes = [0] * len(packages)
        missing = [i for i, path in enumerate(paths)
                   if not (os.path.isfile(path) and file_sha256(path) == packages[i].sha256)]
        if not missing:
            return list(zip(paths, sizes))
        for i in missing:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths[i])
        work = tempfile.mkdtemp(prefix=".new.", dir=self.path(_DOWNLOADS))
        try:
            res = client.run_tool(["apt-get", "download", "-q", *(
                f"{packages[i].name}={packages[i].version}" for i in missing)], cwd=work,
                check=False, timeout=_FETCH_TIMEOUT)
            full = res.returncode != 0 and self.full()
            for i in missing:  # those got whole are kept whatever happened to the others
                got = os.path.join(work, packages[i].filename)
                if os.path.isfile(got) and file_sha256(got) == packages[i].sha256:
                    sizes[i] = os.path.getsize(got)
                    os.rename(got, paths[i])
            for package, got in ((packages[i], os.path.join(work, packages[i].filename))
                                 for i in missing if not sizes[i]):
                if full:
                    raise self.full_error(f"cannot download {package.name} {package.version}")
                elif res.returncode != 0 or not os.path.isfile(got):
                    raise Error(f"cannot download {package.name} {package.version} from the "
                                f"archive: {client.last_line(res.stderr or res.stdout)}")
                else:
                    raise Error(f"{package.filename} from the archive does not match its index")
            return list(zip(paths, sizes))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def add_debug(self, kernel, need):
        """Give kernel (in use by the caller) the -dbg files that need (SYMBOLS or DEBUGINFO, which
        brings the symbol table too) asks for, unless it has them: one such fetch per release at a
        time, the others wait for it; a failure is remembered like a failed fetch."""
        key = f"{kernel.release} -dbg"  # not a release name: acquire() does not wait for it
        with self.cond:
            while key in self.fetching:
                self.cond.wait()
            if need in kernel.debug:
                return
            failed = self.failed.get(key)
            if failed and time.monotonic() - failed[0] < _FAILED_FETCH_TTL:
                raise Error(failed[1])
            self.fetching.add(key)
        files = self.fetch_alone(key, lambda: self.fetch_debug(
            kernel, [SYMBOLS, DEBUGINFO][:1 + (need == DEBUGINFO)]))
        with self.cond:
            kernel.debug.update(files)
            kernel.size += sum(os.path.getsize(f) for f in files.values())
            self.evict()

    def fetch_debug(self, kernel, parts):
        """Download linux-image-RELEASE-dbg, write the files of parts (those kernel has not got)
        each into its own directory of the cache, renamed into place, and delete the .deb (up to
        850 MB, the files extracted are what compiles use).  {part: its file}."""
        start, release = time.monotonic(), kernel.release
        package = apt_package(f"linux-image-{release}-dbg")
        if package is None:
            raise Error(f"the archive has no linux-image-{release}-dbg, which has the symbol "
                        f"table and debuginfo of {release}")
        parts = [p for p in parts if p not in kernel.debug]
        [(deb, downloaded)] = self.download([package])
        news = {p: tempfile.mkdtemp(prefix=".new.", dir=self.path(p)) for p in parts}
        try:
            wanted = {f"usr/lib/debug/boot/{_DEBUG_FILES[p].format(release)}":
                      os.path.join(news[p], _DEBUG_FILES[p].format(release)) for p in parts}
            deb_extract(deb, wanted)
            for p in parts:
                os.rename(news[p], self.path(p, release))
        except OSError as e:
            raise Error(f"cannot unpack {package.filename} for {release}: {e.strerror}") from None
        finally:
            for new in news.values():
                shutil.rmtree(new, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(deb)
        files = {p: self.path(p, release, _DEBUG_FILES[p].format(release)) for p in parts}
        logging.info("kernel cache: fetched %s of %s (%s %s; %d bytes downloaded, %d kept) in "
                     "%.1f s", " and ".join(_DEBUG_NEEDS[p] for p in parts), release,
                     package.name, package.version, downloaded,
                     sum(os.path.getsize(f) for f in files.values()), time.monotonic() - start)
        return files


def _merge_tree(src, dst, package, at=""):
    """Move what directory src holds into directory dst, descending into the directories both have;
    Error for a path both have that is not a directory in each (package's tree, in src, and those
    merged before it must be disjoint but for their common directories)."""
    for name in os.listdir(src):
        there, here = os.path.join(src, name), os.path.join(dst, name)
        if not os.path.lexists(here):
            os.rename(there, here)
        elif all(os.path.isdir(p) and not os.path.islink(p) for p in (there, here)):
            _merge_tree(there, here, package, f"{at}/{name}")
        else:
            raise Error(f"{package} has {at}/{name}, which another package of the kernel has too")


def deb_extract(deb, wanted):
    """Write the regular files wanted ({path in the package: file to create}) from the .deb's data
    archive, reading it once and no further than the last of them: a .deb is an ar archive whose
    data.tar.* member tarfile reads as a stream (xz, gzip, bzip2 or none).  No maintainer script
    runs, and nothing but the named files is written.  Error when one is missing."""
    left = dict(wanted)
    with open(deb, "rb") as f:
        data = _ar_member(f, "data.tar")
        try:
            with tarfile.open(fileobj=data, mode="r|*") as tar:
                for member in tar:
                    target = left.pop(member.name.removeprefix("./"), None)\
                        if member.isreg() else None
                    if target:
                        with open(target, "xb") as out:
                            shutil.copyfileobj(tar.extractfile(member), out, 1 << 20)
                    if not left:
                        break
        except (tarfile.TarError, EOFError, lzma.LZMAError) as e:
            raise Error(f"cannot read {os.path.basename(deb)}: {e}") from None
    if left:
        raise Error(f"{os.path.basename(deb)} has no {', '.join(sorted(left))}")


class _BoundedReader(io.RawIOBase):
    """The next size bytes of f, as a file tarfile can stream from."""

    def __init__(self, f, size):
        self.f, self.left = f, size

    def readable(self):
        return True

    def readinto(self, buf):
        data = self.f.read(min(len(buf), self.left))
        self.left -= len(data)
        buf[:len(data)] = data
        return len(data)


def _ar_member(f, prefix):
    """The first member of the ar archive f whose name starts with prefix, as a BoundedReader;
    Error when there is none.  A member header is 60 bytes: name 16, dates and ids 32, size 10,
    then a backquote and a newline; members start at even offsets."""
    if f.read(8) != b"!<arch>\n":
        raise Error(f"{os.path.basename(f.name)} is not a Debian package")
    while True:
        header = f.read(60)
        if len(header) < 60 or header[58:60] != b"`\n":
            raise Error(f"{os.path.basename(f.name)} has no {prefix}* member")
        size = int(header[48:58]) if header[48:58].strip().isdigit() else -1
        if size < 0:
            raise Error(f"{os.path.basename(f.name)} is not a Debian package")
        if header[:16].decode("ascii", "replace").startswith(prefix):
            return io.BufferedReader(_BoundedReader(f, size), 1 << 20)
        f.seek(size + size % 2, os.SEEK_CUR)


def _fetched_tree_binds(kernel, source, inside):
    """bwrap arguments that show source, a tree of the fetched kernel, at inside: whole, or entry by
    entry when some of its links name a kbuild that the host has no directory for (Debian's 6.12
    headers link scripts and tools to ../../lib/linux-kbuild-VERSION, and no mount point can be
    made in the host's read-only /usr/lib), those entries then showing what the links name."""
    kbuilds = os.path.join(kernel.root, "usr", "lib")
    strays = {}
    for name in os.listdir(source) if os.path.isdir(source) else []:
        path = os.path.join(source, name)
        target = os.path.realpath(path)
        kbuild = os.path.relpath(target, kbuilds).split(os.sep)[0]
        if os.path.islink(path) and kbuild.startswith("linux-kbuild-") and os.path.isdir(target)\
                and not os.path.isdir(f"/usr/lib/{kbuild}"):
            strays[name] = target
    if not strays:
        return ["--ro-bind", source, inside]
    argv = ["--dir", inside]
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if name not in strays and os.path.islink(path):  # as it is: bwrap binds no dangling link
            argv += ["--symlink", os.readlink(path), os.path.join(inside, name)]
        else:
            argv += ["--ro-bind", strays.get(name, path), os.path.join(inside, name)]
    return argv


def kernel_binds(kernel):
    """bwrap arguments that present a fetched kernel as installed: its /lib/modules/RELEASE and
    /usr/src trees (the only ones there, on read-only tmpfs mounts) and its kbuild, read-only."""
    if kernel is None:
        return []
    argv = []
    for inside in ("/usr/src", os.path.realpath("/lib/modules")):
        mine = os.path.join(kernel.root, inside.lstrip("/"))
        if inside.endswith("/modules"):
            mine = os.path.join(kernel.root, "lib", "modules")
        argv += ["--size", "65536", "--tmpfs", inside]
        for name in sorted(os.listdir(mine)):
            argv += _fetched_tree_binds(kernel, *(os.path.join(d, name) for d in (mine, inside)))
        argv += ["--remount-ro", inside]
    kbuild = os.path.join(kernel.root, "usr", "lib")
    for name in sorted(os.listdir(kbuild)) if os.path.isdir(kbuild) else []:
        if name.startswith("linux-kbuild-") and os.path.isdir(f"/usr/lib/{name}"):
            argv += ["--ro-bind", os.path.join(kbuild, name), f"/usr/lib/{name}"]
    return argv + debug_binds(kernel)


def debug_binds(kernel, debug_dir="/usr/lib/debug"):
    """bwrap arguments that show the -dbg files fetched for kernel where stap looks for them:
    /boot/System.map-RELEASE (/boot is on the sandbox's own root) and
    /usr/lib/debug/boot/vmlinux-RELEASE, on a tmpfs with the host's other debug files bound back
    (no mount point can be made in the read-only /usr); /boot/vmlinux-RELEASE, where elfutils
    also looks, when the host has no /usr/lib/debug."""
    argv = []
    if SYMBOLS in kernel.debug:
        argv += ["--ro-bind", kernel.debug[SYMBOLS], f"/boot/System.map-{kernel.release}"]
    vmlinux = kernel.debug.get(DEBUGINFO)
    if vmlinux and not os.path.isdir(debug_dir):
        argv += ["--ro-bind", vmlinux, f"/boot/vmlinux-{kernel.release}"]
    elif vmlinux:
        argv += ["--size", "65536", "--tmpfs", debug_dir]
        for name in sorted(os.listdir(debug_dir)):
            if name != "boot":  # other kernels' vmlinux files
                argv += ["--ro-bind", os.path.join(debug_dir, name), f"{debug_dir}/{name}"]
        argv += ["--ro-bind", vmlinux, f"{debug_dir}/boot/vmlinux-{kernel.release}",
                 "--remount-ro", debug_dir]
    return argv


def debug_need(stderr, kernel):
    """SYMBOLS or DEBUGINFO when a compile for a fetched kernel failed in pass 2 for want of its
    symbol table (a kprobe: "no match" after stap's warning that it has none) or its debuginfo
    (a DWARF probe), which the kernel has not got yet; else None."""
    if re.search(rb"^semantic error: missing \S+ kernel/module debuginfo", stderr, re.M):
        need = DEBUGINFO
    elif b"WARNING: Kernel function symbol table missing" in stderr and\
            b"semantic error: while resolving probe point" in stderr:
        need = SYMBOLS
    else:
        return None
    return None if need in kernel.debug else need


# --------------------------------------------------------------------------
# The reply: what the client sees, signed in this process
# --------------------------------------------------------------------------

def reply_for_client(compiled, req, key, version):
    """The reply to a compile: the module path line becomes the module's name (or goes, when the
    client asked for pass 5), the server's notices lead stderr, and a module built for stapusr or
    stapsys gets key's signature beside it."""
    lines = compiled.stdout.splitlines(keepends=True)
    if compiled.module:  # the module path line: its name, or nothing when the client runs pass 5
        named = b"" if req.lowered else compiled.module[0].encode() + b"\n"
        lines = [named if line.rstrip(b"\n").endswith(b".ko") else line for line in lines]
    module = compiled.module
    if module and req.signed:
        module = module + (key.module_signature(module[1]),)
    return compiled._replace(stdout=b"".join(lines), stderr=req.notices + compiled.stderr,
                             version=version, module=module)


# Signing: NSS signs with the server key where its database keeps it.

class _SECItem(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("data", ctypes.POINTER(ctypes.c_ubyte)),
                ("len", ctypes.c_uint)]


@functools.cache
def _nss3():
    """The NSS library python-nss already loaded (one process, one NSS), with the few calls that
    sign with a private key: python-nss has none."""
    try:
        lib = ctypes.CDLL("libnss3.so")  # NSS keeps an unversioned soname
    except OSError:
        lib = ctypes.CDLL(ctypes.util.find_library("nss3"))
    ptr, item, c_int = ctypes.c_void_p, ctypes.POINTER(_SECItem), ctypes.c_int
    for name, restype, argtypes in (
            ("CERT_GetDefaultCertDB", ptr, []),
            ("CERT_FindCertByDERCert", ptr, [ptr, item]),
            ("CERT_DestroyCertificate", None, [ptr]),
            ("PK11_FindKeyByAnyCert", ptr, [ptr, ptr]),
            ("SEC_SignData", c_int, [item, ctypes.c_char_p, c_int, ptr, c_int]),
            ("SECITEM_FreeItem", None, [item, c_int])):
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    return lib


class ServerKey:
    """The private key of the server certificate der, found once in the NSS database this process
    opened, and used in place: it signs every reply (a JAR, as signtool -Z would) and the .ko.sgn of
    modules built for stapusr and stapsys.  The key is never exported or written out."""

    def __init__(self, der):
        lib = _nss3()
        self.der = der
        buf = (ctypes.c_ubyte * len(der)).from_buffer_copy(der)
        self.cert = lib.CERT_FindCertByDERCert(lib.CERT_GetDefaultCertDB(),
                                               _SECItem(0, buf, len(der)))
        if not self.cert:
            raise Error("the server certificate is not in its database")
        self.key = lib.PK11_FindKeyByAnyCert(self.cert, None)
        if not self.key:
            lib.CERT_DestroyCertificate(self.cert)
            raise Error("the server certificate's private key is not in its database")
        self.lock = threading.Lock()

    def sign(self, data, algorithm):
        """RSA PKCS#1 v1.5 signature of data; algorithm names an NSS SEC_OID."""
        lib, out = _nss3(), _SECItem()
        oid = getattr(client.nss_modules()[0], algorithm)
        with self.lock:
            if lib.SEC_SignData(ctypes.byref(out), data, len(data), self.key, oid) != 0:
                raise Error("NSS could not sign with the server key")
        try:
            return ctypes.string_at(out.data, out.len)
        finally:
            lib.SECITEM_FreeItem(ctypes.byref(out), 0)

    def module_signature(self, data):
        """A module's NAME.ko.sgn: what staprun checks for stapusr and stapsys."""
        return self.sign(data, "SEC_OID_PKCS1_SHA256_WITH_RSA_ENCRYPTION")


def signed_reply(key, reply):
    return client.signed_jar(client.reply_entries(reply), key.der, key.sign)


# --------------------------------------------------------------------------
# Secure Boot: modules signed with a machine owner key (MOK) the client's firmware trusts
# --------------------------------------------------------------------------

MOK_KEY, MOK_CERT = "signing_key.priv", client.MOK_CERT_NAME  # the real server's names
_SIGNATURE_MARKER = b"~Module signature appended~\n"  # how a signed module ends
# What systemtap's own MOKs are made with: the kernel takes a signing key with digitalSignature
# usage that is no CA; the issuer "Systemtap" is how clients tell systemtap's MOKs from others.
MOK_OPENSSL_CONFIG = """\
[ req ]
default_bits = 4096
distinguished_name = req_distinguished_name
prompt = no
x509_extensions = myexts

[ req_distinguished_name ]
O = Systemtap
CN = Systemtap module signing key

[ myexts ]
basicConstraints=critical,CA:FALSE
keyUsage=digitalSignature
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
"""
_NO_MATCHING_MOK = ("Server: No matching machine owner key (MOK) available on the server to sign "
                    "the module.\n")
_ENROLL_MOK = ("Server: The server has no machine owner key (MOK) in common with this system. Use "
               "the following command to import a server MOK into this system, then reboot: "
               f"mokutil --import {MOK_CERT}\n")


def mok_fingerprint(der):
    """A certificate's SHA-1 fingerprint as mokutil prints it (ab:cd:...)."""
    return hashlib.sha1(der).digest().hex(":")


class MokStore:
    """The server's MOK key pairs, <server db>/moks/<fingerprint>/ holding signing_key.priv (the
    server's alone) and signing_key.x509, as the real server keeps them.  Keys are used only by
    sign-file, run by this process outside any sandbox: no compile ever sees them."""

    def __init__(self, db_path):
        self.path = os.path.join(db_path, "moks")
        self.lock = threading.Lock()  # one key pair made at a time

    def check(self):
        """At start: the fingerprints of the key pairs; Error for a MOK directory that is a link or
        incomplete, a private key group or others may read, a certificate not its directory's."""
        if not os.path.lexists(self.path):
            return []
        if os.path.islink(self.path) or not os.path.isdir(self.path):
            raise Error(f"MOK directory {self.path} is a link or no directory: refused")
        found = [name for name in sorted(os.listdir(self.path)) if _MOK_FINGERPRINT.match(name)]
        for name in found:
            problem = self.problem(name)
            if problem:
                raise Error(problem)
        return found

    def problem(self, fp):
        """Why the key pair fp cannot be used, or None."""
        top = os.path.join(self.path, fp)
        try:
            if os.path.islink(self.path) or not stat.S_ISDIR(os.lstat(top).st_mode):
                return f"MOK directory {top} is a link or no directory: refused"
            key, cert = (os.lstat(os.path.join(top, n)) for n in (MOK_KEY, MOK_CERT))
        except FileNotFoundError as e:
            return f"MOK directory {top} lacks {os.path.basename(e.filename)}"
        if not (stat.S_ISREG(key.st_mode) and stat.S_ISREG(cert.st_mode)):
            return f"MOK key pair in {top} is not two regular files (a link?): refused"
        if key.st_mode & 0o044:
            return (f"MOK private key {top}/{MOK_KEY} is readable by group or others: refused "
                    f"(chmod 600 {top}/{MOK_KEY})")
        try:
            der = client.read_certificate_file(os.path.join(top, MOK_CERT))
        except Error as e:
            return str(e)
        if mok_fingerprint(der) != fp:
            return (f"MOK certificate {top}/{MOK_CERT} has the fingerprint {mok_fingerprint(der)}, "
                    "not its directory's name")
        return None

    def matching(self, fingerprints):
        """The first of the client's fingerprints the server has a usable key pair for, or None."""
        for fp in fingerprints:
            if fp == _MOK_MISSING or not os.path.lexists(os.path.join(self.path, fp)):
                continue
            problem = self.problem(fp)
            if problem is None:
                return fp
            logging.warning("not signing with MOK %s: %s", fp, problem)
        return None

    def certificate_to_enroll(self):
        """The DER certificate of one of the server's key pairs, made now if it has none."""
        with self.lock:
            usable = [fp for fp in self.listing() if self.problem(fp) is None]
            fp = usable[0] if usable else self.generate()
        return client.read_certificate_file(os.path.join(self.path, fp, MOK_CERT))

    def listing(self):
        try:
            return sorted(n for n in os.listdir(self.path) if _MOK_FINGERPRINT.match(n))
        except FileNotFoundError:
            return []

    def generate(self):
        """Make a key pair with openssl, as systemtap makes its MOKs; its fingerprint."""
        os.makedirs(self.path, 0o755, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="new.", dir=self.path)  # 0700: the key is never exposed
        try:
            config, key, cert = (os.path.join(tmp, n) for n in ("openssl.cnf", MOK_KEY, MOK_CERT))
            pathlib.Path(config).write_text(MOK_OPENSSL_CONFIG)
            client.run_tool(["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days",
                             "36500", "-batch", "-x509", "-config", config, "-outform", "DER",
                             "-out", cert, "-keyout", key])
            os.chmod(key, 0o600)
            os.unlink(config)
            fp = mok_fingerprint(client.read_certificate_file(cert))
            os.rename(tmp, os.path.join(self.path, fp))
        except (Error, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            why = e if isinstance(e, Error) else e.strerror
            raise Error(f"cannot make a MOK key pair in {self.path}: {why}") from None
        logging.info("made MOK key pair %s", fp)
        return fp

    def sign(self, fp, data, release, tmpdir):
        """The module data with its appended signature (SHA-256) by the key pair fp, made by the
        release's own sign-file in a private directory of the server's."""
        program = sign_file_program(release)
        top = os.path.join(self.path, fp)
        try:
            with tempfile.TemporaryDirectory(prefix="stap-server.sign.", dir=tmpdir) as work:
                module = pathlib.Path(work, "module.ko")
                module.write_bytes(data)
                client.run_tool([program, "sha256", os.path.join(top, MOK_KEY),
                                 os.path.join(top, MOK_CERT), str(module)])
                signed = module.read_bytes()
        except OSError as e:
            raise Error(f"cannot sign the module in {tmpdir}: {e.strerror}") from None
        if not signed.endswith(_SIGNATURE_MARKER) or len(signed) <= len(data):
            raise Error(f"{program} appended no module signature")
        return signed


def sign_file_program(release, root="/"):
    """The kernel's scripts/sign-file for release: in its build tree, or in Debian's linux-kbuild
    package of its version; Error naming both when neither has it."""
    version = ".".join(release.split("-")[0].split(".")[:2])
    candidates = [f"lib/modules/{release}/build/scripts/sign-file",
                  f"usr/lib/linux-kbuild-{version}/scripts/sign-file"]
    for path in (os.path.join(root, c) for c in candidates):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise Error("cannot sign the module for Secure Boot: the kernel's sign-file is not installed "
                f"(looked for /{candidates[0]} and /{candidates[1]}; install the headers of "
                f"{release})")


def _for_secure_boot(compiled, req, moks, tmpdir):
    """The compile's reply for a client that must load signed modules (it sent MOK fingerprints):
    the module signed with the MOK it has enrolled, or, with none in common, rc 1, the real server's
    words and one of the server's certificates to enroll (as the real client saves it)."""
    if not req.moks or not compiled.module:
        return compiled
    fp = moks.matching(req.moks)
    if fp:
        name, data = compiled.module
        return compiled._replace(module=(name, moks.sign(fp, data, req.release, tmpdir)))
    return compiled._replace(rc=1, module=None, stdout=client.without_module_paths(compiled.stdout),
                             stderr=compiled.stderr + (_NO_MATCHING_MOK + _ENROLL_MOK).encode(),
                             mok_cert=moks.certificate_to_enroll())


class CompileService:
    """Answers requests: the configuration, the stap version replies announce, the credentials (TLS
    and signatures), the result cache, the compile queue, the bytes held for unanswered requests,
    the fetched kernels.  A request is read in place from its archive; it is unpacked only once a
    compile slot is its own, so waiting requests hold only their compressed bytes."""

    def __init__(self, config, credentials, version=None):
        self.config, self.credentials, self.version = config, credentials, version or stap_version()
        self.results = ResultCache(config.result_cache_size)
        self.compiles = CompileQueue(config.max_threads)
        self.pending = _PendingBytes(config.max_pending_bytes, config.tmpdir,
                                     config.tmpdir_min_free)
        self.moks = MokStore(config.db.path)
        self.envs = [BuildEnv(_HOST_ENV, "/", self.version), *config.build_envs]
        self.kernels = KernelCache(config.kernel_cache, config.kernel_cache_size)\
            if config.fetch_kernels else None

    def renewed(self, der):
        """This service under the renewed certificate der, for connections accepted from now on:
        the same queue, bytes and kernels; a result cache of its own (old replies, old key)."""
        service = copy.copy(self)
        service.credentials, service.results = Credentials(der), ResultCache(self.results.max_bytes)
        return service

    def refusal(self, record, why, busy=False):
        """The signed rc 1 reply to a request that failed, or that the server has no room for now
        (busy); the log line says why."""
        record.update(rc=1, error=f"busy: {why}" if busy else why)
        message = f"{client.BUSY_MESSAGE}: {why}; try again later" if busy else why
        return signed_reply(self.credentials.signer, ReplyContent(
            1, b"", f"stap-serverd: ERROR: {message}\n".encode(), self.version))

    def handle(self, admission, body, record):
        """The signed reply to what read_request admitted: a busy reason or a request body (bytes
        or a file); never raises for a bad request or a failed compile (rc 1 and the reason)."""
        config = self.config
        if admission is Admission.BUSY:
            return self.refusal(record, body, busy=True)
        with contextlib.ExitStack() as held:  # a fetched kernel stays while the request uses it
            try:
                archive = client.RequestArchive(client.open_archive(body), config.limits)
                req = parse_request(archive, config)
                if req.release not in config.releases and self.kernels:
                    req.kernel = held.enter_context(self.kernels.using(req.release))
                req = dataclasses.replace(req, build_env=choose_build_env(self.envs, req))
                cache_key = None if req.guru or not config.sandbox else result_key(
                    req, archive, config, self.version)
            except Error as e:
                return self.refusal(record, str(e))
            record.update(version=req.version, release=req.release, env=req.build_env.name,
                          options=" ".join(req.args),
                          guru=req.guru or None)  # the log line names guru requests only
            reply, how = self.results.lookup(
                cache_key, lambda: self.compile_and_sign(req, archive, record),
                self.compiles.merging)
        record.update(cache=how.value)
        if how not in (CacheOutcome.MISS, CacheOutcome.SKIP):  # answered without compiling here
            record.update(rc=int(how is CacheOutcome.MERGED_FAILED))
        return reply

    def compile_and_sign(self, req, archive, record):
        """(signed reply, cacheable): wait for a compile slot (or a busy reply when the wait would
        be too long), unpack the request (or a busy reply when the disk has no room for it),
        compile, sign (the key also signs modules built for stapusr/stapsys)."""
        config = self.config
        busy = self.compiles.busy_reason(config.max_wait, config.queue)
        if busy:
            return self.refusal(record, busy, busy=True), False
        try:
            knowledge, to_make = kernel_knowledge(config, req)  # may wait for the warm-up
        except (Error, OSError) as e:
            return self.refusal(record, str(e)), False
        try:
            return self.compile_with(req, archive, record, knowledge)
        finally:
            if to_make:  # the kernel's first compile is done: the server's warm-up, for later ones
                learn_knowledge(config, req, to_make)

    def compile_with(self, req, archive, record, knowledge):
        """compile_and_sign's compile, with copies of the kernel's knowledge (those of its
        tracepoints added, or waited for)."""
        config, key = self.config, self.credentials.signer
        try:
            knowledge = {**knowledge, **trace_knowledge(config, req)}  # may wait for its warm-up
        except (Error, OSError) as e:
            return self.refusal(record, str(e)), False
        with self.compiles.compiling():
            busy = self.pending.reserve(archive.unpacked_size)
            if busy:
                return self.refusal(record, busy, busy=True), False
            try:
                compiled = self.compile_once(req, archive, knowledge)
                need = req.kernel and compiled.rc and debug_need(compiled.stderr, req.kernel)
                if need:  # once: the -dbg files stap asked for, then the same compile again
                    compiled = self.with_debug_files(req, archive, knowledge, compiled, need)
                compiled = _for_secure_boot(compiled, req, self.moks, config.tmpdir)
            except (Error, OSError) as e:
                message = str(e) if isinstance(e, Error) else\
                    f"cannot prepare the compile in {config.tmpdir}: {e.strerror}"
                return self.refusal(record, message), False
            finally:
                self.pending.give_back(archive.unpacked_size)
        reply = reply_for_client(compiled, req, key, req.build_env.version)
        record.update(rc=reply.rc)
        if reply.rc:
            record.fail(server_side_cause(compiled.stderr, config))
        return signed_reply(key, reply), reply.rc == 0

    def compile_once(self, req, archive, knowledge):
        with Workspace(self.config.tmpdir) as ws:
            archive.extract(ws.work)
            compiled = run_compile(self.config, req, ws, knowledge)
            if not req.traces and ws.built_tracepoint_queries():
                _learn_tracepoints(self.config, req)
            return compiled

    def with_debug_files(self, req, archive, knowledge, compiled, need):
        """The compile again once the fetched kernel has the -dbg files need names; the first
        compile's reply, with a line that says why, when they cannot be fetched."""
        try:
            self.kernels.add_debug(req.kernel, need)
        except Error as e:
            return compiled._replace(stderr=compiled.stderr + (
                f"stap-serverd: ERROR: cannot fetch {_DEBUG_NEEDS[need]} of {req.release}: "
                f"{e}\n").encode())
        return self.compile_once(req, archive, knowledge)


# --------------------------------------------------------------------------
# The result cache: repeat requests answered without running stap
# --------------------------------------------------------------------------

class CacheOutcome(enum.StrEnum):
    """How the result cache answered (the log's cache=): with a reply it held (HIT), an identical
    request's compiling as this one came (MERGED, MERGED_FAILED), its own (MISS; SKIP: uncached)."""
    HIT, MERGED, MERGED_FAILED, MISS, SKIP = "hit", "merged", "merged-failed", "miss", "skip"


class ResultCache:
    """Signed replies of successful compiles, keyed by everything that decides them; bounded in
    bytes (least recently used go first).  Identical requests arriving together compile once and
    share the reply, a failed one too."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.entries = collections.OrderedDict()
        self.size = 0
        self.lock = threading.Lock()
        self.running = {}  # key -> its Compiling

    def lookup(self, key, compute, merging=contextlib.nullcontext):
        """(reply, CacheOutcome); compute() -> (reply, cacheable: it succeeded).  MERGED: answered
        by an identical request that was compiling when this one came (MERGED_FAILED: with its
        failure); merging() is held meanwhile."""
        if key is None or self.max_bytes <= 0:
            return compute()[0], CacheOutcome.SKIP
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key], CacheOutcome.HIT
            first = key not in self.running
            compiling = self.running.setdefault(key, _Compiling())
        if not first:
            with merging():
                compiling.done.wait()
            if compiling.reply is not None:
                return compiling.reply, (CacheOutcome.MERGED if compiling.ok
                                         else CacheOutcome.MERGED_FAILED)
            return compute()[0], CacheOutcome.MISS  # its compile broke down: try ours
        try:
            compiling.reply, compiling.ok = compute()
            if compiling.ok:
                self.store(key, compiling.reply)
            return compiling.reply, CacheOutcome.MISS
        finally:
            with self.lock:
                del self.running[key]
            compiling.done.set()

    def store(self, key, reply):
        if len(reply) > self.max_bytes // 4:
            return  # one huge reply must not flush everything else
        with self.lock:
            self.entries[key] = reply
            self.size += len(reply)
            while self.size > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.size -= len(old)


class _Compiling:
    """A compile identical requests wait for: its reply, once done."""

    def __init__(self):
        self.done, self.reply, self.ok = threading.Event(), None, False


# Options whose output differs run to run (timings, progress) or that a server should run afresh:
# requests with them are not cached.
_UNCACHED_OPTIONS = ("-v", "--vp", "-t", "--benchmark")


def result_key(req, archive, config, version):
    """A digest of everything that decides the reply: every field of the parsed request (its
    arguments, release, locale and the notices that locale gave, privilege...), every file of the
    request, the fields the server's OUTPUT_OPTIONS reach, and stamps of stap, its tapsets and
    runtime and the kernel build tree; None when the request must not be cached.  The client's
    protocol version is left out: it changes nothing in the reply."""
    if any(a.startswith(_UNCACHED_OPTIONS) for a in req.args):
        return None
    h = hashlib.sha256()
    fields = dataclasses.replace(req, version=None, kernel=None)
    for part in [version, repr([getattr(config, f) for f in sorted(set(OUTPUT_OPTIONS.values()))]),
                 repr(dataclasses.astuple(fields)), archive.digest(skip=("version",)),
                 installation_stamp(config, req.release, req.build_env, req.kernel)]:
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


_stamps = {}
_STAMP_TTL = 5  # seconds: walking the tapset and runtime trees costs a few ms


def installation_stamp(config, release, env=None, kernel=None):
    """Changes whenever stap, its tapsets or runtime (those of the build environment env, None: the
    host), the server's -I/-R trees or the release's build tree (the fetched kernel's, if one)
    change."""
    now = time.monotonic()
    root = env.root if env else "/"
    # a fetched tree is renamed into the kernel cache whole: a new inode when fetched again
    tree = kernel and stat_line(os.path.join(kernel.root, "lib", "modules", release))
    cached = _stamps.get((root, release, tree))
    if cached and now - cached[0] < _STAMP_TTL:
        return cached[1]
    build = f"/lib/modules/{release}/build"
    stap = shutil.which(_stap_program()) or _stap_program() if root == "/" else\
        _rooted(root, "usr/bin/stap")
    paths = [stap, f"{build}/.config", f"{build}/Module.symvers",
             f"{build}/include/generated/utsrelease.h"]
    for top in [_rooted(root, "usr/share/systemtap")] + server_trees(config):
        paths += walk_files(top)
    stamp = hashlib.sha256(b"".join(map(stat_line, paths)) + (tree or b"")).hexdigest()
    _stamps[(root, release, tree)] = (now, stamp)
    return stamp


def stat_line(path):
    try:
        st = os.stat(path)
    except OSError:
        return f"{path} missing\n".encode()
    return f"{path} {st.st_size} {st.st_mtime_ns} {st.st_ino}\n".encode()


# --------------------------------------------------------------------------
# The listener: TLS connections, a bounded pool of compiles, shutdown
# --------------------------------------------------------------------------
#
#   socketserver.TCPServer + ThreadingMixIn
#    └─ CompileServer     the socket, admission (connections, per-address
#                         slots), its CompileService (credentials, result cache,
#                         queue, pending bytes), renewal checks between accepts
#   ConnectionTable       the connections held; when full, a newcomer
#                         evicts the largest holder's oldest unread one
#   socketserver.BaseRequestHandler
#    └─ CompileHandler    one connection, in its own thread: TLS, the
#                         request spooled to disk, the reply, a log line
#   Credentials           the certificate, its TLS key and signing key
#   RequestRecord         what the log line says about one connection
#   FifoSlots             slots handed on in arrival order, per key
#    ├─ CompileQueue      compile slots, the expected wait, the load hint
#    └─ AddressSlots      unread connections per client address
#   DropCounts            dropped connections, logged as counts

def _init_nss(config):
    """Open the server database for this process's TLS and signing."""
    nss, ssl, _, nerror = client.nss_modules()
    try:
        nss.nss_init(config.db.spec)
    except nerror.NSPRError as e:
        raise Error(f"cannot open server database {config.db.path}: {e.strerror}") from None
    client.restrict_cipher_suites()
    ssl.config_server_session_id_cache()


class Credentials:
    """The server certificate der, its key for TLS and for signing; a renewal puts a CompileService
    with new Credentials in place for connections accepted from then on."""

    def __init__(self, der):
        self.signer, self.der = ServerKey(der), der  # Error if no open database holds it
        nss = client.nss_modules()[0]
        self.cert = nss.Certificate(der)  # by its DER: the database's own, in whichever is open
        self.key = nss.find_key_by_any_cert(self.cert)

    def accept_tls(self, conn, timeout):
        """Wrap an accepted socket in server-side TLS and shake hands."""
        conn.settimeout(None)
        sock = client.tls_socket(conn, as_server=True)
        sock.config_secure_server(self.cert, self.key, self.cert.find_kea_type())
        sock.reset_handshake(True)
        try:
            sock.force_handshake_timeout(client.nss_interval(timeout))
        except BaseException:
            sock.close()  # else the descriptor stays open until garbage collection
            raise
        return sock


class RequestRecord:
    """What the log line says about one connection, filled in as it goes; the first error noted is
    the one kept."""

    FIELDS = ("client", "sandbox", "size", "version", "release", "env", "options", "guru", "cache",
              "rc", "error", "seconds")
    __slots__ = FIELDS  # a misspelt field is an AttributeError

    def __init__(self, **fields):
        self.update(**{**dict.fromkeys(self.FIELDS), **fields})

    def update(self, **fields):
        for name, value in fields.items():
            setattr(self, name, value)

    def fail(self, message):
        if self.error is None:
            self.error = message

    def log_line(self):
        """One bounded line: each field cut with its original length noted."""
        parts = [f"{name}={_cut(repr(v) if isinstance(v, str) else str(v), _LOG_FIELD_MAX)}"
                 for name in self.FIELDS if (v := getattr(self, name)) is not None]
        return _cut("request " + " ".join(parts), LOG_LINE_MAX)


def _cut(text, limit):
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text)} chars]"


class CompileServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Accepts TLS connections; each is handled in its own thread, and compiles run at most
    max_threads at once; the others wait in arrival order, as long as their expected wait and the
    bytes held allow."""

    daemon_threads = True  # shutdown() waits for them itself, with a grace period
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, config, der):
        _init_nss(config)
        self.config = config
        self.service = CompileService(config, Credentials(der))
        self.drops = DropCounts()
        self.unread = AddressSlots(config.max_per_address, self.drops)
        self.table = ConnectionTable(_descriptors_for_connections(), self.unread, self.drops)
        self.on_renewal = lambda der: None  # e.g. advertise the new serial
        self.handlers = set()
        self.next_renewal_check = time.monotonic() + config.renew_check
        self.address_family = socket.AF_INET6 if ":" in config.listen else socket.AF_INET
        try:
            super().__init__((config.listen, config.port), _CompileHandler)
        except OSError as e:
            raise Error(f"cannot listen on {config.listen} port {config.port}: "
                        f"{e.strerror}") from None
        self.port = self.server_address[1]

    def server_bind(self):
        if self.address_family == socket.AF_INET6:  # IPv4 clients too, as ::ffff:a.b.c.d
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self):
        """accept(); out of descriptors, a pause first, rather than a busy loop on a listening
        socket that stays readable (evicted connections' handlers are closing theirs)."""
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)
            raise

    def process_request(self, request, client_address):
        """Into the connection table (perhaps in an evicted one's place) before its thread starts:
        the server always accepts, so that no one waits in the kernel's backlog behind connections
        it holds."""
        if self.table.admit(request, address_key(client_address[0])) is None:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def close_request(self, request):
        super().close_request(request)
        self.table.release(request)

    def process_request_thread(self, request, client_address):
        self.handlers.add(threading.current_thread())
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.handlers.discard(threading.current_thread())

    def service_actions(self):
        """Between accepts: the counts of dropped connections and the certificate's renewal check,
        when due."""
        self.drops.report()
        if time.monotonic() >= self.next_renewal_check:
            self.next_renewal_check += self.config.renew_check
            self.renew_if_expiring()

    def renew_if_expiring(self):
        """Replace a certificate that expires within 30 days.  True if renewed."""
        if not expires_within(self.service.credentials.der, _RENEW_BEFORE):
            return False
        try:
            self.service = self.service.renewed(ensure_server_certificate(self.config.db))
        except Error as e:
            logging.error("certificate renewal failed: %s", e)
            return False
        der = self.service.credentials.der
        logging.info("renewed the server certificate while running: serial %s, SHA-256 "
                     "fingerprint %s", certinfo(der), client.fingerprint(der))
        _write_status(self.config, self.port, der)
        self.on_renewal(der)
        return True

    def drain(self, grace=30):
        """After shutdown(): close the socket and let in-flight requests finish within grace
        seconds; then stop the compiles still running (the warm-ups, which no client waits for,
        and requests past the grace), and wait for each to remove its directory."""
        self.server_close()
        deadline = time.monotonic() + grace
        for t in list(self.handlers):
            t.join(max(0, deadline - time.monotonic()))
        _STOPPING.set()
        deadline = time.monotonic() + _STOPPED_COMPILE_CLEANUP
        for t in list(self.handlers) + list(_WARM_UPS):
            t.join(max(0, deadline - time.monotonic()))


class _PendingBytes:
    """Bytes on disk of the requests not answered yet, as sent while they are received or wait, as
    unpacked while they compile: bounded by --max-pending-bytes, and by a floor of free space in
    the temporary directory (--tmpdir-min-free)."""

    def __init__(self, limit, tmpdir, min_free):
        self.limit, self.tmpdir, self.min_free = limit, tmpdir, min_free
        self.held, self.lock = 0, threading.Lock()

    def reserve(self, size):
        """Hold size bytes; or, when they do not fit, say why (the text of a busy reply)."""
        with self.lock:
            if self.held + size > self.limit:
                return (f"{self.held} bytes of requests are pending (--max-pending-bytes "
                        f"{self.limit})")
            st = os.statvfs(self.tmpdir)
            free = st.f_bavail * st.f_frsize
            if free - size < self.min_free:
                return (f"{self.tmpdir} has {free} bytes free, and a request of {size} "
                        f"would leave less than --tmpdir-min-free {self.min_free}")
            self.held += size
            return None

    def give_back(self, size):
        with self.lock:
            self.held -= size


class _CompileHandler(socketserver.BaseRequestHandler):
    """One connection.  setup() waits for the client address's share of unread connections, handle()
    shakes hands, spools the request to disk, gives the share back and answers, finish() writes the
    log line."""

    def setup(self):
        self.started = time.monotonic()
        self.record = RequestRecord(client=format_address(self.client_address),
                                    sandbox=None if self.server.config.sandbox else "off")
        self.sock = None
        self.address = address_key(self.client_address[0])
        self.conn = self.server.table.connection(self.request)
        self.admitted = self.unread = self.server.unread.wait(self.address, self.conn.turn,
                                                              self.server.config.io_timeout)

    def handle(self):
        if not self.admitted:  # its address kept all its slots busy all along
            return
        _, _, nio, nerror = client.nss_modules()
        service, config = self.server.service, self.server.config  # one certificate throughout
        try:
            self.sock = service.credentials.accept_tls(self.request, config.handshake_timeout)
            with read_request(self.sock, self.record, service) as (admission, body):
                self.request_read()
                if admission is not Admission.NOTHING and not self.conn.evicted:
                    reply = service.handle(admission, body, self.record)
                    self.sock.sendall(reply, client.nss_interval(config.io_timeout
                                                                 + len(reply) / 1e5))
                    self.sock.shutdown(nio.PR_SHUTDOWN_BOTH)
        except nerror.NSPRError as e:
            self.record.fail(e.strerror)
        except Error as e:
            self.record.fail(str(e))
        except Exception as e:  # e.g. a full disk: this connection fails, the server goes on
            self.record.fail(f"internal error: {e}")
            logging.exception("request from %s failed", self.record.client)

    def request_read(self):
        """The request is in (or never will be): the address's slot passes on."""
        if self.unread:
            self.unread = False
            self.server.unread.give_back(self.address)
            self.server.table.read(self.conn)

    def finish(self):
        self.request_read()
        if self.sock is not None:
            self.sock.close()
        if not self.admitted or self.conn.evicted:
            return  # counted among the dropped connections
        self.record.seconds = f"{time.monotonic() - self.started:.3f}"
        logging.info("%s", self.record.log_line())


class Admission(enum.Enum):
    """How read_request ends: READ (a body), BUSY (a busy reply's reason), NOTHING to answer."""
    READ, BUSY, NOTHING = "read", "busy", "nothing"


class _Turn(threading.Event):
    """One holder's place in a line of FifoSlots: set once it is handed a slot (handed) or taken
    out of the line."""

    handed = False


class FifoSlots:
    """At most `limit` holders of each key at once; the others wait strictly in arrival order (a
    freed slot is handed to the first waiter, never grabbed by a newcomer)."""

    def __init__(self, limit):
        self.limit = limit
        self.lock = threading.Lock()
        self.held = collections.Counter()
        self.waiting = collections.defaultdict(collections.deque)  # key -> Turns, first first

    def take(self, key=None, timeout=None):
        """True once a slot of key is ours; False when none came free in time."""
        turn = self.enter(key)
        turn.wait(timeout)
        return self.withdraw(key, turn)

    def enter(self, key=None):
        """A Turn in key's line, handed a slot at once if one is free and no one waits."""
        turn = _Turn()
        with self.lock:
            if self.held[key] < self.limit and not self.waiting[key]:
                self.held[key] += 1
                turn.handed = True
                turn.set()
            else:
                self.waiting[key].append(turn)
        return turn

    def withdraw(self, key, turn):
        """Take turn out of key's line (waking its waiter) unless it was handed a slot; True if it
        was (the slot is then to be given back)."""
        with self.lock:
            if not turn.handed:
                line = self.waiting[key]
                with contextlib.suppress(ValueError):
                    line.remove(turn)
                if not line:
                    del self.waiting[key]
                turn.set()
            return turn.handed

    def give_back(self, key=None):
        with self.lock:
            if self.waiting[key]:
                turn = self.waiting[key].popleft()  # the slot passes on; held stays
                turn.handed = True
                turn.set()
                return
            del self.waiting[key]
            self.held[key] -= 1
            if not self.held[key]:
                del self.held[key]

    def counts(self, key=None):
        """(slots held, holders waiting) for key."""
        with self.lock:
            return self.held[key], len(self.waiting.get(key, ()))


class CompileQueue(FifoSlots):
    """At most `limit` compiles at once (--max-threads), the others waiting in arrival order; recent
    compile times give each newcomer its expected wait, and the advertisement its load hint."""

    def __init__(self, limit):
        super().__init__(limit)
        self.merged = 0  # requests waiting for an identical one's compile
        self.recent = 5.0  # seconds a compile takes, smoothed (a first guess)

    def busy_reason(self, max_wait, max_queue=None):
        """Why a newcomer cannot wait for a slot (the text of a busy reply), or None."""
        running, ahead = self.counts()
        wait = self.expected_wait(running, ahead)
        if running >= self.limit and (wait > max_wait or
                                            (max_queue is not None and ahead >= max_queue)):
            return (f"{ahead} requests wait for {self.limit} compile slots; "
                    f"the expected wait of {wait:.0f} s is over the server's limit "
                    f"of {max_wait:.0f} s")
        return None

    def expected_wait(self, running, ahead):
        if running < self.limit and not ahead:
            return 0.0
        return (ahead // self.limit + 1) * self.recent

    def hint(self):
        """What the advertisement says of the load: slots, busy, queued, and a recent compile's
        seconds."""
        running, queued = self.counts()
        return {"slots": self.limit, "busy": running, "queued": queued,
                "compile": round(self.recent, 1)}

    @contextlib.contextmanager
    def compiling(self):
        """A compile slot, held meanwhile (waiting in line for it first)."""
        self.take()
        self.log_concurrency()
        started = time.monotonic()
        try:
            yield
        finally:
            with self.lock:
                self.recent = 0.7 * self.recent + 0.3 * (time.monotonic() - started)
            self.give_back()

    @contextlib.contextmanager
    def merging(self):
        """A request that waits for an identical one's compile: being answered too, it counts in the
        concurrency the log tells."""
        with self.lock:
            self.merged += 1
        self.log_concurrency()
        try:
            yield
        finally:
            with self.lock:
                self.merged -= 1

    def log_concurrency(self):
        running = self.counts()[0] + self.merged
        if running > 1:  # the real server's words, for log searches
            logging.info("Processing %d concurrent requests...", running)


MAX_CONNECTIONS = 1024  # connections held open, all addresses together (threads, descriptors)
_FDS_PER_CONNECTION = 2  # its own descriptor and the table's duplicate
_FD_RESERVE = 128  # descriptors for everything else: the databases, the log, compiles' pipes
_DROP_LOG_INTERVAL = 10  # seconds: dropped connections are logged as counts
_DROP_LOG_LINES = 5  # addresses named for each reason in one report


class DropCounts:
    """Dropped connections, logged as counts by reason and address: the first at once, then at
    most _DROP_LOG_LINES addresses for each reason (and a total of the others) every
    _DROP_LOG_INTERVAL seconds, so that a flood of connections cannot flood the log."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # (reason, address) -> connections
        self.last_report = -_DROP_LOG_INTERVAL

    def note(self, address, reason):
        with self.lock:
            self.counts[reason, address] += 1
        self.report()

    def report(self):
        """Log the counts if the interval has passed (also called between accepts, so that the
        tail of a burst is not kept back until the next drop)."""
        with self.lock:
            if not self.counts or time.monotonic() - self.last_report < _DROP_LOG_INTERVAL:
                return
            counts, self.counts = self.counts, collections.Counter()
            self.last_report = time.monotonic()
        for reason in dict.fromkeys(reason for reason, _ in counts):
            ranked = [(n, address) for (r, address), n in counts.most_common() if r == reason]
            for n, address in ranked[:_DROP_LOG_LINES]:
                logging.warning("dropped %d connections from %s %s", n, address, reason)
            if rest := ranked[_DROP_LOG_LINES:]:
                logging.warning("dropped %d connections from %d other addresses %s",
                                sum(n for n, _ in rest), len(rest), reason)


class AddressSlots(FifoSlots):
    """Connections whose request is not read yet, by client address (IPv6: its /64).  Past the limit
    a new connection waits in line for its address's next free slot (up to a deadline), so silent
    peers of one address keep only that address waiting, while a burst of real clients from one
    address (a build farm behind NAT) is served in turn.  Connections dropped after waiting are
    logged as counts."""

    def __init__(self, limit, drops):
        super().__init__(limit)
        self.drops = drops

    def wait(self, key, turn, timeout):
        """True once turn holds a slot of key; False when none came free within timeout (a drop,
        counted) or the connection table took the turn out of the line (an eviction)."""
        in_time = turn.wait(timeout)
        if self.withdraw(key, turn):
            return True
        if not in_time:
            self.drops.note(key, f"after {timeout:.0f} s in line: {self.limit} connections of "
                            "that address were still unread (--max-per-address)")
        return False


class _Connection:
    """One connection the table holds: its address, its turn in the address's line, and a duplicate
    of its socket, the table's own, to shut it down with when it is evicted (the handler's
    descriptor passes to NSS and may be closed and reused at any moment)."""

    __slots__ = ("address", "turn", "handle", "number", "evicted")

    def __init__(self, address, turn, handle, number):
        self.address, self.turn, self.handle, self.number = address, turn, handle, number
        self.evicted = False


class ConnectionTable:
    """The connections the server holds, at most `limit`.  When it is full, a newcomer takes the
    place of the oldest unread connection (its request not read yet) of the address holding the
    most unread ones; a newcomer whose address holds as many as any other takes its own address's
    oldest.  So the unread connections beyond an even share go first, oldest first, an address
    never loses its last one to make room for a bigger one, and no crowd of addresses keeps
    another out.  Until the table is full nothing is evicted (a burst from one address waits in
    that address's line, AddressSlots).  A newcomer is refused only when every connection held
    has its request read."""

    def __init__(self, limit, slots, drops):
        self.limit, self.slots, self.drops = limit, slots, drops
        self.lock = threading.Lock()
        self.held = {}  # accepted socket -> Connection, until its handler closes it
        self.places = 0  # connections held that were not evicted
        self.unread = {}  # address -> its unread Connections, oldest first
        self.accepted = 0

    def admit(self, sock, address):
        """A Connection for the accepted sock, in its address's line for a slot, perhaps in the
        place of an evicted one; None if it is refused."""
        with self.lock:
            if self.places >= self.limit and not self.make_room(address):
                self.drops.note(address, f"at once: the {self.limit} connections the server "
                                "holds all have their requests read")
                return None
            self.accepted += 1
            conn = _Connection(address, self.slots.enter(address), sock.dup(), self.accepted)
            self.held[sock] = conn
            self.places += 1
            self.unread.setdefault(address, collections.deque()).append(conn)
            return conn

    def make_room(self, address):
        """Evict the connection whose place a newcomer from address takes; False if none may go."""
        own = self.unread.get(address, ())
        largest = max(self.unread.values(), key=lambda line: (len(line), -line[0].number),
                      default=())
        victims = largest if len(largest) > len(own) else own
        if not victims:
            return False
        self.evict(victims[0])
        return True

    def evict(self, conn):
        """Drop conn: out of its address's line, and its socket shut down, so that its handler's
        handshake or read returns at once."""
        self.forget_unread(conn)
        conn.evicted = True
        self.places -= 1
        self.slots.withdraw(conn.address, conn.turn)
        with contextlib.suppress(OSError):
            conn.handle.shutdown(socket.SHUT_RDWR)
        conn.handle.close()
        self.drops.note(conn.address, f"(unread, oldest first) to make room for addresses "
                        f"holding fewer: the server holds at most {self.limit} connections")

    def forget_unread(self, conn):
        line = self.unread.get(conn.address, ())
        if conn in line:
            line.remove(conn)
            if not line:
                del self.unread[conn.address]

    def connection(self, sock):
        with self.lock:
            return self.held[sock]

    def read(self, conn):
        """conn's request is read (or never will be): it can no longer be evicted.  False if it was
        evicted already."""
        with self.lock:
            self.forget_unread(conn)
            return not conn.evicted

    def release(self, sock):
        """sock's handler is done: its place is free (unless its eviction freed it already)."""
        with self.lock:
            conn = self.held.pop(sock, None)
            if conn is None or conn.evicted:
                return
            self.forget_unread(conn)
            self.places -= 1
        conn.handle.close()


def _descriptors_for_connections():
    """Raise the soft limit of open descriptors (to at most the hard limit) to what MAX_CONNECTIONS
    need: a distribution's default of 1,024 would not do.  The connections the limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_CONNECTIONS * _FDS_PER_CONNECTION + _FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < want:
        allowed = max(1, (soft - _FD_RESERVE) // _FDS_PER_CONNECTION)
        logging.warning("holding at most %d connections, not %d: the limit of open files is %d "
                        "(raise it to %d)", allowed, MAX_CONNECTIONS, soft, want)
        return allowed
    return MAX_CONNECTIONS


def address_key(host):
    """What counts as one client: its IPv4 address, or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


_LOG_FIELD_MAX = 200  # characters of one field in a request's log line
LOG_LINE_MAX = 1900  # a whole line stays under 2 KB with the time stamp


@contextlib.contextmanager
def read_request(sock, record, service):
    """(Admission, the request body spooled into an anonymous file, or the reason of a busy reply);
    its announced size is held in the service's pending bytes until the reply has gone."""
    deadline = time.monotonic() + service.config.io_timeout
    _quick_ack(sock)
    announced = io.BytesIO()
    _spool(sock, announced, 4, deadline)
    size = record.size = int.from_bytes(announced.getvalue(), "big", signed=True)
    if size <= 0 or size > service.config.max_compressed_request:
        record.fail("certificate fetch" if size == 0 else f"bad request size {size}"
                    if size < 0 else  # the real server's words, for log searches
                    f"Error size of (compressed) request file is too large: {size} "
                    f"bytes (--max-compressed-request {service.config.max_compressed_request})")
        yield Admission.NOTHING, None
        return
    busy = service.pending.reserve(size)
    if busy:  # drain it: a close with unread bytes would reset the reply
        with open(os.devnull, "wb") as sink:
            _spool(sock, sink, size, deadline + size / 1e5)
        yield Admission.BUSY, busy
        return
    try:
        with tempfile.TemporaryFile(dir=service.config.tmpdir) as body:
            _quick_ack(sock)
            _spool(sock, body, size, deadline + size / 1e5)
            if _more_data_waiting(sock):
                record.fail("more bytes than announced")
                yield Admission.NOTHING, None
                return
            body.seek(0)
            yield Admission.READ, body
    finally:
        service.pending.give_back(size)


def _spool(sock, out, n, deadline):
    """Copy exactly n bytes from sock to the file out, chunk by chunk."""
    nerror = client.nss_modules()[3]
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Error(f"timed out after {got} of {n} bytes")
        try:
            chunk = sock.recv(min(n - got, 1 << 16), client.nss_interval(left))
        except nerror.NSPRError as e:
            raise Error(f"read failed after {got} of {n} bytes: {e.strerror}") from None
        if not chunk:
            raise Error(f"connection closed after {got} of {n} bytes")
        out.write(chunk)
        got += len(chunk)


def _quick_ack(sock):
    """Acknowledge at once while reading a request: a client that writes the size and the archive
    separately (the real stap does) otherwise waits on Nagle for our delayed ACK, 40 ms a request.
    Linux re-arms delayed ACKs by itself, so this is repeated before each read."""
    with (contextlib.suppress(OSError, AttributeError),  # not Linux, or not TCP: only slower
          socket.fromfd(sock.fileno(), socket.AF_INET6, socket.SOCK_STREAM) as dup):
        dup.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _more_data_waiting(sock):
    """True when the peer already sent bytes beyond the announced request (looked at without
    waiting: a client sends nothing after its request)."""
    _, _, nio, nerror = client.nss_modules()
    try:
        return bool(sock.recv(1, nio.PR_INTERVAL_NO_WAIT))
    except nerror.NSPRError:
        return False  # nothing there (would block), or the peer closed


def format_address(address):
    """A client's HOST:PORT ([HOST]:PORT for IPv6), an IPv4 client as IPv4."""
    return str(client.Peer(address[0].removeprefix("::ffff:"), address[1]))


@functools.cache
def stap_version():
    """The numeric version of the installed stap, e.g. 4.8 (the protocol level a reply announces;
    real clients abort on a non-numeric one)."""
    out = client.run_tool([_stap_program(), "-V"], check=False)
    return _version_of(out.stdout + out.stderr) or client.PROTOCOL_VERSION


def _version_of(output):
    """The version in what `stap -V` printed, or None."""
    m = re.search(rb"version (\d+(?:\.\d+)*)", output)
    return m.group(1).decode() if m else None


# --------------------------------------------------------------------------
# Advertising on the local network (DNS-SD)
# --------------------------------------------------------------------------

_INSTANCE_PREFIX = "Systemtap Compile Server on "
_PUBLISH_TIMEOUT = 10.0  # avahi probes names for ~1 s; allow slack
_MDNS_TTL = 120  # short: a crashed server vanishes in 2 min
_PROBE_WAIT = 0.3  # how long a name probe waits for an owner
_WILDCARDS = (None, "", "::", "0.0.0.0")  # listen addresses meaning every address


def alternative_name(name):
    """Next name after a collision: 'X' -> 'X #2', 'X #2' -> 'X #3'."""
    match = re.fullmatch(r"(.*) #(\d+)", name)
    return f"{match[1]} #{int(match[2]) + 1}" if match else f"{name} #2"


@dataclasses.dataclass
class Offer:
    """What a server advertises, as every publisher reads it (avahi, our own responder, a DNS zone):
    one DNS-SD instance per served sysinfo, at port on host (its short name).  The server's
    Advertising renews certinfo and the load hint in place."""
    port: int
    sysinfos: list
    version: str
    certinfo: str  # the certificate's serial, as certinfo() gives it
    optinfo: str = ""  # the server's own stap options
    mok_info: list = dataclasses.field(default_factory=list)  # fingerprints of its MOKs
    versions: list = dataclasses.field(default_factory=list)  # with --build-env: every stap's
    listen: str = None  # the address the server listens on (see WILDCARDS)
    hint: dict = dataclasses.field(default_factory=dict)  # the load: CompileQueue.hint()
    host: str = dataclasses.field(default_factory=lambda: socket.gethostname().split(".")[0])

    def names(self):
        """A distinct instance name for each sysinfo; collisions bump the suffix later."""
        names = [_INSTANCE_PREFIX + self.host]
        while len(names) < len(self.sysinfos):
            names.append(alternative_name(names[-1]))
        return names

    def txt(self, sysinfo):
        """One instance's TXT strings, as real systemtap clients read them, then our load hint and,
        with build environments, every stap version served (real clients ignore keys they do not
        know)."""
        known = {"sysinfo": sysinfo, "version": self.version, "certinfo": self.certinfo,
                 "optinfo": self.optinfo}
        return [f"{key}={value}" for key, value in [*known.items(), *self.hint.items()]] +\
            [f"mok_info={fp}" for fp in self.mok_info] +\
            ([f"versions={','.join(self.versions)}"] if self.versions else [])


class AvahiAdvertiser:
    """An Offer through `avahi-publish-service` children (AvahiPublisher), one per instance."""

    def __init__(self, offer):
        self.offer, self.publishers, self.names = offer, [], []

    def start(self):
        """Self when avahi published every instance, None when no daemon answers."""
        if shutil.which("avahi-publish-service") is None:
            return None
        # Every instance at once: avahi probes each name for ~1 s.
        self.publishers = [AvahiPublisher(name, self.offer.port, self.offer.txt(sysinfo))
                           for name, sysinfo in zip(self.offer.names(), self.offer.sysinfos)]
        try:
            if all(pub.wait_established(_PUBLISH_TIMEOUT) for pub in self.publishers):
                self.names = [pub.name for pub in self.publishers]
                return self
        finally:
            if not self.names:  # a failure, or no daemon: our responder may take over
                self.stop()

    def refresh(self):
        return False  # avahi-publish-service takes its TXT once: publish again

    def stop(self):
        for pub in self.publishers:
            pub.stop()
        self.publishers = []


def _ipv6_addresses(ifname):
    """The IPv6 addresses of an interface, from /proc/net/if_inet6."""
    try:
        with open("/proc/net/if_inet6") as f:
            return [str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
                    for fields in map(str.split, f) if len(fields) == 6 and fields[5] == ifname]
    except OSError:
        return []  # no IPv6 here


def _reachable_interfaces(listen):
    """Interfaces where clients can reach a server listening on `listen`: every one for a wildcard
    address, else the one holding the address (for loopback, lo alone: a loopback server is never
    announced to the network)."""
    interfaces = client.ipv4_interfaces()
    if listen in _WILDCARDS:
        return interfaces
    if ipaddress.ip_address(listen).is_loopback:
        return [i for i in interfaces if i.loopback]
    return [i for i in interfaces if i.address == listen]


class AvahiPublisher:
    """One `avahi-publish-service` child: the instance lives while it does.  A child that fails on a
    name that another client of this host's avahi daemon holds is started again under the next name
    (avahi renames by itself only on a collision with another host); one that ends after it
    registered (the daemon restarted) is started again, waiting for the daemon (-f), so the server
    is advertised again."""

    def __init__(self, name, port, txt):
        self.name, self.port, self.txt = name, port, txt
        self.stderr_lines = []
        self.lock = threading.Lock()  # stop() against a restart
        self.stopped, self.established = threading.Event(), threading.Event()
        self.proc = self.spawn()
        self.reader = threading.Thread(target=self.read_stderr, daemon=True)
        self.reader.start()

    def spawn(self, options=()):
        argv = ["avahi-publish-service", *options, "--service", self.name, client.SERVICE_TYPE,
                str(self.port), *self.txt]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def read_stderr(self):
        # avahi-publish-service reports on stderr: "Established under name 'X'", "Service name
        # collision, renaming service to 'X #2'" (it then re-registers by itself) or a failure.
        # Keep draining it so the child never blocks on a full pipe.
        while True:
            for line in self.proc.stderr:
                self.stderr_lines = (self.stderr_lines + [line.rstrip("\n")])[-20:]
                if match := re.match(r"Established under name '(.*)'", line):
                    self.name = match[1]
                    self.established.set()
            self.proc.wait()
            restart = self.established.is_set()
            # a daemon going down takes a moment: wait a little before a restart
            if restart and self.stopped.wait(1.0):
                return
            if not restart and "name collision" not in "".join(self.stderr_lines[-1:]).lower():
                return  # a failure: wait_established() says which
            with self.lock:
                if self.stopped.is_set():
                    return
                if restart:
                    logging.warning("avahi-publish-service ended (%s): publishing %r again once "
                                    "the avahi daemon is back", self.stderr_lines[-1:] or "no word",
                                    self.name)
                else:
                    self.name = alternative_name(self.name)
                self.proc.stderr.close()
                self.proc = self.spawn(["--no-fail"] if restart else [])

    def wait_established(self, timeout):
        """True once registered; False when no avahi daemon answers."""
        deadline = time.monotonic() + timeout
        while not self.established.wait(0.02):
            if not self.reader.is_alive():  # the child failed, and is not started again
                if any(m in "\n".join(self.stderr_lines) for m in client.AVAHI_NO_DAEMON):
                    return False
                raise client.DiscoveryError(
                    f'avahi-publish-service: {self.stderr_lines[-1:] or "failed"}')
            if time.monotonic() > deadline:
                raise client.DiscoveryError(f"avahi-publish-service: no registration after "
                                            f"{timeout:.0f} s: {self.stderr_lines[-1:]}")
        return True

    def stop(self):
        with self.lock:
            self.stopped.set()
        self.proc.terminate()  # nothing when it has ended
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(2)
        self.proc.stderr.close()


class MdnsResponder:
    """A minimal multicast DNS responder for our own instances (RFC 6762), answering from the
    Offer as it is at each question.

    It answers PTR queries for _stap._tcp.local (and the DNS-SD meta query), SRV/TXT/ANY
    queries for our instance names and A queries for <short host>.local.  The socket shares
    UDP port 5353 (SO_REUSEADDR and SO_REUSEPORT) with any other responder on the host.
    """

    def __init__(self, offer):
        client.require_dnspython()
        self.offer = offer
        self.hostname = dns.name.from_text(f"{offer.host}.{client.MDNS_DOMAIN}.")
        self.meta = dns.name.from_text(f"_services._dns-sd._udp.{client.MDNS_DOMAIN}.")
        self.interfaces = _reachable_interfaces(offer.listen)

    def start(self):
        if not self.interfaces:
            raise client.DiscoveryError("no multicast-capable IPv4 interface to advertise on")
        self.names = self.claim_names(self.offer.names())
        self.sock = self.open_socket()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True, name="mdns-responder")
        self.thread.start()
        self.announce(_MDNS_TTL)
        return self

    def refresh(self):
        return True  # the load hint is answered from the offer at each question

    def stop(self):
        self.stopping.set()
        self.thread.join(2)
        self.announce(0)  # goodbye: TTL 0 (RFC 6762 10.1)
        self.sock.close()

    def open_socket(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IP, client.IP_PKTINFO, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        # Multicast reaches only a socket bound to the wildcard (or the group) address; the tests
        # run this only inside network namespaces.
        sock.bind(("0.0.0.0", client.MDNS_PORT))
        for iface in self.interfaces:  # ip_mreqn: group, any local address, interface
            mreqn = struct.pack("4s4si", socket.inet_aton(client.MDNS_GROUP), bytes(4), iface.index)
            with contextlib.suppress(OSError):  # already joined (shared group)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        return sock

    # --- names ---

    def claim_names(self, names):
        """Probe each name (RFC 6762 8.1, simplified): if somebody answers for it, take the next
        alternative, so servers on one host differ."""
        claimed = []
        for name in names:
            while name in claimed or self.name_taken(name):
                name = alternative_name(name)
            claimed.append(name)
        return claimed

    def name_taken(self, name):
        fqdn = self.instance_fqdn(name)
        deadline = time.monotonic() + _PROBE_WAIT
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("0.0.0.0", 0))
            client.send_to_group(sock, self.interfaces,
                                 client.mdns_query([(fqdn, dns.rdatatype.SRV)]))
            while (left := deadline - time.monotonic()) > 0:
                message = client.receive_mdns(sock, left)[0]
                if message is not None and message.flags & dns.flags.QR and\
                        any(rrset.name == fqdn for rrset in message.answer):
                    return True
        return False

    def instance_fqdn(self, name):
        return dns.name.Name([name.encode("utf-8")]).concatenate(client.service_name())

    # --- records ---

    def records(self, ttl, iface):
        """All our rrsets, with this TTL and the addresses of this interface."""
        def rrset(owner, rdtype, *texts):
            return dns.rrset.from_text(owner, ttl, "IN", rdtype, *texts)
        stype = client.service_name()
        fqdns = [self.instance_fqdn(name) for name in self.names]
        table = [rrset(self.meta, "PTR", stype.to_text()),
                 rrset(stype, "PTR", *[fqdn.to_text() for fqdn in fqdns])]
        for fqdn, sysinfo in zip(fqdns, self.offer.sysinfos):
            table += [rrset(fqdn, "SRV", f"0 0 {self.offer.port} {self.hostname}"),
                      rrset(fqdn, "TXT", client.txt_rdata_text(self.offer.txt(sysinfo)))]
        table.append(rrset(self.hostname, "A", iface.address))
        # reachable over IPv6 too
        if self.offer.listen in (None, "", "::") and (v6 := _ipv6_addresses(iface.name)):
            table.append(rrset(self.hostname, "AAAA", *v6))
        return table

    # --- serving ---

    def serve(self):
        while not self.stopping.is_set():
            try:
                self.handle_packet(*client.receive_mdns(self.sock, 0.2))
            except Exception:  # noqa: BLE001 - keep serving
                continue

    def handle_packet(self, message, unicast_flags, source, ifindex):
        if message is None:
            return  # nothing, or garbage
        if message.flags & dns.flags.QR:
            self.resolve_conflicts(message)  # another responder's answer
            return
        iface = self.interface_of(ifindex)
        if iface is None:
            return
        legacy = source[1] != client.MDNS_PORT  # a one-shot query (6.7)
        table = self.records(min(_MDNS_TTL, 10) if legacy else _MDNS_TTL, iface)
        answers, additional = client.mdns_answers(message.question, table, self.hostname)
        if answers:
            unicast = legacy or any(unicast_flags)
            client.send_to_group(self.sock, [iface], client.mdns_response(
                answers, additional, message if legacy else None),
                source if unicast else (client.MDNS_GROUP, client.MDNS_PORT))

    def resolve_conflicts(self, message):
        """Two servers that probed at the same moment can claim one name (RFC 6762 9): when another
        announces our instance with another port, the one with the higher port takes the next free
        name, and the other defends the name by announcing it again (the newcomer may have missed
        its first announcement)."""
        for rrset in message.answer:
            ports = {rd.port for rd in rrset if rd.rdtype == dns.rdatatype.SRV} - {self.offer.port}
            for i, name in enumerate(self.names):
                if not ports or rrset.name != self.instance_fqdn(name):
                    continue
                if min(ports) < self.offer.port:
                    renamed = alternative_name(name)
                    while renamed in self.names:
                        renamed = alternative_name(renamed)
                    self.names[i] = renamed
                    logging.info("instance name %r is taken by the server on port %d; now %r",
                                 name, min(ports), renamed)
                self.announce(_MDNS_TTL)

    def interface_of(self, ifindex):
        """The interface a packet came in on (without a word of it, the first)."""
        return next((i for i in self.interfaces if i.index == ifindex),
                    None if ifindex else self.interfaces[0])

    def announce(self, ttl):
        """Unsolicited response with our records on every interface: an announcement (ttl > 0) at
        start, a goodbye (ttl 0) at stop.  Not the meta PTR, nor in a goodbye the host's addresses:
        they may still serve other servers."""
        for iface in self.interfaces:
            table = self.records(ttl, iface)
            host = [rr for rr in table if ttl and rr.name == self.hostname]
            ours = [rr for rr in table if rr.name not in (self.meta, self.hostname)]
            client.send_to_group(self.sock, [iface], client.mdns_response(ours, host))


# A publisher (ZoneRegistration too): start() publishes an Offer's `names`, returns self (None where
# absent: no avahi daemon); refresh() in place (True) or not; stop().  The link's, preferred first:
LINK_PUBLISHERS = {"avahi": AvahiAdvertiser, "mdns": MdnsResponder}


# --------------------------------------------------------------------------
# Wide-area DNS-SD: the same records in a unicast DNS zone (RFC 6763 over RFC 2136 DNS UPDATE,
# signed with TSIG), for clients beyond multicast
# --------------------------------------------------------------------------

_DNS_TTL = 120
_TSIG_KEY = re.compile(r'key\s+"?([^"\s{]+)"?\s*\{[^}]*algorithm\s+"?([\w-]+)"?\s*;'
                       r'[^}]*secret\s+"([^"]+)"\s*;', re.S)


class ZoneRegistration:
    """An Offer in a DNS zone: PTR from _stap._tcp.ZONE, SRV and TXT at each instance (one per
    served sysinfo), A for the host."""

    def __init__(self, target, offer):
        client.require_dnspython()
        import dns.exception  # the rest of dnspython that DNS UPDATE needs
        import dns.rcode
        import dns.update
        self.zone, self.server, self.server_port, keyfile = target  # config.dns_update
        self.offer, self.instances = offer, []  # [(instance name, sysinfo)] registered
        self.keyring, self.keyname, self.algorithm = _read_tsig_key(keyfile)
        self.host = dns.name.from_text(f"{offer.host}.{self.zone}")
        self.stype = dns.name.from_text(f"{client.SERVICE_TYPE}.{self.zone}")

    def update(self):
        return dns.update.UpdateMessage(self.zone, keyring=self.keyring, keyname=self.keyname,
                                        keyalgorithm=self.algorithm)

    def send(self, message):
        """The rcode of one update; Error when the zone's server refuses us."""
        import dns.query  # here: it loads httpx, a tenth of a second (tests replace send)
        try:
            reply = dns.query.tcp(message, self.server, port=self.server_port, timeout=5)
        except (dns.exception.DNSException, OSError) as e:
            raise Error(f"DNS UPDATE of {self.zone} at {self.server}: "
                        f"{e.__class__.__name__}: {e}") from None
        return reply.rcode()

    def start(self):
        """Add every instance under a name nobody else holds in the zone; when the zone refuses
        one, withdraw those added before it (the server will not start)."""
        try:
            self.add_instances(self.address())
        except Error:
            self.stop()
            raise
        logging.info("registered in %s at %s: %s", self.zone, self.server,
                     ", ".join(i.to_text() for i, _ in self.instances))
        return self

    def add_instances(self, address):
        for sysinfo, name in zip(self.offer.sysinfos, self.offer.names()):
            for _ in range(20):
                instance = dns.name.Name([name.encode()]).concatenate(self.stype)
                msg = self.update()
                msg.absent(instance, "SRV")  # prerequisite: the name is free
                msg.add(self.stype, _DNS_TTL, "PTR", instance.to_text())
                msg.add(instance, _DNS_TTL, "SRV", f"0 0 {self.offer.port} {self.host}")
                msg.add(instance, _DNS_TTL, "TXT", client.txt_rdata_text(self.offer.txt(sysinfo)))
                msg.replace(self.host, _DNS_TTL, "A", address)
                rcode = self.send(msg)
                if rcode == dns.rcode.NOERROR:
                    self.instances.append((instance, sysinfo))
                    break
                if rcode != dns.rcode.YXRRSET:
                    raise Error(self.refusal(rcode))
                name = alternative_name(name)

    def refresh(self):
        """New TXT records: a renewed certificate's serial, a new load hint."""
        msg = self.update()
        for instance, sysinfo in self.instances:
            msg.replace(instance, _DNS_TTL, "TXT", client.txt_rdata_text(self.offer.txt(sysinfo)))
        return self.send_or_warn(msg) or True

    def stop(self):
        """Every instance gone, in one update."""
        if not self.instances:
            return
        msg = self.update()
        for instance, _ in self.instances:
            msg.delete(self.stype, "PTR", instance.to_text())
            msg.delete(instance)
        self.send_or_warn(msg)
        self.instances = []

    def send_or_warn(self, msg):
        """One update whose failure the log tells, and the server survives."""
        try:
            rcode = self.send(msg)
        except Error as e:
            logging.warning("%s", e)
            return
        if rcode != dns.rcode.NOERROR:
            logging.warning("%s", self.refusal(rcode))

    def refusal(self, rcode):
        return f"DNS UPDATE of {self.zone} at {self.server} refused: {dns.rcode.to_text(rcode)}"

    def address(self):
        """The address clients reach us at: the one we listen on, or the one our packets to the
        zone's server leave from."""
        listen = self.offer.listen
        if listen not in _WILDCARDS and not ipaddress.ip_address(listen).is_loopback:
            return listen
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((self.server, self.server_port))  # sends nothing
            return probe.getsockname()[0]


def _read_tsig_key(path):
    """(keyring, key name, algorithm) from a BIND key statement."""
    import dns.tsigkeyring
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as f:  # checked at start: no link
            m = _TSIG_KEY.search(f.read())
    except OSError as e:
        raise Error(f"cannot read the TSIG key {path}: {e.strerror}") from None
    if not m:
        raise Error(f"{path} holds no key statement with an algorithm and a secret")
    name, algorithm, secret = m.groups()
    return dns.tsigkeyring.from_text({name: (algorithm, secret)}), name, algorithm


# --------------------------------------------------------------------------
# Status files
# --------------------------------------------------------------------------

def _write_status(config, port, der):
    os.makedirs(_state_dir("run"), 0o755, exist_ok=True)
    _remove_stale_status()
    status = {"pid": os.getpid(), "port": port, "fingerprint": client.fingerprint(der),
              "serial": certinfo(der),
              "releases": config.releases, "arch": config.arch, "uid": os.geteuid(),
              "log": config.log, "database": config.db.path}
    path = _status_path(os.getpid())
    _replace_file(path, json.dumps(status).encode())
    return path


def _remove_stale_status():
    """Drop status files left by servers that were killed (SIGKILL gives them no chance to remove
    their own)."""
    for name in os.listdir(_state_dir("run")):
        m = re.match(r"^stap-serverd\.(\d+)\.json$", name)
        if m and int(m.group(1)) != os.getpid() and _not_our_server(int(m.group(1))):
            with contextlib.suppress(OSError):  # another user's, or already gone
                os.unlink(os.path.join(_state_dir("run"), name))


def _read_status(pid):
    try:
        with open(_status_path(pid)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

def _open_log(path):
    """A descriptor for appending to the log: made LOG_MODE, in a directory made LOG_DIR_MODE; one
    that group could write or others read is tightened (or refused when it is not ours)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), LOG_DIR_MODE, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
    except OSError as e:
        raise Error(f"cannot write the log {path}: {e.strerror}") from None
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & ~LOG_MODE & 0o777:
        try:
            os.fchmod(fd, mode & LOG_MODE)
        except OSError:
            os.close(fd)
            raise Error(f"the log {path} is open to others (mode {mode:04o}) and not the "
                        f"server's to change: chmod 640 {path}") from None
    return fd


class _LogFile(logging.handlers.WatchedFileHandler):
    """The log, reopened (after a rotation or removal) the way it was first opened."""

    def _open(self):
        return open(_open_log(self.baseFilename), self.mode, encoding=self.encoding,
                    errors=self.errors)


def setup_logging(path):
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s stap-serverd[%(process)d] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def stap_serverd(argv):
    """The server, in the foreground, until SIGTERM or SIGINT.  An error that stops it is a line of
    its log too: under systemd its stderr reaches only the journal."""
    try:
        config = parse_config(argv)
    except Error as e:
        log = _log_config_error(argv, e)
        if log and _stderr_is_log(log):
            return 1
        raise
    setup_logging(config.log)
    logging.info("starting: %s", " ".join(sys.argv))
    _drop_ambient_capabilities()
    try:
        return serve(config)
    except Error as e:
        logging.error("ERROR: %s", e)
        if _stderr_is_log(config.log):  # stap-start-server's daemon: the line is there already
            return 1
        raise


def _log_config_error(argv, error):
    """Write a configuration error to the log named by --log, if it names one (a typo on a command
    line creates no log file); the log's path, or None."""
    p = _OptionParser(add_help=False)
    p.add_argument("--log")
    with contextlib.suppress(Error):  # --log without a value, or a log that cannot be written
        path = p.parse_known_args(argv)[0].log
        if path:
            setup_logging(path)
            logging.error("ERROR: %s", error)
            return path
    return None


def _stderr_is_log(path):
    try:
        out, log = os.fstat(sys.stderr.fileno()), os.stat(path)
    except (OSError, ValueError):
        return False
    return (out.st_dev, out.st_ino) == (log.st_dev, log.st_ino)


def serve(config):
    der = ensure_server_certificate(config.db)
    config = prepare_compile_step(config)
    for release in config.releases:  # each fixed runtime made, and its fixes logged, at start
        fixed_runtime(config, release)
    server = CompileServer(config, der)
    port = server.port
    # shutdown() waits for serve_forever() to return: it cannot run in the signal handler, which
    # interrupts serve_forever()'s own thread.
    stop = lambda signum, frame: threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    advertising = Advertising(config, port, server.service.version, der,
                              server.service.compiles)
    status = _write_status(config, port, der)  # after the zone: a refused update fails the start
    logging.info("listening on %s port %d; serving %s; certificate serial %s, SHA-256 "
                 "fingerprint %s", config.listen, port, _served_text(config), certinfo(der),
                 client.fingerprint(der))
    server.on_renewal = advertising.refresh
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        advertising.stop()
        server.drain()
        os.unlink(status)
        logging.info("stopped")
    return 0


_LOAD_CHECK = 1.0  # seconds between looks at the load, to refresh the hint


def served_versions(host_version, envs):
    """The stap versions a server with build environments advertises (TXT versions=, the host's
    first; `version=` stays the host's, which real clients read); none without environments."""
    return list(dict.fromkeys([host_version] + [e.version for e in envs])) if envs else []


class Advertising:
    """The server's DNS-SD presence, on the link (unless --advertise none) and in a DNS zone (with
    --dns-update), both read from one Offer: the link's started in the background so that the server
    accepts connections at once; both renewed with a renewed certificate (its serial is advertised)
    and when the load changes meaningfully (at most every --load-refresh seconds); withdrawn at
    shutdown.  The zone's is registered at once: a refused update fails the server's start."""

    def __init__(self, config, port, version, der, queue):
        self.config, self.queue = config, queue
        self.offer = Offer(port, advertised_sysinfos(config), version,
                           certinfo(der), " ".join(config.stap_options), listen=config.listen,
                           hint=queue.hint(), mok_info=config.mok_info,
                           versions=served_versions(version, config.build_envs))
        self.link = self.thread = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # renewal and the load follower both re-publish
        self.zone = config.dns_update and ZoneRegistration(config.dns_update, self.offer).start()
        if config.advertise != "none":
            self.start_link()
        threading.Thread(target=self.follow_load, daemon=True).start()

    def start_link(self):
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            mode, self.link = client.first_answering(  # --advertise: "auto" or one of them
                LINK_PUBLISHERS, lambda make: make(self.offer).start(), self.config.advertise)
            logging.info("advertised as %s through %s", ", ".join(map(repr, self.link.names)), mode)
        except Error as e:
            logging.warning("not advertised: %s", e)

    def follow_load(self):
        last = time.monotonic()
        while not self.stopping.wait(_LOAD_CHECK):
            hint = self.queue.hint()
            if time.monotonic() - last >= self.config.load_refresh and\
                    load_changed(self.offer.hint, hint):
                last = time.monotonic()
                self.refresh(hint=hint)

    def refresh(self, der=None, hint=None):
        """Tell the network of a renewed certificate or a new load hint: the zone by DNS UPDATE, the
        link in place where its publisher can, else by publishing again."""
        with self.lock:
            if self.stopping.is_set():
                return
            if der:
                self.offer.certinfo = certinfo(der)
            if hint:
                self.offer.hint = hint
            if self.zone:
                self.zone.refresh()
            if self.thread and (der or not (self.link and self.link.refresh())):
                self.withdraw_link()
                self.start_link()

    def withdraw_link(self):
        self.thread.join(15)
        self.link = self.link and self.link.stop()  # None once stopped

    def stop(self):
        with self.lock:
            self.stopping.set()
            if self.thread:
                self.withdraw_link()
            if self.zone:
                self.zone.stop()


def _served_text(config):
    """What the server serves, for its log: its installed releases and, when it fetches, the others
    on demand."""
    return ", ".join(config.releases + (("kernels fetched on demand",)
                                        if config.fetch_kernels else ()))


def advertised_sysinfos(config):
    """One sysinfo per served release; with --fetch-kernels also the bare architecture, which the
    real client takes as serving any release (nss_get_or_keep_compatible_server_info)."""
    return [f"{r} {config.arch}" for r in config.releases] + (
        [config.arch] if config.fetch_kernels else [])


def load_changed(old, new):
    """Worth telling the network: the work in hand moved to another power of two, or a compile now
    takes half as long again (or less) as before."""
    def bucket(h):
        return (h["busy"] + h["queued"]).bit_length()
    return bucket(old) != bucket(new) or not (
        2 / 3 <= (new["compile"] + 0.1) / (old["compile"] + 0.1) <= 3 / 2)


def certinfo(der):
    """The certificate serial as real servers advertise it (client.serial_text)."""
    return client.serial_text(client.certificate_serial(der))


def server_command(args):
    """How to run stap-serverd from this file, whatever name it was run as: through the installed
    launcher beside it where there is one, which imports this module's byte code."""
    here = os.path.abspath(__file__)
    launcher = os.path.join(os.path.dirname(here), "launcher")
    return [sys.executable, launcher if os.path.exists(launcher) else here, "stap-serverd"] + args


def start_server(args, timeout=_START_TIMEOUT):
    """Start stap-serverd detached; return its pid once it accepts connections."""
    config = parse_config(args, prog="stap-start-server")  # fail early on bad options
    with open(_open_log(config.log), "ab") as log:  # the daemon's stdout and stderr
        offset = log.tell()
        proc = subprocess.Popen(server_command(args), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Error(f"{_daemon_error(config.log, offset)} (see {config.log})")
        if _read_status(proc.pid):  # written once the socket listens
            return proc.pid
        time.sleep(0.02)
    _kill_group(proc)
    raise Error(f"stap-serverd did not start within {timeout} s; see {config.log}")


def _daemon_error(log, offset):
    """The error line a failed stap-serverd wrote after offset in its log."""
    with open(log, "rb") as f:
        f.seek(offset)
        lines = [l for l in f.read().decode(errors="replace").splitlines() if "ERROR:" in l]
    return lines[-1].split("ERROR:", 1)[1].strip() if lines else "stap-serverd failed to start"


def stap_start_server(argv):
    print(start_server(argv))
    return 0


def stap_stop_server(argv):
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: stap-stop-server PID", file=sys.stderr)
        return 1
    pid = int(argv[0])
    why = _not_our_server(pid)
    if why:
        raise Error(f"{pid} is not a systemtap server ({why})")
    os.kill(pid, signal.SIGTERM)
    return 0


def _not_our_server(pid):
    """Why pid is not a running stap-serverd of this product that the caller may stop; None when it
    is one."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return "no such process"
    if not is_serverd_cmdline(cmdline):
        return "it is another program"
    if owner != os.geteuid() and not client.is_root():
        return "it belongs to another user"
    return None


def is_serverd_cmdline(cmdline):
    """python3 .../stap-serverd ..., or python3 .../launcher (or stap_server.py) stap-serverd ..."""
    if len(cmdline) < 2 or not os.path.basename(cmdline[0]).startswith("python"):
        return False
    script = os.path.basename(cmdline[1])
    return script == "stap-serverd" or (script in ("launcher", "stap_server.py")
                                        and cmdline[2:3] == ["stap-serverd"])


def stap_find_or_start_server(argv):
    """0 when a compatible server is advertised (compatible with the first
    -r/-a given, else with this host), else the pid of a new one, else -1."""
    try:
        opts = build_option_parser("stap-find-or-start-server").parse_args(argv)
        wanted = client.local_sysinfo(opts.releases[0] if opts.releases else None, opts.arch)
        pid = 0 if client.find_servers(sysinfo=wanted) else start_server(argv)
    except Error:
        print(-1)
        raise
    print(pid)
    return 0


COMMANDS = {
    "stap-serverd": stap_serverd,
    "stap-start-server": stap_start_server,
    "stap-stop-server": stap_stop_server,
    "stap-find-or-start-server": stap_find_or_start_server,
}


# parse_config's result, a field per option and more; made last: --advertise names the publishers.
ServerConfig = dataclasses.make_dataclass("ServerConfig", [
    *vars(build_option_parser(PROG).parse_args([])), "compile_limits", "stap_options", "db",
    "limits", "mok_info"], frozen=True)


def main():
    sys.exit(client.dispatch(COMMANDS, sys.argv))


__all__ = client.public_names(globals())


if __name__ == "__main__":
    main()
