#!/usr/bin/python3
"""Client side of the systemtap compile server.

Commands (chosen by the name this file is run under, or by the first
argument when run as ``python3 stap_client.py COMMAND ...``):

  stap-client [--server=HOST[:PORT]]... [--ssl=DIR]... [STAP ARGUMENTS]
  stap-find-servers [--all] [--domain=DOMAIN]...
  stap-add-server-cert CERTFILE DIRNAME

Data flows top to bottom: options -> certificate databases -> request
archive -> TLS -> reply archive -> staprun.  This module never imports the
server module; the server imports this one.
"""

import base64
import collections
import contextlib
import errno
import fcntl
import grp
import hashlib
import io
import os
import posixpath
import re
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import types
import zipfile
import zlib  # zipfile's own inflater: already loaded

dns = None  # dnspython, imported by require_dnspython() for the mDNS fallback only

# --------------------------------------------------------------------------
# Constants and errors
# --------------------------------------------------------------------------

SYSCONFDIR = "/etc"  # make install rewrites this line
_SYSCONFDIR_ENV = "STAP_SYSCONFDIR"  # overrides SYSCONFDIR, for tests
PROTOCOL_VERSION = "4.8"  # the systemtap protocol level we speak as a client
# The request's version says which modules the client's staprun runs: ours sends its protocol level,
# a staprun before 5.0 (the real clients send their own version).
_RUNTIME_BOUNDARY = (5, 0)  # stap 5.0 changed the messages between a module and staprun (NEWS)
SERVER_NICKNAME = "stap-server"  # the one nickname real clients file servers under
SERVER_SUBJECT = "CN=Systemtap Compile Server, OU=Systemtap"
SERVER_CERT_FILE = "stap-server.cert"  # DER, like the real server's stap.cert
SERVICE_TYPE = "_stap._tcp"
BUSY_MESSAGE = "server busy"  # stderr marker of a busy reply: try the next server
_TOOL_TIMEOUT = 60
_CONNECT_TIMEOUT = 10
_REPLY_TIMEOUT = 900  # a cold pass-4 compile on a loaded server can take minutes
_DEADLINE = 600  # seconds stap-client keeps retrying busy servers

PROG = "stap-client"


class Error(Exception):
    """A failure the user sees as one line."""


class Unavailable(Error):
    """A server that cannot take the request now (busy, or not listening): another server, or the
    same one later, may."""


class LocalFault(Error):
    """A failure of this host's own file system (full, read-only, not writable): no other server
    would fare better.  strerror: the cause alone."""

    def __init__(self, message, strerror):
        super().__init__(message)
        self.strerror = strerror


# What the operating system says when the fault is the writer's own disk, not what it writes.
_LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                 errno.EMFILE, errno.ENFILE, errno.ENOMEM}


class Lost(Unavailable):
    """A server that dropped the request (closed without a reply, a broken transfer or handshake):
    it died, or it refuses this request.  Worth one more try, not more."""


class Unreachable(Lost):
    """A server that is not there: the connection was refused, no route leads to the host, or it
    did not answer.  Retrying cannot fix a typo in --server: one more try, not more."""


class Untrusted(Error):
    """A server whose certificate no usable client database trusts; detail is NSS's own words,
    for -v."""

    def __init__(self, message, detail=""):
        super().__init__(message)
        self.detail = detail


def _warn(message):
    print(f"{PROG}: WARNING: {printable(message)}", file=sys.stderr)


# Characters a terminal acts on instead of showing: C0 controls, DEL, C1 controls, the Unicode
# format and bidi controls that hide or reorder text, and the surrogates of undecodable bytes.
_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e"
                                "\u2060-\u2069\ufeff\ufff9-\ufffb\ud800-\udfff]")


def printable(text):
    r"""text (str, or bytes read as UTF-8) safe to print: each control character as \xHH, or
    \uHHHH beyond U+00FF.  Whatever came from the network goes through here before a terminal."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return _TERMINAL_CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100
                                  else f"\\u{ord(m[0]):04x}", text)


def sysconfdir():
    return os.environ.get(_SYSCONFDIR_ENV) or SYSCONFDIR


def systemtap_dir():
    return os.environ.get("SYSTEMTAP_DIR") or os.path.join(os.path.expanduser("~"), ".systemtap")


def is_root():
    return os.geteuid() == 0


def server_db_path():
    base = os.path.join(sysconfdir(), "systemtap") if is_root() else systemtap_dir()
    return os.path.join(base, "ssl", "server")


def _user_client_db_path():
    return os.path.join(systemtap_dir(), "ssl", "client")


def global_client_db_path():
    return os.path.join(sysconfdir(), "systemtap", "ssl", "client")


def local_client_db_path():
    """The client database a server started by this user trusts itself in."""
    return global_client_db_path() if is_root() else _user_client_db_path()


def local_sysinfo(release=None, arch=None):
    uts = os.uname()
    return f"{release or uts.release} {arch or uts.machine}"


# --------------------------------------------------------------------------
# External tools: one wrapper each, with a timeout and stderr kept
# --------------------------------------------------------------------------

class _ToolResult(collections.namedtuple("ToolResult", "argv returncode stdout stderr")):
    """What an external program did: exit status (None if we stopped it), its output as bytes."""

    def error(self):
        """One line for an error message: the program and its last words."""
        return f"{os.path.basename(self.argv[0])}: {last_line(self.stderr)}"


def run_tool(argv, *, timeout=_TOOL_TIMEOUT, input=None, cwd=None, check=True, done=None):
    """Run a program without a shell, collecting its output until it exits.  With done, a program
    that runs on (avahi-browse) is stopped once done(stdout so far) is true or at the timeout, and
    what it printed is kept; else the timeout is an Error, and so is a failure when check."""
    import subprocess  # here: a compile request (-p4 and below) runs no program
    name = os.path.basename(argv[0])
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    except FileNotFoundError:
        if done:
            return _ToolResult(argv, 127, b"", b"not installed")
        raise Error(f"{name} is not installed (needed for: {' '.join(argv[1:3])})") from None
    if input:
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            proc.stdin.write(input)  # small: a certificate; one that died early says why
    out, err, eof = _collect_output(proc, time.monotonic() + timeout, done)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1.0 if eof else 0)  # output closed: the exit follows at once
    timed_out = proc.poll() is None
    if timed_out:
        proc.send_signal(signal.SIGTERM)  # avahi-browse then prints what it has
        more_out, more_err, _ = _collect_output(proc, time.monotonic() + 0.2, None)
        out, err = out + more_out, err + more_err
        if proc.poll() is None:
            proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    result = _ToolResult(argv, None if timed_out else proc.returncode, out, err)
    if timed_out and not done:
        raise Error(f"{name} timed out after {timeout} s")
    if check and not done and result.returncode != 0:
        raise Error(f"{name} failed: {last_line(err or out)}")
    return result


def last_line(data):
    lines = [l.strip() for l in data.decode(errors="replace").splitlines() if l.strip()]
    return lines[-1] if lines else "no message"


def certutil(db, *args, **kw):
    return run_tool(["certutil", "-d", db.spec, *args], **kw)


# --------------------------------------------------------------------------
# Certificate databases
# --------------------------------------------------------------------------

_DB_FILES = ("cert9.db", "key4.db", "pkcs11.txt", "cert8.db", "key3.db", "secmod.db")
_SECRET_FILES = ("key4.db", "key3.db", "pw")


class CertDB:
    """One NSS certificate database directory, and every certutil call.  (Signing and checking
    signatures happen in-process: see ServerKey in the server and check_pkcs7_signature here.)"""

    def __init__(self, path):
        self.path = os.path.abspath(path)

    def __repr__(self):
        return f"CertDB({self.path!r})"

    @property
    def legacy(self):
        has = lambda f: os.path.exists(os.path.join(self.path, f))
        return has("cert8.db") and not has("cert9.db")

    @property
    def spec(self):
        return ("dbm:" if self.legacy else "sql:") + self.path

    def exists(self):
        return any(os.path.exists(os.path.join(self.path, f)) for f in ("cert9.db", "cert8.db"))

    def create(self, mode=0o755, world_readable=False):
        """A new empty-password database; world_readable for the global client one."""
        os.makedirs(self.path, mode=mode, exist_ok=True)
        os.chmod(self.path, mode)
        certutil(self, "-N", "--empty-password")
        for name in _DB_FILES:
            f = os.path.join(self.path, name)
            if os.path.exists(f):
                os.chmod(f, 0o644 if world_readable else 0o600)

    def check_permissions(self, owner=None, secret=False):
        """Raise Error naming the first problem: foreign owner, group/other write access, or
        (secret) group/other read access to key files."""
        for path in [self.path] + [os.path.join(self.path, f) for f in _DB_FILES + ("pw",)]:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                raise Error(f"{path} is a symbolic link")
            if owner is not None and st.st_uid != owner:
                raise Error(f"{path} is owned by uid {st.st_uid}, not uid {owner}")
            if st.st_mode & 0o022:
                raise Error(f"{path} is writable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o})")
            if secret and os.path.basename(path) in _SECRET_FILES and st.st_mode & 0o044:
                raise Error(f"{path} is readable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o})")

    def certificates(self, nickname=SERVER_NICKNAME):
        """DER of every certificate filed under nickname."""
        proc = certutil(self, "-L", "-n", nickname, "-a", check=False)
        if proc.returncode != 0:
            return []
        return _pem_to_der_list(proc.stdout.decode(errors="replace"))

    def add_trusted_server(self, der):
        """Trust a server certificate for TLS (first field) and signing (third)."""
        certutil(self, "-A", "-n", SERVER_NICKNAME, "-t", "P,P,P", input=der)

    def make_self_signed(self, nickname, subject, dns_names):
        """A new RSA-3072/SHA-256 key and self-signed certificate, valid for a year and trusted as a
        peer, in place of any filed under nickname.  Its serial is certutil's own, the time in units
        of 2**19 us, as real servers make theirs: the real client names a server by a serial of five
        bytes (00 and four), which certutil -m cannot give."""
        noise = os.path.join(self.path, "noise")
        with open(os.open(noise, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(os.urandom(2048))
        try:
            for _ in self.certificates(nickname):  # -F: the old key and certificate go
                certutil(self, "-F", "-n", nickname, check=False)
            certutil(self, "-S", "-n", nickname, "-s", subject, "-x", "-t", "P,P,P",
                     "-k", "rsa", "-g", "3072", "-Z", "SHA256", "-v", "12", "-z", noise,
                     "--extSAN", ",".join(f"dns:{n}" for n in dns_names))
        finally:
            os.unlink(noise)

    def remove_servers(self):
        """Delete every certificate filed under the servers' nickname (certutil cannot pick one of
        several that share it)."""
        for _ in range(len(self.certificates()) + 1):
            if certutil(self, "-D", "-n", SERVER_NICKNAME, check=False).returncode != 0:
                break


def _pem_to_der_list(text):
    import ssl as pyssl  # only PEM input needs it
    return [pyssl.PEM_cert_to_DER_cert(m.group(0)) for m in re.finditer(
        r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)]


def read_certificate_file(path):
    """DER bytes of a PEM or DER certificate file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Error(f"cannot read certificate {path}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" in data:
        ders = _pem_to_der_list(data.decode(errors="replace"))
        if len(ders) != 1:
            raise Error(f"{path} holds {len(ders)} certificates, expected one")
        return ders[0]
    if not data.startswith(b"\x30"):
        raise Error(f"{path} is not a certificate (neither PEM nor DER)")
    return data


# One way to write a certificate wherever a person reads it (prompts, messages, logs, the status
# file, stap-find-servers), so that an administrator can compare them at a glance.

def fingerprint(der):
    """The certificate's SHA-256 fingerprint as AB:CD:..., as certutil -L and openssl show it."""
    return hashlib.sha256(der).digest().hex(":").upper()


def serial_text(serial):
    """A certificate serial (an integer) as servers advertise it in certinfo, which the real client
    reads: its DER integer's bytes in colon-separated lowercase hex, a leading 00 when the top bit
    is set (00:cc:3e:05:fc)."""
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big").hex(":")


def _staprun_db_path():
    """The certificates whose module signatures staprun accepts for stapusr users."""
    return os.path.join(sysconfdir(), "systemtap", "staprun")


def client_databases(ssl_dirs=()):
    """The usable client databases in search order: each --ssl directory, then the user's own
    (root's too), then the global one.  A database that fails its permission check is skipped with a
    warning."""
    candidates = [(CertDB(d), None, True) for d in ssl_dirs]
    user, system = CertDB(_user_client_db_path()), CertDB(global_client_db_path())
    if user.path != system.path:
        candidates.append((user, os.geteuid(), False))
    candidates.append((system, 0, False))
    usable = []
    for db, owner, explicit in candidates:
        if not db.exists():
            if explicit:
                _warn(f"skipping certificate database {db.path}: it does not exist")
            continue
        try:
            db.check_permissions(owner=owner)
        except Error as e:
            _warn(f"skipping certificate database {db.path}: {e}")
            continue
        usable.append(db)
    if not usable:
        raise Error("no usable client certificate database (searched " + ", ".join(
            db.path for db, _, _ in candidates) + "); trust a server with stap-add-server-cert")
    return usable


# --------------------------------------------------------------------------
# Stap's options
# --------------------------------------------------------------------------

# stap 4.8's command line, as its getopt_long reads it: the short options (":" after a letter: it
# takes a value) and the long ones in stap's order, each with its kind of value; colour is color's
# other spelling.
_STAP_SHORT_OPTIONS = "hVvtp:I:e:E:o:R:r:a:m:kgPc:x:D:bs:uqiwl:d:L:FS:B:J:jWG:T:"
NO_VALUE, VALUE, OPTIONAL_VALUE = "none", "required", "optional"
_STAP_LONG_OPTIONS = dict(
    [(n, NO_VALUE) for n in (
        "skip-badvars unprivileged client-options help disable-cache poison-cache "
        "clean-cache ldd all-modules remote-prefix check-version version dump-probe-types "
        "dump-probe-aliases dump-functions suppress-handler-errors suppress-time-limits "
        "dyninst bpf benchmark-sdt save-uprobes interactive example "
        "no-global-var-display").split()]
    + [(n, VALUE) for n in (
        "vp compatible use-http-server remote tmpdir privilege modinfo rlimit-as rlimit-cpu "
        "rlimit-nproc rlimit-stack rlimit-fsize sysroot sysenv runtime benchmark-sdt-loops "
        "benchmark-sdt-threads target-namespaces").split()]
    + [(n, OPTIONAL_VALUE) for n in (
        "use-server list-servers trust-servers use-server-on-error sign-module "
        "download-debuginfo color colour prologue-searching monitor").split()])
_SAME_OPTION = {"colour": "color"}
# stap-client's own options, beside stap's (each given as --name=VALUE).
_CLIENT_LONG_OPTIONS = {"server": OPTIONAL_VALUE, "ssl": OPTIONAL_VALUE,
                        "domain": OPTIONAL_VALUE, "deadline": OPTIONAL_VALUE,
                        "each-kernel": OPTIONAL_VALUE}

LOCAL, PATH = "local", "path"


class Treatment(collections.namedtuple("Treatment", "client server staprun",
                                       defaults=(None, None, None))):
    """How each side of the compile server treats one stap option.  client: None (sent to the
    server), LOCAL (kept here for pass 5), or why stap-client refuses it.  server: None (passed to
    stap), PATH (its value must stay inside the request), LOCAL (the client's business: dropped), or
    why stap-serverd refuses it.  staprun: what pass 5 gives staprun for it (stap 4.8's mapping)."""


_NOT_HERE = "and cannot be used with stap-client"
_STAP_OPTIONS = {
    "-I": Treatment(server=PATH),  # the client ships the directory
    "-d": Treatment(server=PATH),
    "-o": Treatment(client=LOCAL, server=LOCAL),  # only pass 5 writes it
    "-k": Treatment(client=LOCAL),  # keeps stap-client's temporary directory; stap refuses it
                                    # from a client (a real client sends none either)
    "-G": Treatment(client=LOCAL),  # staprun sets them, after the module
    "-h": Treatment(client=LOCAL), "--help": Treatment(client=LOCAL),  # stap-client answers
    "-V": Treatment(client=LOCAL), "--version": Treatment(client=LOCAL),
    "-c": Treatment(staprun="-c"),
    "-x": Treatment(staprun="-t"),
    "-s": Treatment(staprun="-b"),
    "-S": Treatment(staprun="-S"),
    "-w": Treatment(staprun="-w"),
    "-R": Treatment(client="names a local runtime directory; give -R to the server instead",
                    server="names a runtime directory"),
    "--tmpdir": Treatment(client=f"names a local directory {_NOT_HERE}",
                           server="names a directory"),
    "--sysroot": Treatment(client=f"names a local directory {_NOT_HERE}",
                            server="names a directory"),
    "--remote": Treatment(client=f"runs on another host {_NOT_HERE}", server="runs elsewhere"),
    "--use-server": Treatment(client=f"is what stap-client does already {_NOT_HERE}",
                               server="asks for a server"),
    "--list-servers": Treatment(client=f"is stap-find-servers {_NOT_HERE}",
                                 server="asks for servers"),
    "--trust-servers": Treatment(client=f"is stap-add-server-cert {_NOT_HERE}",
                                  server="changes trust"),
    "--client-options": Treatment(server="is the server's"),
    "--poison-cache": Treatment(server="damages the cache"),
    "--clean-cache": Treatment(server="damages the cache"),
    "--sign-module": Treatment(server="names a key directory"),
}


def treatment(name):
    return _STAP_OPTIONS.get(name, Treatment())


class _StapSays(Error):
    """A command line stap itself refuses while reading it: the message is exactly what stap 4.8
    prints (stap-client stands for stap --use-server)."""


_TRY_HELP = ("Try '--help' for more information. [man stap]\n"
             "A message like [man foo] means for more info, run % man foo")


class UsageError(Error):
    """A command line getopt_long refuses, in getopt's words."""

    def stap_says(self):
        return f"stap: {self}\n{_TRY_HELP}"


_NO_SCRIPT = _StapSays("A script must be specified.\n"
                       f"Try '-i' for building a script interactively.\n{_TRY_HELP}")

# Values stap checks as it reads each option (POSIX extended, any case).
_SAFETY_PATTERNS = {
    "-G": "^[a-z_][a-z0-9_]*=[a-z0-9_.-]+$",
    "-D": "^[a-z_][a-z_0-9]*(=-?[a-z_0-9]+)?$",
    "-S": "^[0-9]+(,[0-9]+)?$",
    "-a": "^[a-z0-9_-]+$",
    "-m": "^[a-z0-9_]+$",
    "--modinfo": "^[a-z_][a-z0-9_]*=.+$",
}


def _check_as_stap_does(name, value):
    """stap's own checks of one option's value, in the order stap reads them."""
    if name == "-p" and value not in ("1", "2", "3", "4", "5"):
        raise _StapSays("Invalid pass number (should be 1-5).")
    pattern = _SAFETY_PATTERNS.get(name)
    if pattern and not re.search(pattern.replace("$", r"\Z"), value, re.IGNORECASE):
        raise _StapSays(f"ERROR: Safety pattern mismatch for {name} parameter "
                        f"('{value}' vs. '{pattern}') rc=1")


def scan_stap_args(argv, long_options=_STAP_LONG_OPTIONS, check=None):
    """Tokens of a stap command line as stap's getopt_long reads it (options may follow operands;
    "--" ends options; long options may be shortened to a unique prefix): ("opt", "-p", "4"),
    ("opt", "--vp", "01") or ("arg", "x").  UsageError says what getopt would say; check(name,
    value) runs on each option as it is read."""
    tokens, args = [], iter(argv)
    for arg in args:
        if arg == "--":
            tokens += [("arg", a) for a in args]
            break
        if arg.startswith("--"):
            given, eq, value = arg[2:].partition("=")
            name = _long_option(given, long_options)
            kind = long_options[name]
            if not eq:
                value = None
                if kind == VALUE:
                    value = next(args, None)
                    if value is None:
                        raise UsageError(f"option '--{name}' requires an argument")
            elif kind == NO_VALUE:
                raise UsageError(f"option '--{name}' doesn't allow an argument")
            tokens.append(("opt", "--" + name, value))
            if check and value is not None:
                check("--" + name, value)
        elif arg.startswith("-") and arg != "-":
            for j, letter in enumerate(arg[1:], 1):  # a cluster such as -vvp4
                at = _STAP_SHORT_OPTIONS.find(letter)
                if letter == ":" or at < 0:
                    raise UsageError(f"invalid option -- '{letter}'")
                if _STAP_SHORT_OPTIONS[at + 1:at + 2] != ":":
                    tokens.append(("opt", "-" + letter, None))
                    continue
                value = arg[j + 1:] or next(args, None)
                if value is None:
                    raise UsageError(f"option requires an argument -- '{letter}'")
                tokens.append(("opt", "-" + letter, value))
                if check:
                    check("-" + letter, value)
                break
        else:
            tokens.append(("arg", arg))
    return tokens


def _long_option(given, long_options):
    """The long option a (possibly shortened) name stands for."""
    if given in long_options:
        return given
    matches = [n for n in long_options if n.startswith(given)]
    if not matches:
        raise UsageError(f"unrecognized option '--{given}'")
    if len({_SAME_OPTION.get(n, n) for n in matches}) > 1:
        raise UsageError(f"option '--{given}' is ambiguous; possibilities: "
                         + " ".join(f"'--{n}'" for n in matches))
    return matches[0]


# The client's records are plain classes and named tuples: importing dataclasses would cost a fifth
# of every stap-client run's start-up.

class _Invocation:
    """stap-client's argv, split into what goes where."""

    def __init__(self):
        self.server_args = []  # argvN entries
        self.files = []  # (archive name, bytes or path)
        self.servers = []
        self.ssl_dirs = []
        self.deadline = _DEADLINE
        self.domains = []  # --domain: DNS domains to find servers in
        self.last_pass = 5
        self.module_name = None
        self.release = None
        self.arch = None
        self.keep = False
        self.verbose = 0
        self.output = None
        self.staprun_opts = []
        self.globals = []  # -G NAME=VALUE
        self.flight_recorder = False  # -F
        self.help = False
        self.version = False
        self.notes = []  # what was decided for the user, shown as progress
        self.listing = False  # -l or -L: stap lists probes, builds no module
        self.script = None  # (its name in the request, its name as the user gave it)
        self.each_kernel = None  # --each-kernel: the releases to check the script against
        self.moks = []  # the request's mok_fingerprints: see secure_boot_moks


def parse_stap_args(argv, stdin=None):
    """Split stap-client's arguments into an Invocation: what the server gets (laid out as the real
    client does: options, script, "--", script arguments), the files to ship, and what staprun
    gets."""
    inv, operands = _Invocation(), []
    tokens = scan_stap_args(argv, {**_STAP_LONG_OPTIONS, **_CLIENT_LONG_OPTIONS},
                            _check_as_stap_does)
    for kind, name, *value in tokens:
        if kind == "arg":
            operands.append(name)
        else:
            _handle_option(inv, name, value[0])
    inv.listing = any(a.startswith(("-l", "-L")) for a in inv.server_args)
    have_script_text = any(a.startswith("-e") for a in inv.server_args)
    if not have_script_text and not inv.help and not inv.version and not inv.listing:
        if not operands:
            raise _NO_SCRIPT
        _add_script(inv, operands.pop(0), stdin)
    if operands:
        inv.server_args += ["--"] + operands
    _add_privilege(inv)
    return inv


def _add_privilege(inv):
    """As stap does for pass 5: a user who may load only signed modules (stapusr, or stapsys, but
    not stapdev) asks for a module built, and signed by the server, at that privilege."""
    if inv.last_pass < 5 or is_root() or any(
            a.startswith(("--privilege", "--unprivileged")) for a in inv.server_args):
        return
    level = None
    for name in ("stapusr", "stapsys", "stapdev"):  # the most privileged group decides
        with contextlib.suppress(KeyError):
            if grp.getgrnam(name).gr_gid in os.getgroups() + [os.getegid()]:
                level = name
    if level in ("stapusr", "stapsys"):
        inv.server_args.insert(0, f"--privilege={level}")
        inv.notes.append(f"--privilege={level} was automatically selected because you are a "
                         f"member of the group{'s stapusr and' if level == 'stapsys' else ''} "
                         f"{level}.  [man stap]")


# Secure Boot: a kernel that loads only signed modules needs one signed with a MOK it trusts
MOK_CERT_NAME = "signing_key.x509"  # a server's MOK certificate in a reply, saved here
_MOK_LISTING = re.compile(r"^SHA1 Fingerprint: ([0-9a-f:]+)$")
_MOK_ISSUER = re.compile(r"^[ \t]*Issuer: [A-Z]*=(.*)$")


def modules_must_be_signed(environ=None, sysfs="/sys"):
    """As stap decides it: SYSTEMTAP_SIGN or SYSTEMTAP_NOSIGN, else the kernel enforcing module
    signatures, a securelevel of 1, or lockdown in integrity or confidentiality mode."""
    env = os.environ if environ is None else environ
    if "SYSTEMTAP_SIGN" in env:
        return True
    if "SYSTEMTAP_NOSIGN" in env:
        return False
    look = lambda path: read_entry(sysfs, path) or b""
    return (look("module/module/parameters/sig_enforce").strip()[:1] == b"Y"
            or look("kernel/security/securelevel").strip()[:1] == b"1"
            or bool({b"[integrity]", b"[confidentiality]"}
                    & set(look("kernel/security/lockdown").split())))


def enrolled_systemtap_moks():
    """The SHA-1 fingerprints of the MOKs enrolled here that systemtap made (issuer Systemtap), read
    from mokutil --list-enrolled as stap reads it: each fingerprint line, then its first issuer
    line."""
    try:
        out = run_tool(["mokutil", "--list-enrolled"]).stdout
    except Error as e:
        raise Error(f"cannot list the machine owner keys (MOK) for module signing: {e}") from None
    found, fingerprint = [], None
    for line in out.decode(errors="replace").splitlines():
        if fingerprint is None:
            m = _MOK_LISTING.match(line)
            fingerprint = m.group(1) if m else None
        elif m := _MOK_ISSUER.match(line):
            if "Systemtap" in m.group(1):
                found.append(fingerprint)
            fingerprint = None
    return found


def secure_boot_moks():
    """What a request's mok_fingerprints entry says: nothing when modules need no signature, else
    the enrolled systemtap MOKs, or "missing" (the server then sends one of its own to enroll)."""
    if not modules_must_be_signed():
        return []
    return enrolled_systemtap_moks() or ["missing"]


# Options stap-client itself reads: name -> the Invocation attribute that a flag sets, that takes
# the option's value, or that collects its values.
_CLIENT_FLAGS = {"-h": "help", "--help": "help", "-V": "version", "--version": "version",
                 "-k": "keep", "-F": "flight_recorder"}
_CLIENT_VALUES = {"-o": "output", "-r": "release", "-a": "arch", "-m": "module_name"}
_CLIENT_LISTS = {"-G": "globals", "--server": "servers", "--ssl": "ssl_dirs", "--domain": "domains"}


def _handle_option(inv, name, value):
    """Record one option: what stap-client makes of it, and what the server and staprun get."""
    how = treatment(name)
    if how.client not in (None, LOCAL):
        raise Error(f"{name} {how.client}")
    own = name[2:] in _CLIENT_LONG_OPTIONS  # --server=VALUE and the like: never sent
    if own and not value:
        raise Error(f"option {name} needs a value ({name}=VALUE)")
    if name == "-r" and "/" in value:
        raise Error(f"-r {value} names a local build tree; give a kernel release instead")
    if name == "--server":
        parse_server_spec(value)  # a bad one fails before any work
    if name in _CLIENT_FLAGS:
        setattr(inv, _CLIENT_FLAGS[name], True)
    elif name in _CLIENT_VALUES:
        setattr(inv, _CLIENT_VALUES[name], value)
    elif name in _CLIENT_LISTS:
        getattr(inv, _CLIENT_LISTS[name]).append(value)
    elif name == "--each-kernel":
        inv.each_kernel = kernel_releases(value)
    elif name == "--deadline":
        try:
            inv.deadline = float(value)
        except ValueError:
            raise Error(f"--deadline={value}: give seconds") from None
    elif name == "-p":
        inv.last_pass = int(value)  # 1-5: checked as stap does
    elif name == "-I":
        value = _add_tree(inv, value)
    elif name == "-v":
        inv.verbose += 1
    if how.staprun:
        inv.staprun_opts += [how.staprun] + ([value] if value is not None else [])
    if how.client != LOCAL and not own:
        separator = "=" if name.startswith("--") else ""
        inv.server_args.append(name + ("" if value is None else separator + value))


def _add_script(inv, name, stdin):
    if name == "-":
        inv.files.append(("script/-", (stdin or sys.stdin.buffer).read()))
        inv.server_args.append("script/-")
        return
    path = os.path.abspath(name)
    if os.path.isfile(path):  # else stap on the server says it is missing, in its words
        inv.files.append(("script" + path, path))
    inv.server_args.append("script" + path)
    inv.script = ("script" + path, name)  # what the server calls it, what the user did


def _add_tree(inv, directory):
    """Ship every regular file under an -I directory (a missing one ships nothing: stap ignores it);
    the argument the server sees is the tree's place inside the request.  What a request can carry
    bounds the tree."""
    top = os.path.abspath(directory)
    count = size = 0
    for root, dirs, names in os.walk(top):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(root, n)
            if not os.path.isfile(p) or os.path.islink(p):
                continue  # links and special files are not sent
            if not os.access(p, os.R_OK):
                raise Error(f"unable to send {directory} to the server: cannot read {p}")
            count, size = count + 1, size + os.path.getsize(p)
            if count > Limits.max_entries or size > Limits.max_total_bytes:
                raise Error(f"unable to send {directory} to the server: more than "
                            f"{Limits.max_entries} files or {Limits.max_total_bytes >> 20} MiB")
            inv.files.append(("tapset" + p, p))
    return "tapset" + top


def staprun_argv(inv, module):
    """What stap itself would give staprun for pass 5: -v one fewer times,
    -o as an absolute path, -R (rename) unless -m named the module, -G
    assignments after the module."""
    argv = [os.environ.get("SYSTEMTAP_STAPRUN") or "staprun"]
    argv += ["-v"] * max(0, inv.verbose - 1)
    if inv.output:
        argv += ["-o", os.path.abspath(inv.output)]
    argv += inv.staprun_opts
    if inv.flight_recorder:
        argv += ["-D"] if inv.output else ["-L"]
    if not inv.module_name:
        argv += ["-R"]
    return argv + [module] + inv.globals


# --------------------------------------------------------------------------
# The protocol both sides share, each format's writer beside its reader: the request and reply
# archives, the JAR and PKCS#7 signature, DER, mDNS packets (the server adds its key and sockets)
# --------------------------------------------------------------------------

class Limits:
    """Bounds on an archive; keyword arguments override the defaults."""
    max_entries = 10000
    max_entry_bytes = 128 << 20
    max_total_bytes = 256 << 20
    max_ratio = 200  # uncompressed/compressed, for entries over 1 MiB
    too_large = "archive unpacks to {total} bytes, more than {limit}"  # the server's own words

    def __init__(self, **overrides):
        for name, value in overrides.items():
            if not hasattr(Limits, name):
                raise TypeError(f"no such limit: {name}")
            setattr(self, name, value)


# The locale settings a request carries (stap's own list).
LOCALE_KEYS = ("LANG", "LC_ALL", "LC_CTYPE", "LC_COLLATE", "LC_MESSAGES", "LC_TIME",
               "LC_MONETARY", "LC_NUMERIC")


def locale_lines(environ=None):
    """LANG and LC_* as they are: the server passes on the values it finds safe and tells the client
    which it did not, as the real server does."""
    env = os.environ if environ is None else environ
    return "".join(f"{k}={env[k]}\n" for k in LOCALE_KEYS if k in env)


def build_request(inv):
    """(the request zip: version, sysinfo, argvN, script/, tapset/, locale; its identity)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("version", PROTOCOL_VERSION)
        zf.writestr("sysinfo", "sysinfo: " + local_sysinfo(inv.release, inv.arch))
        for n, arg in enumerate(inv.server_args, 1):
            zf.writestr(f"argv{n}", arg.encode("utf-8", "surrogateescape"))
        for name, source in inv.files:
            if isinstance(source, bytes):
                zf.writestr(name, source)
            else:
                zf.write(source, name)
        if loc := locale_lines():
            zf.writestr("locale", loc)
        if inv.moks:
            zf.writestr("mok_fingerprints", "".join(f"{fp}\n" for fp in inv.moks))
    return buf.getvalue(), request_identity(zf.infolist())


def request_identity(infos):
    """What makes two requests the same, from their zip entries (every entry's name, size and CRC,
    but not the client's version and locale): zips differ in their dates."""
    parts = sorted(f"{i.filename}\0{i.file_size}\0{i.CRC}" for i in infos
                   if i.filename not in ("version", "locale"))
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).digest()


def safe_members(zf, limits):
    """Check every entry before anything is written; raise Error naming the first bad one.
    Directories and regular files only."""
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise Error(f"archive has {len(infos)} entries (limit {limits.max_entries})")
    total = sum(info.file_size for info in infos)  # first, as the real server checks it
    if total > limits.max_total_bytes:
        raise Error(limits.too_large.format(total=total, limit=limits.max_total_bytes))
    for info in infos:
        _check_entry_name(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise Error(f"archive entry {info.filename} is not a regular file or directory")
        if info.file_size > limits.max_entry_bytes:
            raise Error(f"archive entry {info.filename} is too large ({info.file_size} bytes)")
        if info.file_size > 1 << 20 and\
                info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise Error(f"archive entry {info.filename} is compressed suspiciously well")
    if total > 1 << 20 and total > limits.max_ratio * max(sum(i.compress_size for i in infos), 1):
        raise Error(f"archive unpacks to {total} bytes, more than {limits.max_ratio} times its "
                    "compressed size")  # many entries each under the one-entry bound
    return infos


def _check_entry_name(name):
    parts = name.rstrip("/").split("/")
    if (not name or name.startswith("/") or "\\" in name or "\0" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise Error(f"archive entry name {name!r} is not a plain relative path")


def open_archive(data):
    try:
        return zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError,
            NotImplementedError) as e:  # e.g. "zip file version 6.4"
        raise Error(f"not a valid zip archive ({e})") from None


# What inflating a damaged or hostile entry raises.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
               ValueError)


def extract_archive(zf, dest, limits, only=None):
    """Write the checked entries under dest (regular files 0644, dirs 0755), or those named in only,
    counting the bytes inflated; {name: SHA-1 of what was written, hashed as it was} of each."""
    infos = safe_members(zf, limits)
    written, sha1 = 0, {i.filename: hashlib.sha1() for i in infos}
    for info in infos:
        if only is not None and info.filename not in only and not info.is_dir():
            continue
        target = os.path.join(dest, info.filename)
        try:
            if info.is_dir():
                os.makedirs(target, 0o755, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with zf.open(info) as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 16):
                    written += len(chunk)
                    if written > limits.max_total_bytes:
                        raise Error("archive inflates beyond its declared size")
                    out.write(chunk)
                    sha1[info.filename].update(chunk)
        except _ZIP_ERRORS as e:
            raise Error(f"archive entry {info.filename} is corrupt ({e})") from None
        except OSError as e:  # a duplicate or a file/directory clash, a full disk
            message = f"cannot unpack archive entry {info.filename}: {e.strerror}"
            if e.errno in _LOCAL_ERRNOS:
                raise LocalFault(message, e.strerror) from None
            raise Error(message) from None
    return sha1


class RequestArchive:
    """A received request read in place from its zip: every entry checked first, nothing written
    until extract().  Paths are the entries' names (script/..., tapset/..., argvN)."""

    def __init__(self, zf, limits):
        self.zf, self.limits = zf, limits
        files = [i for i in safe_members(zf, limits) if not i.is_dir()]
        self.infos = {i.filename: i for i in files}
        if len(self.infos) < len(files):
            twice = collections.Counter(i.filename for i in files).most_common(1)[0][0]
            raise Error(f"archive entry {twice} appears twice")
        self.unpacked_size = sum(i.file_size for i in self.infos.values())

    def size(self, name):
        """The entry's unpacked size, or None when it is not a file of the request."""
        info = self.infos.get(name)
        return info and info.file_size

    def read(self, name):
        """An entry's bytes, or None when the request has no such file (a directory is none)."""
        if name not in self.infos:
            return None
        try:
            with self.zf.open(self.infos[name]) as f:
                return f.read()
        except _ZIP_ERRORS as e:
            raise Error(f"archive entry {name} is corrupt ({e})") from None

    def files(self, prefix=""):
        """The names of the files under prefix, in a stable order."""
        return sorted(n for n in self.infos if n.startswith(prefix))

    def contains(self, path):
        """Whether a relative path stays inside the request once unpacked (it holds no links, so
        its lexical form says where it leads)."""
        resolved = posixpath.normpath(posixpath.join("/request", path))
        return resolved == "/request" or resolved.startswith("/request/")

    def digest(self, skip=()):
        """SHA-256 of every file's name and bytes but those named in skip, streamed (nothing is
        held in memory)."""
        h = hashlib.sha256()
        for name in (n for n in self.files() if n not in skip):
            h.update(name.encode("utf-8", "surrogateescape") + b"\0")
            try:
                with self.zf.open(self.infos[name]) as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
            except _ZIP_ERRORS as e:
                raise Error(f"archive entry {name} is corrupt ({e})") from None
        return h.hexdigest()

    def extract(self, dest):
        extract_archive(self.zf, dest, self.limits)


# A reply as a server builds it: module (name, bytes[, signature]), mok_cert (DER bytes), or None.
ReplyContent = collections.namedtuple("ReplyContent", "rc stdout stderr version module mok_cert",
                                      defaults=(None, None, None))


class Reply(collections.namedtuple("Reply", ReplyContent._fields)):
    """A reply as read_reply read it: module, mok_cert: the paths of the files received, or None."""

    @property
    def busy(self):
        return self.rc != 0 and BUSY_MESSAGE.encode() in self.stderr[:400]


RESPONSE_DIR = "stap000000"  # the one module directory of our replies (real servers: stapXXXXXX)


def reply_entries(content):
    """The reply's entries, (name, bytes) in the real server's layout."""
    entries = [("version", content.version.encode()), ("rc", str(content.rc).encode()),
               ("stdout", content.stdout), ("stderr", content.stderr)]
    if content.module:
        name, data, *signature = content.module
        entries.append((f"{RESPONSE_DIR}/{name}", data))
        entries += [(f"{RESPONSE_DIR}/{name}.sgn", sig) for sig in signature]
    if content.mok_cert:
        entries.append((MOK_CERT_NAME, content.mok_cert))  # beside rc, where real clients look
    return entries


_MODULE_DIR = re.compile(r"^stap[A-Za-z0-9_]{6}/")
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+\.ko\Z")  # what stap names a module (-m's pattern)


def read_reply(data, dest, peer_der, limits=Limits()):
    """Check, verify and unpack a reply zip into dest; return a Reply."""
    zf = open_archive(data)
    names = [i.filename for i in safe_members(zf, limits)]
    only = None
    if any(n.startswith("META-INF/") for n in names):
        only = _jar_verified_names(zf, names, peer_der)
        stray = [n for n in names if n not in only and not n.endswith("/")
                 and not n.startswith("META-INF/")]
        if stray:
            raise Error(f"reply entry {stray[0]} is not covered by the server's signature")
    unpacked = os.path.join(dest, "reply")
    _make_private_dir(unpacked)
    sha1 = extract_archive(zf, unpacked, limits, only)
    altered = [n for n in only or () if base64.b64encode(sha1[n].digest()) != only[n]]
    if altered:  # the signature's digests, checked against what was unpacked
        raise Error(f"reply signature does not verify ({altered[0]} altered)")
    read = lambda n: read_entry(unpacked, n)
    if read("rc") is None:
        raise Error("reply has no rc entry")
    try:
        rc = int(read("rc").strip() or b"1")
    except ValueError:
        raise Error("reply's rc entry is not a number") from None
    modules = [n for n in names if _MODULE_DIR.match(n) and n.endswith(".ko") and n.count("/") == 1]
    if len({n.split("/")[0] for n in names if _MODULE_DIR.match(n)}) > 1 or len(modules) > 1:
        raise Error("reply holds more than one module directory")
    if modules and not _MODULE_NAME.match(modules[0].split("/")[1]):
        raise Error(f"reply's module '{modules[0].split('/')[1]}' is not named as stap names "
                    "modules")
    return Reply(rc=rc, stdout=read("stdout") or b"", stderr=read("stderr") or b"",
                 version=(read("version") or b"").decode(errors="replace").strip(),
                 module=os.path.join(unpacked, modules[0]) if modules else None,
                 mok_cert=os.path.join(unpacked, MOK_CERT_NAME) if MOK_CERT_NAME in names else None)


def _make_private_dir(path):
    try:
        os.mkdir(path, 0o700)
    except OSError as e:
        raise LocalFault(f"cannot make directory {path}: {e.strerror}", e.strerror) from None


def read_entry(top, name):
    try:
        with open(os.path.join(top, name), "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None


def der_element(data, pos):
    """(tag, start of content, end of element) of the DER element at pos."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("DER element overruns its container")
    return tag, pos, pos + length


def der_children(data, start, end):
    children = []
    while start < end:
        tag, cstart, cend = der_element(data, start)
        children.append((tag, start, cstart, cend))
        start = cend
    return children


def der(tag, *content):
    """A DER element: tag, definite length, content."""
    body = b"".join(content)
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + body


_TbsFields = collections.namedtuple("TbsFields",
                                    "serial signature issuer validity subject key_info")


def tbs_fields(der):
    """The fields of a DER certificate's TBSCertificate after its version (RFC 5280 4.1), by name,
    each as der_children gives it."""
    _, start, end = der_element(der, 0)  # Certificate
    _, start, end = der_element(der, start)  # TBSCertificate
    fields = der_children(der, start, end)
    return _TbsFields(*(fields[1:] if fields[0][0] == 0xA0 else fields)[:6])  # [0] version


def certificate_serial(der):
    """The serial number of a DER certificate, as an integer."""
    _, _, start, end = tbs_fields(der).serial
    return int.from_bytes(der[start:end], "big")


# --- signed replies: JARs in signtool's format, checked in this process -----

_JAR_MANIFEST = "META-INF/manifest.mf"
_JAR_SIGNATURE_FILE = "META-INF/zigbert.sf"
_JAR_SIGNATURE_BLOCK = "META-INF/zigbert.rsa"
_JAR_CREATOR = b"Created-By: stap-server (signtool format)\n"

# The DER of the object identifiers a JAR signature names.
_DER_OID = {name: b"\x06" + bytes([len(body)]) + body for name, body in (
    ("data", bytes.fromhex("2a864886f70d010701")),
    ("signedData", bytes.fromhex("2a864886f70d010702")),
    ("contentType", bytes.fromhex("2a864886f70d010903")),
    ("messageDigest", bytes.fromhex("2a864886f70d010904")),
    ("signingTime", bytes.fromhex("2a864886f70d010905")),
    ("rsaEncryption", bytes.fromhex("2a864886f70d010101")),
    ("sha1", bytes.fromhex("2b0e03021a")),
    ("sha256", bytes.fromhex("608648016503040201")))}

# PKCS#1 v1.5 DigestInfo prefixes, by the DER of the digest's OID.
_DIGEST_INFO = {
    _DER_OID["sha1"]: (hashlib.sha1, bytes.fromhex("3021300906052b0e03021a05000414")),
    _DER_OID["sha256"]: (hashlib.sha256, bytes.fromhex("3031300d060960864801650304020105000420")),
}


def _jar_digests(data):
    """One manifest section's digest lines, as signtool writes them."""
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest())
    return (b"Digest-Algorithms: MD5 SHA1\nMD5-Digest: " + md5 + b"\nSHA1-Digest: "
            + _sha1_b64(data) + b"\n")


def jar_manifests(entries):
    """(manifest, signature file) for [(name, bytes)]: the manifest digests each entry, the
    signature file each manifest section."""
    main = b"Manifest-Version: 1.0\n" + _JAR_CREATOR
    sections = [b"Name: " + name.encode() + b"\n" + _jar_digests(data) for name, data in entries]
    signature_file = [b"Signature-Version: 1.0\n" + _JAR_CREATOR + _jar_digests(main)]
    signature_file += [s.split(b"\n", 1)[0] + b"\n" + _jar_digests(s) for s in sections]
    return b"\n".join([main] + sections), b"\n".join(signature_file)


def signed_jar(entries, cert_der, sign):
    """[(name, bytes)] as a zip signed as signtool -Z signs a directory: digests of every entry in a
    manifest, of the manifest in a signature file, a PKCS#7 signature of that file (SHA-1, the one
    digest NSS's JAR verifier knows) by sign(data, NSS SEC_OID name), with the key of cert_der."""
    manifest, signature_file = jar_manifests(entries)
    block = _pkcs7_signature(signature_file, cert_der, sign)
    out = io.BytesIO()
    stamp = time.localtime()[:6]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries + [(_JAR_MANIFEST, manifest),
                                     (_JAR_SIGNATURE_FILE, signature_file),
                                     (_JAR_SIGNATURE_BLOCK, block)]:
            info = zipfile.ZipInfo(name, stamp)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=1 if len(data) > 65536 else None)
    return out.getvalue()


def _pkcs7_signature(content, cert_der, sign):
    """A detached PKCS#7 SignedData of content with authenticated attributes (content type, signing
    time, SHA-1 digest), carrying cert_der: signtool's signature block, byte for byte in layout."""
    oid = _DER_OID
    attributes = [
        der(0x30, oid["contentType"], der(0x31, oid["data"])),
        der(0x30, oid["signingTime"], der(0x31, der(0x17, time.strftime(
            "%y%m%d%H%M%SZ", time.gmtime()).encode()))),
        der(0x30, oid["messageDigest"], der(0x31, der(0x04, hashlib.sha1(content).digest()))),
    ]
    signed = der(0x31, *attributes)
    signature = sign(signed, "SEC_OID_PKCS1_SHA1_WITH_RSA_ENCRYPTION")
    fields = tbs_fields(cert_der)
    serial, issuer = (cert_der[f[1]:f[3]] for f in (fields.serial, fields.issuer))
    sha1 = der(0x30, oid["sha1"], b"\x05\x00")
    signer_info = der(0x30, b"\x02\x01\x01", der(0x30, issuer, serial), sha1,
                      b"\xa0" + signed[1:], der(0x30, oid["rsaEncryption"], b"\x05\x00"),
                      der(0x04, signature))
    signed_data = der(0x30, b"\x02\x01\x01", der(0x31, sha1), der(0x30, oid["data"]),
                      der(0xA0, cert_der), der(0x31, signer_info))
    return der(0x30, oid["signedData"], der(0xA0, signed_data))


def _jar_sections(text):
    """{name: (section bytes, {key: value})} of a manifest or signature file; the main section under
    the name None."""
    sections = {}
    for chunk in text.split(b"\n\n"):
        if not chunk:
            continue
        raw = chunk + b"\n" if not chunk.endswith(b"\n") else chunk
        fields = dict(line.split(b": ", 1) for line in raw.splitlines() if b": " in line)
        name = fields.get(b"Name")
        if name in sections or (name is None and sections):
            raise ValueError("duplicate section")
        sections[None if name is None else name.decode()] = (raw, fields)
    return sections


def _jar_verified_names(zf, names, peer_der):
    """{entry: its SHA-1 (base64)} of the entries a signed reply's signature covers, signed with
    the key of peer_der (the server we shook hands with); read_reply checks the entries."""
    blocks = [n for n in names if re.match(r"META-INF/[^/]+\.(RSA|rsa)$", n)]
    if len(blocks) != 1:
        raise Error("reply signature has no single signature block")
    stem = blocks[0][:-4]
    try:
        manifest = _jar_sections(zf.read(_JAR_MANIFEST))
        signature_file = zf.read(stem + ".sf" if stem + ".sf" in names else stem + ".SF")
        check_pkcs7_signature(zf.read(blocks[0]), signature_file, peer_der)
        signed = _jar_sections(signature_file)
    except KeyError as e:
        raise Error(f"reply signature is incomplete ({e.args[0]})") from None
    except (IndexError, ValueError):
        raise Error("reply signature block is malformed") from None
    if signed.get(None, (b"", {}))[1].get(b"SHA1-Digest") != _sha1_b64(manifest[None][0]):
        raise Error("reply signature does not verify (manifest header altered)")
    covered = {}
    for name, (raw, fields) in manifest.items():
        if name is None:
            continue
        if signed.get(name, (b"", {}))[1].get(b"SHA1-Digest") != _sha1_b64(raw) \
                or name not in names:
            raise Error(f"reply signature does not verify ({name} altered)")
        covered[name] = fields.get(b"SHA1-Digest")
    return covered


def _sha1_b64(data):
    return base64.b64encode(hashlib.sha1(data).digest())


def check_pkcs7_signature(pkcs7, content, peer_der):
    """Raise Error unless pkcs7 is a detached SignedData of content, with authenticated attributes,
    carrying peer_der alone and signed by its key."""
    _, s, e = der_element(pkcs7, 0)  # ContentInfo
    _, _, s, e = der_children(pkcs7, s, e)[1]  # [0] EXPLICIT content
    _, s, e = der_element(pkcs7, s)  # SignedData
    fields = der_children(pkcs7, s, e)
    certs = [pkcs7[a:c] for tag, _, s, e in fields if tag == 0xA0
             for _, a, _, c in der_children(pkcs7, s, e)]
    if len(certs) != 1:
        raise Error(f"reply signature carries {len(certs)} certificates, expected one")
    if certs[0] != peer_der:
        raise Error("reply is signed by a certificate other than the server's")
    signers = der_children(pkcs7, *fields[-1][2:])
    if len(signers) != 1:
        raise Error("reply signature has more than one signer")
    _, _, algorithm, attributes, _, signature = der_children(pkcs7, *signers[0][2:])[:6]
    _, a, _, c = der_children(pkcs7, *algorithm[2:])[0]
    if pkcs7[a:c] not in _DIGEST_INFO or attributes[0] != 0xA0:
        raise Error("reply signature uses an unknown digest or form")
    hasher, digest_info = _DIGEST_INFO[pkcs7[a:c]]
    digests = []
    for _, _, s, e in der_children(pkcs7, *attributes[2:]):  # Attribute: type, SET of values
        (_, a, _, c), (_, _, vs, _) = der_children(pkcs7, s, e)[:2]
        if pkcs7[a:c] == _DER_OID["messageDigest"]:
            _, vs, ve = der_element(pkcs7, vs)
            digests.append(pkcs7[vs:ve])
    if digests != [hasher(content).digest()]:
        raise Error("reply signature does not verify (signature file altered)")
    signed = b"\x31" + pkcs7[attributes[1] + 1:attributes[3]]  # as the SET OF it stands for
    if not rsa_signature_valid(peer_der, digest_info + hasher(signed).digest(),
                               pkcs7[signature[2]:signature[3]]):
        raise Error("reply signature does not verify (bad signature)")


def rsa_signature_valid(cert_der, digest_info, signature):
    """RSA PKCS#1 v1.5 check of signature over digest_info with the public key of cert_der: the
    whole encoded block is compared, nothing parsed."""
    _, _, s, e = tbs_fields(cert_der).key_info
    _algorithm, (_, _, s, _) = der_children(cert_der, s, e)  # BIT STRING: unused bits, RSAPublicKey
    _, s, e = der_element(cert_der, s + 1)
    n, exponent = (int.from_bytes(cert_der[a:b], "big")
                   for _, _, a, b in der_children(cert_der, s, e))
    k = (n.bit_length() + 7) // 8
    s = int.from_bytes(signature, "big")
    if len(signature) != k or s >= n or len(digest_info) > k - 11:
        return False
    block = b"\x00\x01" + b"\xff" * (k - 3 - len(digest_info)) + b"\x00" + digest_info
    return pow(s, exponent, n).to_bytes(k, "big") == block


# --- mDNS packets: the browser's queries and reading of answers, the responder's answers -------

def _normalize_mdns_wire(wire):
    """Clear the mDNS top bits of every class field (RFC 6762 5.4, 10.2).

    They mean "unicast response wanted" in questions and "cache flush" in records; dnspython
    would read them as unknown classes and fail to decode A and SRV data.  Returns (plain DNS
    wire, [QU flag per question]).
    """
    data = bytearray(wire)
    qdcount, ancount, nscount, arcount = struct.unpack_from("!4H", data, 4)
    pos = 12
    unicast = []
    for _ in range(qdcount):
        pos += dns.name.from_wire(wire, pos)[1]  # past the name, compressed or not
        unicast.append(bool(data[pos + 2] & 0x80))
        data[pos + 2] &= 0x7f
        pos += 4
    for _ in range(ancount + nscount + arcount):
        pos += dns.name.from_wire(wire, pos)[1]
        rrtype, rdlength = struct.unpack_from("!H6xH", data, pos)
        if rrtype != dns.rdatatype.OPT:  # OPT's class is a size
            data[pos + 2] &= 0x7f
        pos += 10 + rdlength
    if pos > len(data):
        raise ValueError("truncated DNS message")
    return bytes(data), unicast


def parse_mdns(wire):
    """(dns.message.Message, QU flags) or (None, []) for garbage."""
    require_dnspython()
    try:
        plain, unicast = _normalize_mdns_wire(wire)
        return dns.message.from_wire(plain, ignore_trailing=True), unicast
    except Exception:  # noqa: BLE001 - any bad packet
        return None, []


class _MdnsAnswers:
    """What the responses said so far: for each instance (named by a PTR or by its own records) its
    data (see instance()), and each host's addresses."""

    def __init__(self):
        self.instances = {}  # instance dns.name -> its data
        self.addresses = {}  # host dns.name -> {address: None}, in the order found

    def add(self, message, source_ip, iface=""):
        stype = service_name()
        for rrset in message.answer + message.additional:
            owner = rrset.name
            for rd in rrset:
                if rd.rdtype == dns.rdatatype.PTR and owner == stype:
                    # TTL 0: a goodbye, the server has gone
                    self.instance(rd.target, source_ip).advertised = rrset.ttl != 0
                elif rd.rdtype == dns.rdatatype.SRV:
                    self.instance(owner, source_ip).srv = (rd.target, rd.port)
                elif rd.rdtype == dns.rdatatype.TXT:
                    self.instance(owner, source_ip).txt = txt_dict(rd.strings)
                elif rd.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    address = rd.address
                    if address.lower().startswith("fe80:") and iface:
                        address = f"{address}%{iface}"  # link-local needs its scope
                    self.addresses.setdefault(owner, {})[address] = None

    def instance(self, name, source_ip):
        """Its SRV (target, port), TXT dict, whether a PTR currently advertises it, and the address
        the first response about it came from."""
        return self.instances.setdefault(name, types.SimpleNamespace(
            srv=None, txt=None, advertised=False, source=source_ip))

    def advertised(self):
        return [(name, data) for name, data in self.instances.items() if data.advertised]

    def missing(self):
        """Questions still to ask: (name, type) pairs."""
        wanted = []
        for name, data in self.advertised():
            if data.srv is None:
                wanted.append((name, dns.rdatatype.SRV))
            elif data.srv[0] not in self.addresses:
                wanted.append((data.srv[0], dns.rdatatype.A))
            if data.txt is None:
                wanted.append((name, dns.rdatatype.TXT))
        return wanted

    def records(self):
        return [record_from_txt(_instance_label(name), data.srv[0].to_text(omit_final_dot=True),
                                address, data.srv[1], data.txt or {})
                for name, data in self.advertised() if data.srv
                for address in self.addresses.get(data.srv[0]) or [data.source]]


def _instance_label(fqdn):
    """'Systemtap Compile Server on a._stap._tcp.local.' -> the first label."""
    return fqdn.labels[0].decode("utf-8", "replace")


def mdns_query(questions, query_id=0):
    """Wire bytes of a multicast DNS query for (name, type) pairs."""
    require_dnspython()
    msg = dns.message.Message(id=query_id)
    msg.flags = 0  # no RD: mDNS queries
    for name, rdtype in questions:
        msg.find_rrset(msg.question, name, dns.rdataclass.IN, rdtype, create=True)
    return msg.to_wire()


def txt_rdata_text(strings):
    """TXT strings in DNS presentation form: each quoted, quotes escaped."""
    return " ".join('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in strings)


def mdns_answers(questions, table, hostname):
    """(answers, additionals) from a responder's rrsets: the rrsets asked for, and what the asker
    wants next (RFC 6763 12): a PTR's targets, and the host's addresses for a PTR or SRV."""
    answers = [rr for rr in table if any(
        q.name == rr.name and q.rdtype in (rr.rdtype, dns.rdatatype.ANY) for q in questions)]
    wanted = {rd.target for rr in answers if rr.rdtype == dns.rdatatype.PTR for rd in rr}
    if any(rr.rdtype in (dns.rdatatype.PTR, dns.rdatatype.SRV) for rr in answers):
        wanted.add(hostname)
    return answers, [rr for rr in table if rr.name in wanted and rr not in answers]


def mdns_response(answers, additional, legacy_query=None):
    """Wire bytes of a response; to a legacy query, with its id and question (RFC 6762 6.7)."""
    msg = dns.message.Message(id=legacy_query.id if legacy_query else 0)
    msg.flags = dns.flags.QR | dns.flags.AA
    msg.question = list(legacy_query.question) if legacy_query else []
    msg.answer, msg.additional = answers, additional
    return msg.to_wire()


# --------------------------------------------------------------------------
# Transport: TLS with the NSS bindings, straight from the databases
# --------------------------------------------------------------------------

_nss_contexts = {}


def nss_modules():
    try:
        import nss.error as nerror
        import nss.io as nio
        import nss.nss as nss
        import nss.ssl as ssl
    except ImportError:
        raise Error("the Python NSS bindings are missing (Debian: apt-get install "
                    "python3-nss; elsewhere: pip install python-nss-ng)") from None
    return nss, ssl, nio, nerror


def open_databases(dbs):
    """Open each database read-only in this process; NSS then trusts a peer that any of them
    trusts."""
    nss, _, _, nerror = nss_modules()
    flags = nss.NSS_INIT_READONLY | nss.NSS_INIT_NOROOTINIT | nss.NSS_INIT_NOMODDB
    for db in dbs:
        if db.spec not in _nss_contexts:
            try:
                _nss_contexts[db.spec] = nss.nss_init_context(db.spec, flags=flags)
            except nerror.NSPRError as e:
                raise Error(f"cannot open certificate database {db.path}: {e.strerror}") from None
    restrict_cipher_suites()


# Forward secrecy and authenticated encryption only: ECDHE or TLS 1.3 key exchange, GCM or
# ChaCha20-Poly1305.  Judged from NSS's own description of each suite, so suites a newer NSS adds
# are sorted too; python-nss exports no constant for TLS 1.3 or AEAD, and static ECDH shares ECDHE's
# kea number, so the names decide.  The real stap 4.8 client offers all of these.
_FORWARD_SECRET_KEA = ("ECDHE", "TLS 1.3")


def restrict_cipher_suites():
    """Under the domestic policy, make every TLS socket this process opens from now on negotiate
    only forward-secret AEAD suites (sockets copy the defaults)."""
    ssl = nss_modules()[1]
    ssl.set_domestic_policy()
    allowed = {s for s in ssl.ssl_implemented_ciphers
               if (info := ssl.get_cipher_suite_info(s)).kea_type_name in _FORWARD_SECRET_KEA
               and info.mac_algorithm_name == "AEAD"}
    if not allowed:
        raise Error("this NSS offers no forward-secret AEAD cipher suite")
    for suite in ssl.ssl_implemented_ciphers:
        ssl.set_default_cipher_pref(suite, suite in allowed)


def nss_interval(seconds):
    return nss_modules()[2].seconds_to_interval(int(max(1, seconds)))


class Peer(collections.namedtuple("Peer", "host port")):
    """A server to connect to."""

    def __str__(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_server_spec(spec):
    """HOST, HOST:PORT, IP:PORT or [IPv6]:PORT -> (host, port or None)."""
    m = re.match(r"^\[([0-9A-Fa-f:.%\w]+)\](?::(\d+))?$", spec)
    if m:
        host, port = m.group(1), m.group(2)
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    else:
        host, port = spec, None  # a bare IPv6 address has no port
    if not host:
        raise Error(f"--server={spec}: no host name")
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise Error(f"--server={spec}: invalid port '{port}'")
        port = int(port)
    return host, port


def tls_connect(peer, timeout=_CONNECT_TIMEOUT, fetch_only=False):
    """A TLS socket to peer whose certificate a database trusts; returns (socket, peer certificate
    DER).  fetch_only: accept any certificate, for a person to judge before anything is sent."""
    nss, _, _, nerror = nss_modules()
    verdict = {}

    def auth_certificate(sock, check_sig, is_server, certdb):
        cert = sock.get_peer_certificate()
        verdict["der"] = bytes(cert.der_data)
        if fetch_only:
            return True
        try:
            cert.verify_now(certdb, check_sig, nss.certificateUsageSSLServer)
        except nerror.NSPRError as e:
            verdict["why"] = _certificate_problem(e, cert, peer)
            return False
        if not _is_ip_address(peer.host) and not cert.verify_hostname(peer.host):
            _warn(f"server {peer} presents a certificate for "
                  f"{', '.join(_alt_names(cert)) or 'no DNS name'}; trusted by the database anyway")
        return True

    try:
        infos = socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Error(f"cannot resolve server host {peer.host}: {e.strerror}") from None
    last = None
    for family, _, _, _, addr in infos:
        raw = socket.socket(family, socket.SOCK_STREAM)
        raw.settimeout(timeout)
        try:
            raw.connect(addr)
        except OSError as e:
            raw.close()
            last = "cannot connect: " + (f"no answer within {timeout} s"
                                         if isinstance(e, socket.timeout) else e.strerror or str(e))
            continue
        sock = tls_socket(raw, as_server=False)
        sock.set_hostname(peer.host)
        sock.set_auth_certificate_callback(auth_certificate, nss.get_default_certdb())
        sock.reset_handshake(False)
        try:
            sock.force_handshake_timeout(nss_interval(timeout))
        except nerror.NSPRError as e:
            sock.close()
            if "why" in verdict:
                raise verdict["why"] from None
            raise Lost(f"TLS handshake with {peer} failed: {e.strerror}") from None
        return sock, verdict["der"]
    raise Unreachable(last or f"cannot resolve {peer.host}")


def tls_socket(raw, as_server):
    """A connected TCP socket as an NSS TLS socket (TLS 1.2 or 1.3), without Nagle: small TLS
    records (the last one, close_notify) must not wait for a delayed ACK, which costs 40 ms a round
    trip."""
    ssl = nss_modules()[1]
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ssl.SSLSocket.import_tcp_socket(raw.detach())
    sock.set_ssl_option(ssl.SSL_SECURITY, True)
    sock.set_ssl_option(ssl.SSL_HANDSHAKE_AS_SERVER if as_server else
                        ssl.SSL_HANDSHAKE_AS_CLIENT, True)
    sock.set_ssl_version_range("tls1.2", "tls1.3")
    return sock


def _is_ip_address(host):
    """A literal address: trust comes from the database alone, as with the real client."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host.split("%")[0])
        return True
    except OSError:
        return False


def _certificate_problem(err, cert, peer):
    """Why peer's certificate was refused, in the user's words (NSS's own as the detail)."""
    text = err.strerror or str(err)
    if "EXPIRED" in str(err) or "expired" in text.lower():
        return Untrusted(f"server {peer} refused: its certificate expired on "
                         f"{cert.valid_not_after_str}", text)
    return Untrusted(f"not trusted here (certificate serial {serial_text(cert.serial_number)}); "
                     f"to trust it: stap-add-server-cert {peer}", text)


def _alt_names(cert):
    nss = nss_modules()[0]
    try:
        ext = cert.get_extension(nss.SEC_OID_X509_SUBJECT_ALT_NAME)
        return list(nss.x509_alt_name(ext.value))
    except Exception:  # no such extension
        return []


def _exchange(sock, request, waiting):
    """Send the framed request; read the reply to EOF, calling waiting() about once a second
    while nothing arrives."""
    nerror = nss_modules()[3]
    chunks, size, deadline = [], 0, time.monotonic() + _REPLY_TIMEOUT
    try:
        sock.sendall(len(request).to_bytes(4, "big", signed=True) + request,
                     nss_interval(_CONNECT_TIMEOUT + len(request) / 1e6))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Error(f"no complete reply within {_REPLY_TIMEOUT} s")
            try:
                chunk = sock.recv(1 << 16, nss_interval(min(left, 1.0)))
            except nerror.NSPRError as e:
                if e.errno != nerror.PR_IO_TIMEOUT_ERROR:
                    raise
                waiting()
                continue
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > Limits.max_total_bytes:
                raise Error(f"reply larger than {Limits.max_total_bytes} bytes")
    except nerror.NSPRError as e:  # end of file, without close_notify: judged by the archive
        if e.errno != nerror.PR_END_OF_FILE_ERROR:
            raise Lost(f"transfer failed: {e.strerror}") from None
    finally:
        sock.close()
    if not chunks:
        raise Lost("server closed the connection without a reply")
    return b"".join(chunks)


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------

MDNS_DOMAIN = "local"
MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
_DISCOVERY_TIMEOUT = 1.0  # seconds; stap-find-servers must answer in ~1 s
_COMPILE_DISCOVERY_TIMEOUT = 2.0  # a compile can afford a longer look on a busy network


class DiscoveryError(Error):
    """A discovery failure; the message is the one line the user sees."""


class ServerRecord(collections.namedtuple(
        "ServerRecord", "host address port sysinfo version certinfo txt name")):
    """One advertised compile server instance, as seen from one address: host ('stap-host-a.local'),
    address (IPv4, or IPv6 with %iface when link-local), port, sysinfo ('<release> <arch>'),
    version, certinfo (certificate serial, colon-separated hex), txt (every TXT key) and the DNS-SD
    instance name."""


def record_from_txt(name, host, address, port, txt):
    """A ServerRecord from resolved DNS-SD data and its TXT dict."""
    return ServerRecord(host=host.rstrip("."), address=address, port=int(port),
                        sysinfo=txt.get("sysinfo", ""), version=txt.get("version", ""),
                        certinfo=txt.get("certinfo", ""), txt=dict(txt), name=name)


def txt_dict(strings):
    """TXT strings ('key=value', bytes or str) as a dict; first key wins, but the values of
    repeated mok_info keys are joined by commas."""
    result = {}
    for item in strings:
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        key, _, value = item.partition("=")
        if key == "mok_info" and key in result:  # real servers send one string per MOK
            result[key] += "," + value
        elif key and key.lower() not in (k.lower() for k in result):
            result[key] = value  # RFC 6763 6.4: later duplicates ignored
    return result


def format_server_line(rec):
    """`HOST ADDRESS PORT 'sysinfo=RELEASE ARCH' 'version=..' ...`: the keys real servers advertise
    first, then the others sorted."""
    known = ["version", "certinfo", "optinfo"]
    keys = [k for k in known if k in rec.txt] + sorted(set(rec.txt) - {"sysinfo", *known})
    fields = [f"'sysinfo={rec.sysinfo}'"] + [f"'{k}={rec.txt[k]}'" for k in keys]
    return f"{rec.host} {rec.address} {rec.port} " + " ".join(fields)


def unique_records(records):
    """Drop repeats (same name, address and port: one server seen on several interfaces), keep the
    order found."""
    first = {}
    for rec in records:
        first.setdefault((rec.name, rec.address, rec.port), rec)
    return list(first.values())


def find_servers(all_servers=False, timeout=_DISCOVERY_TIMEOUT, sysinfo=None):
    """Servers advertised on the local network (and in the configured DNS domains), compatible ones
    only unless all_servers."""
    wanted = sysinfo or local_sysinfo()
    records, _ = browse(timeout, wide_area_domains())
    return [r for r in records if all_servers or r.sysinfo in (wanted, wanted.split()[-1])]


def browse(timeout=_DISCOVERY_TIMEOUT, domains=()):
    """(every advertised server, how we looked): the first of LINK_BROWSERS that answers (avahi,
    else our own multicast DNS query); at the same time unicast DNS in the given domains, if any."""
    deadline = time.monotonic() + timeout
    left = lambda: max(0.1, deadline - time.monotonic())  # of the time given
    wide = _WideAreaBrowse(domains, timeout) if domains else None
    how, records = first_answering(LINK_BROWSERS, lambda browse_link: browse_link(left()))
    if wide:
        records += wide.browse(left())
        how += f"; DNS in {', '.join(domains)}"
    records = sorted(unique_records(records), key=lambda r: (r.host, r.port, r.sysinfo, r.address))
    return records, how


def first_answering(backends, attempt, choice="auto"):
    """(name, answer) of the first back end of a registry ("auto": any) whose answer is not None."""
    for name, backend in backends.items():
        if choice in ("auto", name) and (answer := attempt(backend)) is not None:
            return name, answer
    raise DiscoveryError(f"no {choice} daemon answers")


# --- wide-area DNS-SD: the same records over unicast DNS (RFC 6763 11) ------

_DOMAINS_FILE = "stap-server-domains"  # in $sysconfdir/systemtap: a domain a line, or "search"


def wide_area_domains(extra=()):
    """The DNS domains to browse besides the local link: --domain options, then the lines of
    $sysconfdir/systemtap/stap-server-domains ("search": the host's search domains).  None unless
    configured: a client sends no unicast DNS query for servers unless told to."""
    domains = list(extra)
    path = os.path.join(sysconfdir(), "systemtap", _DOMAINS_FILE)
    with contextlib.suppress(OSError), open(path) as f:
        domains += [domain for line in f if (domain := line.split("#")[0].strip())]
    return list(dict.fromkeys(domains))


class _WideAreaBrowse:
    """A browse of _stap._tcp in unicast DNS, run in a thread beside the multicast one.  Each domain
    first asks b._dns-sd._udp.DOMAIN which domains to browse (RFC 6763 11), else browses the domain
    itself."""

    def __init__(self, domains, timeout):
        import threading  # only configured domains need it
        require_dnspython()  # here, not in the thread: the import is not thread-safe
        self.domains, self.deadline, self.records = domains, time.monotonic() + timeout, []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def browse(self, timeout):
        self.thread.join(timeout)
        return list(self.records)

    def run(self):
        import dns.resolver
        resolver = dns.resolver.Resolver()
        names = []
        for domain in self.domains:
            names += [n.to_text() for n in resolver.search] if domain == "search" else [domain]
        for domain in dict.fromkeys(names):
            pointed = self.ask(resolver, f"b._dns-sd._udp.{domain}", "PTR")
            for browse_domain in [r.target.to_text() for r in pointed] or [domain]:
                self.browse_domain(resolver, browse_domain)

    def browse_domain(self, resolver, domain):
        for ptr in self.ask(resolver, f"{SERVICE_TYPE}.{domain}", "PTR"):
            instance = ptr.target
            txt = txt_dict(s for rd in self.ask(resolver, instance, "TXT") for s in rd.strings)
            for srv in self.ask(resolver, instance, "SRV"):
                for a in self.ask(resolver, srv.target, "A"):
                    self.records.append(record_from_txt(
                        _instance_label(instance), srv.target.to_text(omit_final_dot=True),
                        a.address, srv.port, txt))

    def ask(self, resolver, name, rdtype):
        import dns.exception
        left = self.deadline - time.monotonic()
        if left <= 0:
            return []
        try:
            return list(resolver.resolve(name, rdtype, lifetime=left, search=False))
        except dns.exception.DNSException:
            return []


# --- avahi -----------------------------------------------------------------

def _collect_output(proc, deadline, done):
    """Read stdout and stderr of proc until EOF on both, the deadline or done(stdout); returns
    (stdout, stderr, reached EOF)."""
    chunks = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    open_streams = [s for s in chunks if not s.closed]
    while open_streams and (left := deadline - time.monotonic()) > 0:
        # Wake up now and then so done() also sees time passing.
        readable, _, _ = select.select(open_streams, [], [], min(left, 0.05) if done else left)
        for stream in readable:
            data = os.read(stream.fileno(), 65536)
            if data:
                chunks[stream] += data
            else:
                open_streams.remove(stream)
        if done and done(bytes(chunks[proc.stdout])):
            break
    return bytes(chunks[proc.stdout]), bytes(chunks[proc.stderr]), not open_streams


AVAHI_NO_DAEMON = ("Daemon not running", "Failed to create client object", "not installed")


def _browse_avahi(timeout=_DISCOVERY_TIMEOUT, settle=0.5):
    """Servers that avahi knows, or None when no avahi daemon answers.

    `avahi-browse -t` only exits ~1 s after its query (when avahi declares "all for now"), so
    we stop as soon as every instance announced ('+') is resolved ('=') and `settle` seconds
    have passed, or at `timeout`.
    """
    argv = ["avahi-browse", "--parsable", "--resolve", "--terminate", "--no-db-lookup",
            SERVICE_TYPE]
    start = time.monotonic()

    def complete(out):
        if time.monotonic() - start < min(settle, timeout):
            return False
        lines = out.decode("utf-8", "replace").splitlines()
        added = {tuple(l.split(";")[1:6]) for l in lines if l.startswith("+;")}
        resolved = {tuple(l.split(";")[1:6]) for l in lines if l.startswith("=;")}
        return bool(added) and added <= resolved

    result = run_tool(argv, timeout=timeout, done=complete)
    if result.returncode not in (0, None) and not result.stdout:
        if any(m in result.stderr.decode(errors="replace") for m in AVAHI_NO_DAEMON):
            return None
        raise DiscoveryError(result.error())
    return parse_avahi_browse(result.stdout.decode("utf-8", "replace"))


def parse_avahi_browse(text):
    """ServerRecords from the resolved ('=') lines of avahi-browse -p -r.

    =;IFACE;PROTO;NAME;TYPE;DOMAIN;HOST;ADDRESS;PORT;"k=v" "k=v" ...
    """
    records = []
    for line in text.splitlines():
        fields = line.split(";", 9)
        if len(fields) < 9 or fields[0] != "=":
            continue
        iface, proto, name, _type, _domain, host, address, port = fields[1:9]
        # A link-local address needs its scope.  (proto is the transport the record came over: an
        # IPv6 address can arrive over IPv4.)
        if address.lower().startswith("fe80:") and "%" not in address:
            address = f"{address}%{iface}"
        txt = txt_dict(parse_avahi_txt(fields[9] if len(fields) > 9 else ""))
        try:
            records.append(record_from_txt(unescape_avahi_label(name), host, address, port, txt))
        except ValueError:
            continue  # a malformed port: skip it
    return records


def unescape_avahi_label(label):
    r"""'Systemtap\032Compile' -> 'Systemtap Compile' (\DDD: byte DDD); also \. and \\."""
    raw = re.sub(rb"\\(?:(\d{3})|(.))", lambda m: bytes([int(m[1]) & 0xff]) if m[1] else m[2],
                 label.encode(), flags=re.S)
    return raw.decode("utf-8", "replace")


_TXT_ITEM = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_avahi_txt(field):
    """'"a=1" "b=x y"' -> ['a=1', 'b=x y'] (avahi quotes each string)."""
    return [re.sub(r"\\(.)", r"\1", m.group(1)) for m in _TXT_ITEM.finditer(field)]


# --- multicast DNS (no avahi) ------------------------------------------------

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Python < 3.13 lacks it (Linux: 8)
_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000


_Interface = collections.namedtuple("Interface", "name index address loopback")


def ipv4_interfaces():
    """Up, multicast-capable interfaces with an IPv4 address.

    Loopback counts only when it has the MULTICAST flag (set by hand, e.g. on a single test
    host), so normal hosts query their real networks.
    """
    result = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for index, name in socket.if_nameindex():
            ifreq = struct.pack("16s24x", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq), 16)[0]
                addr = fcntl.ioctl(s, _SIOCGIFADDR, ifreq)[20:24]
            except OSError:
                continue  # no IPv4 address
            if flags & _IFF_UP and flags & _IFF_MULTICAST:
                result.append(_Interface(name, index, socket.inet_ntoa(addr),
                                         bool(flags & _IFF_LOOPBACK)))
    return result


def require_dnspython():
    """Import dnspython on first use: most runs never need it, and it costs a sixth of the client's
    start-up."""
    global dns
    if dns is None:
        try:
            import dns.flags
            import dns.message
            import dns.name
            import dns.rdata
            import dns.rdataclass
            import dns.rdatatype
            import dns.rrset
        except ImportError:
            raise DiscoveryError("multicast DNS needs dnspython (Debian: python3-dnspython), "
                                 "and no avahi daemon runs") from None
    return dns


def service_name():
    """'_stap._tcp.local.' as a dnspython name."""
    require_dnspython()
    return dns.name.from_text(f"{SERVICE_TYPE}.{MDNS_DOMAIN}.")


def _browse_mdns(timeout=_DISCOVERY_TIMEOUT, settle=0.5):
    """Ask the network for _stap._tcp services with our own mDNS query.

    The query goes from an ephemeral port, so responders answer it with a unicast "legacy"
    reply to that port (RFC 6762 6.7) and we need not share port 5353 with anyone.  The query
    is repeated each second while nobody has answered (a lost packet, a busy responder),
    missing SRV/TXT/A data is asked for again, and what arrived by the deadline is still read.
    """
    require_dnspython()
    interfaces = ipv4_interfaces()
    if not interfaces:
        return []
    answers = _MdnsAnswers()
    start = time.monotonic()
    deadline = start + timeout
    browse_query = mdns_query([(service_name(), dns.rdatatype.PTR)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)  # arrival iface
        asked, next_browse, last_news = set(), start, start
        while (now := time.monotonic()) < deadline:
            if now >= next_browse and not answers.advertised():
                send_to_group(sock, interfaces, browse_query)
                next_browse = now + 1.0
            wanted = [q for q in answers.missing() if q not in asked]
            if wanted:
                asked.update(wanted)
                send_to_group(sock, interfaces, mdns_query(wanted))
            if (now - start >= min(settle, timeout) and answers.advertised()
                    and not answers.missing() and now - last_news > 0.1):
                break  # everything known and quiet
            if _receive_answers(sock, answers, min(0.05, deadline - now)):
                last_news = time.monotonic()
        while select.select([sock], [], [], 0)[0]:  # what arrived by the deadline
            _receive_answers(sock, answers, 0)
    return answers.records()


# The link's browsers by what they tell the user, preferred first: timeout -> records, None: absent
LINK_BROWSERS = {"avahi": _browse_avahi, "multicast DNS; no avahi daemon answered": _browse_mdns}


def _receive_answers(sock, answers, wait):
    """Read one datagram within wait seconds into answers; True if it was a response."""
    message, _, (source_ip, _port), ifindex = receive_mdns(sock, wait)
    if message is None or not message.flags & dns.flags.QR:
        return False
    iface = ""
    with contextlib.suppress(OSError):  # no IP_PKTINFO (index 0), or the interface went away
        iface = socket.if_indextoname(ifindex)
    answers.add(message, source_ip, iface)
    return True


def receive_mdns(sock, wait):
    """The next datagram within wait seconds: (dns.message.Message or None for garbage or nothing,
    QU flags, source (address, port), arrival interface index from IP_PKTINFO or 0)."""
    if not select.select([sock], [], [], max(0, wait))[0]:
        return None, [], (None, None), 0
    wire, ancdata, _flags, source = sock.recvmsg(9000, socket.CMSG_SPACE(12))
    ifindex = next((struct.unpack_from("i", data)[0] for level, kind, data in ancdata
                    if level == socket.IPPROTO_IP and kind == IP_PKTINFO), 0)
    return *parse_mdns(wire), source, ifindex


def send_to_group(sock, interfaces, wire, dest=(MDNS_GROUP, MDNS_PORT)):
    """Send one message out of every interface, to the mDNS group unless told otherwise."""
    for iface in interfaces:
        with contextlib.suppress(OSError):  # e.g. an interface going down meanwhile
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                            socket.inet_aton(iface.address))
            sock.sendto(wire, dest)


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

_CLIENT_USAGE = """\
usage: stap-client [--server=HOST[:PORT]]... [--ssl=DIR]... [STAP OPTIONS] [SCRIPT | -e TEXT] [ARGS]

Runs passes 1-4 of stap on a trusted compile server and pass 5 here with
staprun ($SYSTEMTAP_STAPRUN overrides which program).  Takes stap's options
(see stap --help) and:
  --server=HOST[:PORT]  use this server (repeatable, tried in order); no port:
                        the port HOST advertises.  IPv6: [ADDR]:PORT
  --ssl=DIR             also trust servers in this client database (searched first)
  --deadline=SECONDS    keep retrying busy servers this long (default 600);
                        one that refuses or cannot be reached fails in seconds
  --each-kernel=REL[,REL...] | --each-kernel=@FILE
                        check the script against each kernel release at once (FILE:
                        one release a line): a line each, "REL ok" or "REL error:
                        ..."; with -p4 each module is kept as NAME-REL.ko
Also runs as: python3 stap_client.py stap-client ARGS...
"""


def stap_client(argv):
    inv = parse_stap_args(argv)
    if inv.help:
        print(_CLIENT_USAGE, end="")
        return 0
    if inv.version:
        print(f"stap-client (systemtap compile-server protocol {PROTOCOL_VERSION})")
        return 0
    inv.moks = secure_boot_moks()  # as stap, before anything else is looked at
    dbs = client_databases(inv.ssl_dirs)
    for note in inv.notes:  # for a person watching (a terminal) or -v, as stap prints them
        if inv.verbose or sys.stderr.isatty():
            print(f"{PROG}: {printable(note)}", file=sys.stderr, flush=True)
    if inv.each_kernel:
        return _check_each_kernel(inv, dbs)
    request = build_request(inv)
    tmp = _private_tmpdir()
    try:
        reply = _compile_anywhere(inv, *request, dbs, tmp)
        sys.stdout.buffer.write(local_paths(without_module_paths(reply.stdout), inv))
        sys.stdout.flush()
        sys.stderr.buffer.write(local_paths(reply.stderr, inv))
        sys.stderr.flush()
        if reply.mok_cert:
            deliver_module(reply.mok_cert)  # a file we write, written as a module is
            print(f"{PROG}: the server sent its machine owner key (MOK) certificate, saved as "
                  f"{MOK_CERT_NAME}: this kernel loads only modules signed with an enrolled key.  "
                  f"To enroll it, run 'mokutil --import {MOK_CERT_NAME}' as root (it asks for a "
                  "one-time password), reboot, confirm the key with that password in the "
                  "firmware's MOK manager, then run the script again: the server will sign its "
                  "module with that key.", file=sys.stderr)
        if reply.rc != 0:
            return 1
        if inv.listing:
            return 0  # a listing builds no module
        if inv.last_pass >= 4 and reply.module is None:
            raise Error("server reported success but sent no module")
        if inv.last_pass == 4 or (inv.module_name and reply.module):
            deliver_module(reply.module)
            if inv.last_pass == 4:
                print(os.path.basename(reply.module), flush=True)
        if inv.last_pass == 5:
            return _run_staprun(inv, reply.module)
        return 0
    finally:
        if inv.keep:
            print(f'Keeping temporary directory "{tmp}"', file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


_EACH_KERNEL_JOBS = 4  # requests in flight at once for --each-kernel
# A kernel release as uname prints it (at most 64 characters): it names directories and, for a
# fetching server, packages, so no path, no shell or apt syntax and no leading dash or dot.
RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")


def is_release_name(name):
    return RELEASE_NAME.fullmatch(name) is not None and ".." not in name


def kernel_releases(value):
    """--each-kernel's releases: REL[,REL...], or @FILE with one a line (# starts a comment)."""
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise Error(f"--each-kernel: cannot read {value[1:]}: {e.strerror}") from None
        names = [line.split("#")[0].strip() for line in text.splitlines()]
    else:
        names = [n.strip() for n in value.split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    bad = [n for n in names if not is_release_name(n)]
    if bad or not names:
        raise Error(f"--each-kernel: {printable(bad[0]) if bad else 'no release'} is not a "
                    "kernel release")
    return names


def _check_each_kernel(inv, dbs):
    """--each-kernel: the script compiled for every release at once (at most _EACH_KERNEL_JOBS
    requests in flight), one line each in the order given: "RELEASE ok", or "RELEASE error:" and
    the first error line of what went wrong.  0 only when every release passed.  With -p4 each
    module is kept as NAME-RELEASE.ko."""
    import concurrent.futures  # here: every other run of stap-client starts faster without it
    if inv.last_pass == 5 and "-p5" in inv.server_args:
        raise Error("--each-kernel checks a script for many kernels; pass 5 runs on this one")
    open_databases(dbs)  # once, before the threads share it
    tmp = _private_tmpdir()
    failed = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(_EACH_KERNEL_JOBS) as pool:
            verdicts = pool.map(lambda r: _check_kernel(inv, r, dbs, tmp), inv.each_kernel)
            for release, verdict in zip(inv.each_kernel, verdicts):
                print(f"{release} {printable(verdict)}", flush=True)
                failed += verdict != "ok"
    finally:
        if not inv.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def _check_kernel(inv, release, dbs, tmp):
    """One release of --each-kernel: "ok", or "error: " and the first error line."""
    one = _Invocation()
    one.__dict__.update(inv.__dict__, release=release, each_kernel=None)
    args = inv.server_args  # from "--" on, the script's own arguments: not options
    at = args.index("--") if "--" in args else len(args)
    one.server_args = [a for a in args[:at] if not a.startswith("-r")] + args[at:]
    try:
        mine = os.path.join(tmp, release)
        _make_private_dir(mine)
        reply = _compile_anywhere(one, *build_request(one), dbs, mine)
        if reply.rc != 0:
            return "error: " + _first_error_line(reply.stderr)
        if inv.last_pass == 4 and reply.module:
            name = os.path.basename(reply.module).removesuffix(".ko")
            deliver_module(reply.module, f"{name}-{release}.ko")
    except Error as e:
        return f"error: {e}"
    return "ok"


def _first_error_line(stderr):
    """stap's first error line, or the server's own reason (without its "stap-serverd: ERROR: ",
    which the verdict's "error:" already says)."""
    lines = stderr.decode(errors="replace").splitlines()
    line = next((l for l in lines if "error" in l.lower()), lines[-1] if lines else "failed")
    return line.removeprefix("stap-serverd: ERROR: ")


def _private_tmpdir():
    """A new directory of mode 0700 in $TMPDIR, as stap takes it (not another directory in its
    place), else in Python's temporary directory."""
    top = os.environ.get("TMPDIR") or tempfile.gettempdir()
    try:
        return tempfile.mkdtemp(prefix="stap-client.", dir=top)
    except OSError as e:
        raise Error(f"cannot make a temporary directory in {top} (TMPDIR): {e.strerror}") from None


def _compile_anywhere(inv, request, identity, dbs, tmp):
    """Try each candidate server in turn; the first complete reply wins.  A busy server is tried
    again after a growing, jittered pause until the deadline; one that is not there or dropped the
    request gets one more try, and one that cannot serve it (not trusted) none.  Each server that
    failed is named once, with what happened there."""
    open_databases(dbs)
    peers, searched = _candidate_servers(inv, identity, dbs)
    if not peers:
        raise Error(f"no compile server found for {local_sysinfo(inv.release, inv.arch)}: "
                    f"{searched}; start one with stap-start-server, or name one with "
                    "--server=HOST:PORT")
    news = _Progress(inv.verbose)
    started = time.monotonic()
    failures = [[] for _ in peers]  # what each server did, in order
    latest = None  # (server, its last failure)
    for attempt in range(1 << 30):
        for n, peer in enumerate(peers):
            if not worth_trying(failures[n]):
                continue
            reply = _try_server(
                inv, peer, request,
                os.path.join(tmp, f"server{n}" + (f".{attempt}" if attempt else "")), news)
            if isinstance(reply, Reply):
                for other, why in zip(peers, failures):
                    if why and other != peer:
                        _warn(f"{other}: {what_happened(why)}")
                return reply
            failures[n].append(reply)
            latest = peer, reply
        left = started + inv.deadline - time.monotonic()
        if not any(worth_trying(f) for f in failures) or left <= 0:
            raise Error("no server could compile the script (" + "; ".join(
                f"{peer}: {what_happened(why)}" for peer, why in zip(peers, failures) if why) + ")")
        pause = min(left, backoff(attempt))
        news.say(f"{latest[0]}: {latest[1]}; trying again in {pause:.1f} s "
                 f"({time.monotonic() - started:.0f} s so far, --deadline={inv.deadline:g})")
        news.sleep(pause)


def worth_trying(failures):
    """Whether a server that failed so is worth another try: a busy one is, until the deadline; one
    that is not there or dropped the request, once; one that cannot serve it (not trusted), not."""
    if not failures:
        return True
    return isinstance(failures[-1], Unavailable) and sum(isinstance(f, Lost) for f in failures) < 2


def what_happened(failures):
    """A server's failures in a few words: the first, and the last when it differs."""
    said = list(dict.fromkeys(str(f) for f in failures))
    return said[0] if len(said) == 1 else f"{said[0]}, then {said[-1]}"


def _try_server(inv, peer, request, attempt, news):
    """One exchange with peer: a Reply, or the Error that ended it (shown at once with -v)."""
    news.say(f"connecting to server {peer}...")
    asked = time.monotonic()
    next_news = [_PROGRESS_GAP]

    def waiting():
        waited = time.monotonic() - asked
        if waited >= next_news[0]:  # ever less often: 3, 6, 12, 24 s ...
            next_news[0] *= 2
            news.say(f"waiting for server {peer} ({waited:.0f} s): it compiles the script, or it "
                     "is queued there")
        news.tick()

    try:
        _make_private_dir(attempt)
        sock, peer_der = tls_connect(peer)
        news.say(f"compiling on server {peer}...")
        reply = read_reply(_exchange(sock, request, waiting), attempt, peer_der)
    except LocalFault as e:
        shutil.rmtree(attempt, ignore_errors=True)
        raise Error(f"cannot unpack the reply in {attempt}: {e.strerror} (the temporary "
                    f"directory, TMPDIR={os.path.dirname(os.path.dirname(attempt))})") from None
    except Error as e:
        reply = e
    else:
        if not reply.busy:
            return reply
        reply = Unavailable(last_line(reply.stderr))
    if inv.verbose:
        _warn(f"{peer}: {reply}" + (f" ({reply.detail})" if getattr(reply, "detail", "") else ""))
    shutil.rmtree(attempt, ignore_errors=True)
    return reply


def backoff(attempt):
    """0.25 s, doubling up to 8 s, each between half and one and a half of that."""
    jitter = 0.5 + int.from_bytes(os.urandom(2), "big") / 65535
    return min(8.0, 0.25 * 2 ** attempt) * jitter


_PROGRESS_GAP = 3.0  # seconds of quiet before the first line of progress, and between two


class _Progress:
    """Where the request stands, on stderr whether or not it is a terminal: with -v every step as
    it comes; else nothing for the first _PROGRESS_GAP seconds (a quick compile says nothing), then
    the latest step not yet shown, at most one line every _PROGRESS_GAP seconds."""

    def __init__(self, verbose):
        self.verbose, self.news, self.shown = verbose, None, time.monotonic()

    def say(self, message):
        if self.verbose:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)
        else:
            self.news = message
            self.tick()

    def tick(self):
        if self.news and time.monotonic() - self.shown >= _PROGRESS_GAP:
            print(f"{PROG}: {self.news}", file=sys.stderr, flush=True)
            self.news, self.shown = None, time.monotonic()

    def sleep(self, seconds):
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
            self.tick()


def _candidate_servers(inv, identity=b"", dbs=()):
    """(servers to try in order, what discovery saw): the --server options in order, else the
    compatible advertised servers that a database of dbs trusts, best first (see rank_servers;
    identity tells identical requests apart from others)."""
    target = local_sysinfo(inv.release, inv.arch)
    specs = [(None, None) if SERIAL_SPEC.match(spec) else parse_server_spec(spec)
             for spec in inv.servers]
    if specs and all(port is not None for _, port in specs):
        return [Peer(host, port) for host, port in specs], ""
    records, how = browse(_COMPILE_DISCOVERY_TIMEOUT, wide_area_domains(inv.domains))
    if specs:
        peers = []
        for spec, (host, port) in zip(inv.servers, specs):
            if port is not None:
                peers.append(Peer(host, port))
                continue
            if host is None:  # a certificate serial, as the real client takes it
                serial = int(spec.replace(":", ""), 16)
                chosen = [r for r in records if advertised_serial(r) == serial]
                if not chosen:
                    _warn(f"--server={spec}: no advertised server has that certificate serial")
            else:
                chosen = _advertised_on(records, host)
            if chosen or host is None:  # a serial names no host to try ports on
                peers += compatible_first(chosen, target, identity)
                continue
            # avahi may resolve a server to another of its addresses (an IPv6 link-local one for an
            # IPv4 name): try the host at each advertised port; a wrong one is refused at once.
            ports = dict.fromkeys(p.port for p in compatible_first(records, target, identity))
            if not ports:
                _warn(f"--server={host}: no server is advertised on host {host} ({how})")
            peers += [Peer(host, port) for port in ports]
        return peers, f"no server advertised on the named hosts ({how})"
    exact, fetching = serving(records, target)
    trusted = _trusted_only(exact + fetching, dbs, inv.verbose)
    signers = None
    if (exact or fetching) and any(a.startswith(("--privilege=stap", "--unprivileged"))
                                   for a in inv.server_args):  # staprun will want a signature
        signers = _signer_serials()  # the client databases were opened and checked already

    def ranked_within(group):  # the servers of one kind (exact release, or fetching ones)
        kept = rank_servers([r for r in group if r in trusted], identity, signers)
        return mok_holders_first(same_runtime_first(kept), inv.moks)

    ranked = ranked_within(exact) + ranked_within(fetching)
    return [Peer(r.address, r.port) for r in ranked], describe_search(records, how)


def version_tuple(text):
    """(major, minor) of a version such as 4.8 or 5.1.1; (0, 0) for one that is not numeric."""
    m = re.match(r"(\d+)(?:\.(\d+))?", text or "")
    return (int(m[1]), int(m[2] or 0)) if m else (0, 0)


def new_runtime(version):
    """Whether stap version is on 5.0's side of the runtime-staprun boundary (a client: needs a
    module built by such a stap)."""
    return version_tuple(version) >= _RUNTIME_BOUNDARY


def same_runtime_first(records, version=PROTOCOL_VERSION):
    """The servers that build modules our staprun runs (one of their advertised stap versions is on
    its side of 5.0: TXT versions=, else version=) first, the order kept otherwise."""
    def serves(rec):
        served = (rec.txt.get("versions") or rec.version).split(",")
        return any(new_runtime(v) == new_runtime(version) for v in served)
    return sorted(records, key=lambda r: not serves(r))


def mok_holders_first(records, moks):
    """The servers that advertise one of the enrolled MOKs first, the order kept otherwise: the
    others can only send a key to enroll (real clients do not try them at all)."""
    return sorted(records, key=lambda r: not set(moks) & set(r.txt.get("mok_info", "").split(",")))


def _trusted_only(records, dbs, verbose):
    """The advertised servers whose certificate serial a database of dbs trusts: anyone on the link
    can advertise servers, and each untrusted one would cost a handshake or a timeout.  None left of
    several: an Error that says how to trust one."""
    trusted = _serials_in(dbs)
    kept = [r for r in records if advertised_serial(r) in trusted]
    for rec in records:
        if rec not in kept and verbose:
            serial = advertised_serial(rec)
            _warn(f"skipping server {Peer(rec.address, rec.port)}: its certificate (serial "
                  f"{'unknown' if serial is None else serial_text(serial)}) is not trusted here")
    if records and not kept:
        first = Peer(records[0].address, records[0].port)
        raise Error(f"no trusted compile server for {records[0].sysinfo}: "
                    f"{_plural(len(records), 'server')} advertised, none trusted here; to trust "
                    f"one: stap-add-server-cert {first}")
    return kept


def _plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def serving(records, target):
    """(servers that have the release of target, "RELEASE ARCH"; servers that fetch kernels for
    its architecture, advertised with the bare architecture as the real client takes it), each
    server in the first list it fits."""
    exact = [r for r in records if r.sysinfo == target]
    have = {(r.address, r.port) for r in exact}
    fetching = [r for r in records if r.sysinfo == target.split()[-1]
                and (r.address, r.port) not in have]
    return exact, fetching


_WAIT_GRACE = 2.0  # seconds: servers this close to the freest count as equally free


def expected_wait(rec):
    """Seconds a new request would wait on rec, from its advertised load hint (slots, busy, queued,
    compile); 0 for a server without one."""
    try:
        slots, busy = int(rec.txt["slots"]), int(rec.txt["busy"])
        queued, compile_s = int(rec.txt["queued"]), float(rec.txt["compile"])
    except (KeyError, ValueError):
        return 0.0
    return 0.0 if busy < slots else (queued // max(1, slots) + 1) * compile_s


def rank_servers(records, identity, signers=None):
    """Best first: trusted signers first when staprun will want a signature; then the servers about
    as free as the freest, in rendezvous order for this request, so that identical requests meet the
    same server's result cache; then the busier ones by expected wait; newer versions first among
    equals."""
    waits = {id(r): expected_wait(r) for r in records}
    freest = min(waits.values(), default=0.0)

    def key(rec):
        wait = waits[id(rec)]
        version = [-int(p) for p in re.findall(r"\d+", rec.version)[:3]]
        score = hashlib.sha256(identity + f"{rec.certinfo}/{rec.host}/{rec.port}".encode())
        return (signers is not None and advertised_serial(rec) not in signers,
                wait if wait > freest + _WAIT_GRACE else 0.0, version,
                score.digest())
    return sorted(records, key=key)


def _advertised_on(records, host):
    """The records of servers on host: its full or short name, or an address it is seen at."""
    return [r for r in records if host in (r.host, r.host.split(".")[0], r.address)]


def _trusted_serials():
    """{"ssl": serials trusted for TLS here, "signer": serials whose module signatures staprun
    accepts here}, from the databases as they are."""
    dbs = []
    with contextlib.suppress(Error):  # none usable: no server is trusted for TLS
        dbs = client_databases()
    return {"ssl": _serials_in(dbs), "signer": _signer_serials()}


def _signer_serials():
    """The serials whose module signatures staprun accepts here."""
    db = CertDB(_staprun_db_path())
    return _serials_in([db] if db.exists() else [])


def _serials_in(dbs):
    return {certificate_serial(der) for db in dbs for der in db.certificates()}


def advertised_serial(rec):
    try:
        serial = int(rec.certinfo.replace(":", ""), 16)
    except ValueError:
        return None
    return serial if serial >= 0 else None


def trust_of(rec, trust):
    """"ssl,signer", "ssl", "signer" or "none" for an advertised server."""
    serial = advertised_serial(rec)
    kinds = [k for k in ("ssl", "signer") if serial is not None and serial in trust[k]]
    return ",".join(kinds) or "none"


SERIAL_SPEC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+$")  # --server=70:60:53:1a


def describe_search(records, how):
    """Why discovery offered no server: what it saw, and how it looked."""
    if not records:
        return f"no server is advertised on the local network (searched with {how})"
    others = ", ".join(sorted({f"{r.host} serves {r.sysinfo}" for r in records}))
    return f"no advertised server serves it ({others}; searched with {how})"


def compatible_first(records, target, identity=b""):
    """Peers for these servers: those for the target kernel first, then those that fetch kernels,
    then the others, each ranked."""
    exact, fetching = serving(records, target)
    chosen = {(r.address, r.port) for r in exact + fetching}
    ranked = rank_servers(exact, identity) + rank_servers(fetching, identity) +\
        rank_servers([r for r in records if (r.address, r.port) not in chosen], identity)
    return [Peer(r.address, r.port) for r in ranked]


def local_paths(data, inv):
    """Name the user's own files as stap would here: the server saw them as script/PATH and
    tapset/PATH (and stdin as script/-), whether they were sent or are missing."""
    names = {name for name, _ in inv.files} | {
        a[2:] if a.startswith("-I") else a for a in inv.server_args
        if a.startswith(("script/", "-Itapset/"))}
    for name in sorted(names, key=len, reverse=True):
        if name == "script/-":
            data = data.replace(b"script/-", b"<input>")
        elif inv.script and name == inv.script[0]:
            data = data.replace(name.encode(), inv.script[1].encode())
        else:
            data = data.replace(name.encode(), b"/" + name.split("/", 1)[1].encode())
    return data


def without_module_paths(stdout):
    """A server names the module it built (a path on its side); like the real client, drop those
    lines and name the delivered module ourselves."""
    return b"".join(l for l in stdout.splitlines(keepends=True)
                    if not l.rstrip(b"\n").endswith(b".ko"))


def deliver_module(module, name=None):
    """Put the module (and its signature) in the current directory, as stap does, under its own
    name or name: both are written in full under temporary names first, so that a failure leaves
    neither (nor a new module beside an old signature)."""
    name = name or os.path.basename(module)
    written = []
    try:
        for path, target in ((module, name), (module + ".sgn", name + ".sgn")):
            if os.path.exists(path):
                with open(path, "rb") as source:
                    written.append((_write_temporary(target, source), os.path.abspath(target)))
        for temp, target in written:
            try:
                os.rename(temp, target)  # a link at target is replaced, not followed
            except OSError as e:
                raise Error(f"cannot write {target}: {e.strerror}") from None
    finally:
        for temp, _ in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def _write_temporary(path, source, mode=0o666):
    """Copy the file object source to a new file beside path (O_EXCL|O_NOFOLLOW: never through a
    link or into a file already there) and sync it; returns its name, for the caller to rename into
    place.  mode is before the umask, as for the files stap writes.  A failure is an Error naming
    path, and removes the partial file."""
    target = os.path.abspath(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        while True:  # a name nobody has: another run may be writing beside us
            temp = os.path.join(os.path.dirname(target),
                                f".{os.path.basename(target)}.{os.urandom(4).hex()}")
            with contextlib.suppress(FileExistsError):
                fd = os.open(temp, flags, mode)
                break
    except OSError as e:
        raise Error(f"cannot write {target}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())  # whole on the disk before it has the name
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise Error(f"cannot write {target}: {e.strerror}") from None
    return temp


def _run_staprun(inv, module):
    """Pass 5: staprun on the received module; its failure is ours."""
    import subprocess  # here, as in run_tool
    argv = staprun_argv(inv, module)
    # Forwarding starts before staprun does: a signal may come as soon as it runs.
    child, early = [], []
    forward = lambda signum, frame: child[0].send_signal(signum) if child else early.append(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            child.append(subprocess.Popen(argv))
        except OSError as e:
            raise Error(f"cannot run {argv[0]}: {e.strerror}") from None
        for signum in early:
            child[0].send_signal(signum)
        rc = child[0].wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if rc != 0:
        print(f"{PROG}: ERROR: {os.path.basename(argv[0])} exited with status {rc}",
              file=sys.stderr)
        return 1
    return 0


_FIND_USAGE = "usage: stap-find-servers [--all] [--domain=DOMAIN]..."


def stap_find_servers(argv):
    """List servers; only compatible ones unless --all.  An unknown option is refused (a typo of
    --all would list nothing); other words are ignored.  Each line says how this host trusts the
    server."""
    unknown = [a for a in argv if a.startswith("-") and a != "--all"
               and not a.startswith("--domain=")]
    if unknown:
        raise Error(f"unknown option {unknown[0]}; {_FIND_USAGE}")
    extra = [a.split("=", 1)[1] for a in argv if a.startswith("--domain=")]
    every, how = browse(_DISCOVERY_TIMEOUT, wide_area_domains(extra))
    wanted = local_sysinfo()
    records = [r for r in every if "--all" in argv or r.sysinfo in (wanted, wanted.split()[-1])]
    trust = _trusted_serials() if records else {}
    for rec in records:
        # The bare architecture as its sysinfo: a server that fetches kernels (--fetch-kernels).
        fetched = " 'kernels=fetched'" if " " not in rec.sysinfo else ""
        print(printable(format_server_line(rec) + fetched + f" 'trust={trust_of(rec, trust)}'"))
    if every and not records:  # servers for other kernels: say so, whoever asked
        seen = _plural(len({(r.host, r.port) for r in every}), "server")
        print(f"{PROG}: {seen} found, none for {wanted}; --all lists them", file=sys.stderr)
    elif not records and sys.stderr.isatty():  # a person asked: say how we looked
        print(f"{PROG}: {printable(describe_search(every, how))}", file=sys.stderr)
    return 0 if records else 1


_ADD_CERT_USAGE = ("usage: stap-add-server-cert CERTFILE DIRNAME | [--yes] [--signer] "
                   "CERTFILE|HOST[:PORT] [DIRNAME] | --revoke SERIAL|FINGERPRINT DIRNAME")


def stap_add_server_cert(argv):
    """Trust a server's certificate (from a file, or fetched from the server
    after a person saw its fingerprint) in a client database, or with
    --signer in staprun's; or --revoke one."""
    flags = {a for a in argv if a in ("--yes", "--signer", "--revoke")}
    args = [a for a in argv if a not in flags]
    if any(a.startswith("-") for a in args) or not 1 <= len(args) <= 2:
        raise Error(_ADD_CERT_USAGE)
    if "--revoke" in flags:
        if len(args) != 2 or flags != {"--revoke"}:
            raise Error(_ADD_CERT_USAGE)
        return _revoke_certificate(args[0], CertDB(args[1]))
    source, dirname = args[0], (args[1:] or [None])[0]
    if "--signer" in flags:
        if not is_root():
            raise Error("--signer: only root decides whose module signatures staprun accepts")
        dirname = dirname or _staprun_db_path()
    if "/" in source or source.endswith((".cert", ".crt", ".pem", ".der"))\
            or os.path.exists(source):  # else HOST[:PORT]
        if dirname is None:
            raise Error(_ADD_CERT_USAGE)
        if not os.path.isfile(source):
            raise Error(f"certificate file {source} does not exist")
        der = read_certificate_file(source)
    else:
        dirname = dirname or local_client_db_path()
        der = _fetch_certificate(source)
        if "--yes" not in flags and not _confirmed(der, source, dirname):
            raise Error(f"not trusted: nothing was added to {os.path.abspath(dirname)}")
    add_certificate(der, dirname)
    print(f"trusted {_certificate_text(der)}"
          + (" as a module signer" if "--signer" in flags else "")
          + f" in {os.path.abspath(dirname)}")
    return 0


def _certificate_text(der):
    """A certificate as messages name it: its serial and its fingerprint."""
    return f"the certificate with serial {serial_text(certificate_serial(der))}, SHA-256 "\
        f"fingerprint {fingerprint(der)},"


def add_certificate(der, dirname):
    db = CertDB(dirname)
    if not db.exists():
        db.create(world_readable=db.path in (os.path.abspath(global_client_db_path()),
                                             os.path.abspath(_staprun_db_path())))
    db.add_trusted_server(der)


def _fetch_certificate(spec):
    """The certificate a server presents, fetched over TLS without trusting it (nothing but the
    certificate-only frame is sent)."""
    host, port = parse_server_spec(spec)
    if port is None:
        found = _advertised_on(browse()[0], host)
        if not found:
            raise Error(f"{spec}: no port given, and no server is advertised on that host")
        host, port = found[0].address, found[0].port
    nss = nss_modules()[0]
    if not nss.nss_is_initialized():
        nss.nss_init_nodb()
    restrict_cipher_suites()
    sock, der = tls_connect(Peer(host, port), fetch_only=True)
    with contextlib.closing(sock):
        sock.send(b"\0\0\0\0")  # size 0: "I only wanted the certificate"
    return der


def _confirmed(der, source, dirname):
    """Show the certificate and ask a person whether to trust it."""
    nss = nss_modules()[0]
    cert = nss.Certificate(der)
    print(f"Server {printable(source)} presents this certificate:\n"
          f"  subject:     {printable(str(cert.subject))}\n"
          f"  serial:      {serial_text(certificate_serial(der))}\n"
          f"  valid:       {printable(cert.valid_not_before_str)} to "
          f"{printable(cert.valid_not_after_str)}\n"
          f"  SHA-256:     {fingerprint(der)}", flush=True)
    print(f"Trust it in {os.path.abspath(dirname)}? [y/N] ", end="", flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _revoke_certificate(which, db):
    """Remove the certificates whose serial or SHA-256 fingerprint is which from db; the others
    stay trusted.  Hex in any case, colons and a leading 00 or 0x optional: the forms messages
    showed before one was chosen still work."""
    if not db.exists():
        raise Error(f"{db.path} is not a certificate database")
    key = which.lower().replace(":", "").removeprefix("0x").lstrip("0")
    ders = db.certificates()
    gone = [d for d in ders if key in (hashlib.sha256(d).hexdigest().lstrip("0"),
                                       format(certificate_serial(d), "x"))]
    if not gone:
        raise Error(f"no certificate with serial or fingerprint {which} in {db.path}")
    db.remove_servers()
    for der in ders:
        if der not in gone:
            db.add_trusted_server(der)
    for der in gone:
        print(f"revoked {_certificate_text(der)} in {db.path}")
    return 0


COMMANDS = {
    "stap-client": stap_client,
    "stap-find-servers": stap_find_servers,
    "stap-add-server-cert": stap_add_server_cert,
}


def dispatch(commands, argv):
    """Run the command named by argv[0], or by argv[1] when argv[0] is this file."""
    global PROG
    name = os.path.basename(argv[0])
    args = argv[1:]
    if name not in commands and args and args[0] in commands:
        name, args = args[0], args[1:]
    if name not in commands:
        asked = args[:1] in (["-h"], ["--help"])
        print(f"usage: {os.path.basename(argv[0])} COMMAND [ARGS]; COMMAND is one of: "
              + ", ".join(sorted(commands)) + "; COMMAND --help tells more",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 1
    PROG = name
    try:
        return commands[name](args)
    except (_StapSays, UsageError) as e:  # stap-client stands for stap --use-server
        print(e.stap_says() if isinstance(e, UsageError) else e, file=sys.stderr)
        return 1
    except Error as e:
        print(f"{name}: ERROR: {printable(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main():
    sys.exit(dispatch(COMMANDS, sys.argv))


def public_names(namespace):
    """A module's surface, which other code (the server, tests, tools) may use: every name it
    defines without a leading underscore (its helpers have one), not what it imports."""
    def imported(name, value, home):
        return home != namespace["__name__"] and getattr(sys.modules.get(home), name, 0) is value
    return [n for n, v in namespace.items() if n[0] != "_" and not isinstance(v, types.ModuleType)
            and not imported(n, v, getattr(v, "__module__", None))]


__all__ = public_names(globals())


if __name__ == "__main__":
    main()
