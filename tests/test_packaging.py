"""Distribution: the Debian packages (build, lintian, contents, dependencies,
the systemd unit, an install into a debootstrap chroot of this machine's
release) and `pip install .` into a venv.

The chroot (debootstrap --variant=minbase plus the packages' dependencies)
is cached as a tarball under /var/cache/stap-compile-server-tests
($STAP_TEST_CHROOT_CACHE), keyed by release, architecture and dependency
list; the first run takes about a minute more.  $STAP_TEST_MIRROR picks the
Debian mirror (default http://deb.debian.org/debian)."""

import configparser
import glob
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

CLIENT_PKG = "stap-compile-client"
SERVER_PKG = "stap-compile-server"
CLIENT_COMMANDS = ["stap-client", "stap-find-servers", "stap-add-server-cert"]
SERVER_COMMANDS = ["stap-serverd", "stap-start-server", "stap-stop-server",
                   "stap-find-or-start-server"]
# debhelper puts units in /lib/systemd/system on Debian 12, /usr/lib/... on 13.
UNITS = ["lib/systemd/system/stap-compile-server.service",
         "usr/lib/systemd/system/stap-compile-server.service"]
CACHE = os.environ.get("STAP_TEST_CHROOT_CACHE", "/var/cache/stap-compile-server-tests")
MIRROR = os.environ.get("STAP_TEST_MIRROR", "http://deb.debian.org/debian")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "STAP_SYSCONFDIR", "SYSTEMTAP_DIR",
                        "VIRTUAL_ENV")}
    env.update(LANG="C.UTF-8", **extra)
    return env


# --------------------------------------------------------------------------
# Building the packages
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def debs():
    """{package: path of its .deb}, built by tools/build-deb into a temp dir."""
    if not shutil.which("dpkg-deb"):
        pytest.skip("not a Debian system (no dpkg-deb)")
    out = tempfile.mkdtemp(prefix="stap-debs.")
    proc = subprocess.run([os.path.join(ROOT, "tools", "build-deb")],
                          env=clean_env(BUILD_DEB_DIR=out, LINTIAN="no"),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 2:
        shutil.rmtree(out, ignore_errors=True)
        pytest.skip("Debian build tools missing and not installable: "
                    + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = {}
    for line in proc.stdout.splitlines():
        path, size = line.split()
        built[os.path.basename(path).split("_")[0]] = path
        assert int(size) > 0
    assert set(built) == {CLIENT_PKG, SERVER_PKG}, proc.stdout
    yield built
    shutil.rmtree(out, ignore_errors=True)


def control_field(deb, field):
    return subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True,
                          check=True).stdout.strip()


def contents(deb):
    """{path: mode string or '-> target'} of a .deb, paths without './'."""
    out = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True,
                         check=True).stdout
    entries = {}
    for line in out.splitlines():
        parts = line.split(None, 5)
        name = parts[5]
        if " -> " in name:
            name, target = name.split(" -> ")
            entries[name[2:]] = "-> " + target
        else:
            entries[name[2:].rstrip("/")] = parts[0]
    entries.pop("", None)
    return entries


def dependency_alternatives(field):
    """The alternatives of each dependency in a Depends field, as package names."""
    return [[re.sub(r"\s*\(.*\)", "", alt).split(":")[0].strip() for alt in dep.split("|")]
            for dep in filter(None, (d.strip() for d in field.split(",")))]


def dependency_names(field):
    """Package names in a Depends field, first alternative of each."""
    return [alternatives[0] for alternatives in dependency_alternatives(field)]


def release_has(package):
    """Whether this machine's Debian release (the chroot's) packages it."""
    return subprocess.run(["apt-cache", "show", package], capture_output=True).returncode == 0


def test_lintian_no_errors(debs):
    if not shutil.which("lintian"):
        pytest.skip("lintian is not installed (tools/install-deps installs it)")
    proc = subprocess.run(["lintian", "--allow-root", "--no-tag-display-limit",
                           *debs.values()], capture_output=True, text=True, timeout=300)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EW]: ", line)]
    errors = [t for t in tags if t.startswith("E: ")]
    warnings = [t for t in tags if t.startswith("W: ")]
    print("lintian warnings:", *(warnings or ["none"]), sep="\n  ")
    assert not errors, "\n".join(errors)
    assert proc.returncode == 0, proc.stderr  # no error it failed on, none in running it


def test_client_depends_on_no_compiler(debs):
    depends = control_field(debs[CLIENT_PKG], "Depends")
    names = dependency_names(depends)
    for bad in ("systemtap", "gcc", "make", "cpp", "linux-headers", SERVER_PKG):
        assert not any(n.startswith(bad) for n in names), depends
    for good in ("python3", "libnss3-tools"):
        assert good in names, depends
    # The same on every build machine: the NSS bindings packaged (Debian 12), or
    # pip to build python-nss-ng (Debian 13).
    assert ["python3-nss", "python3-pip"] in dependency_alternatives(depends), depends
    recommends = dependency_names(control_field(debs[CLIENT_PKG], "Recommends"))
    assert "systemtap-runtime" in recommends  # staprun, for pass 5

    server = control_field(debs[SERVER_PKG], "Depends")
    names = dependency_names(server)
    for good in (CLIENT_PKG, "systemtap", "gcc", "adduser", "libnss3-tools"):
        assert good in names, server
    assert re.search(rf"{CLIENT_PKG} \(= [^)]+\)", server), server


def test_package_contents(debs):
    client, server = contents(debs[CLIENT_PKG]), contents(debs[SERVER_PKG])

    def files(c):
        return {p for p, m in c.items() if not m.startswith("d")}

    assert not files(client) & files(server), files(client) & files(server)
    # The client package ships the shared module the server imports.
    assert client["usr/lib/stap-server/stap_client.py"] == "-rwxr-xr-x"
    assert server["usr/lib/stap-server/stap_server.py"] == "-rwxr-xr-x"
    assert "usr/lib/stap-server/stap_server.py" not in client
    # One launcher, in the client package; every command a link to it.
    assert client["usr/lib/stap-server/launcher"] == "-rwxr-xr-x"
    for c in CLIENT_COMMANDS:
        assert client[f"usr/bin/{c}"] == "-> ../lib/stap-server/launcher"
        assert f"usr/share/man/man8/{c}.8.gz" in client
    for c in SERVER_COMMANDS:
        assert server[f"usr/bin/{c}"] == "-> ../lib/stap-server/launcher"
        assert f"usr/share/man/man8/{c}.8.gz" in server
    # Debian's systemtap-server owns stap-server.8.gz: ours has another name.
    assert "usr/share/man/man8/stap-compile-server.8.gz" in client
    assert not any(p.endswith("man8/stap-server.8.gz") for p in {**client, **server})
    assert any(u in server for u in UNITS), UNITS
    for path in ("etc/logrotate.d/stap-compile-server", "etc/default/stap-compile-server"):
        assert path in server, path
    assert not any("__pycache__" in p for p in {**client, **server})


@pytest.fixture(scope="session")
def extracted(debs):
    """Both packages unpacked with dpkg-deb -x into one temporary root."""
    top = tempfile.mkdtemp(prefix="stap-debroot.")
    for deb in debs.values():
        subprocess.run(["dpkg-deb", "-x", deb, top], check=True)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def run_from(top, command, *args):
    return subprocess.run([os.path.join(top, "usr/bin", command), *args], cwd="/",
                          env=clean_env(HOME=top, SYSTEMTAP_DIR=os.path.join(top, ".st")),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command,args,rc,expect", [
    ("stap-client", ["--help"], 0, "usage: stap-client"),
    ("stap-start-server", ["--help"], 0, "usage: stap-start-server"),
    ("stap-serverd", ["--help"], 0, "usage: stap-serverd"),
    ("stap-find-or-start-server", ["--help"], 0, "usage: stap-find-or-start-server"),
    ("stap-stop-server", [], 1, "usage: stap-stop-server PID"),
    ("stap-add-server-cert", [], 1, "usage: stap-add-server-cert"),
])
def test_commands_from_extracted_debs(extracted, command, args, rc, expect):
    proc = run_from(extracted, command, *args)
    assert proc.returncode == rc, proc.stderr
    assert expect in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_client_package_alone(debs, tmp_path):
    """The client package works without the server package."""
    subprocess.run(["dpkg-deb", "-x", debs[CLIENT_PKG], str(tmp_path)], check=True)
    assert not os.path.exists(tmp_path / "usr/lib/stap-server/stap_server.py")
    proc = run_from(str(tmp_path), "stap-client", "--help")
    assert proc.returncode == 0, proc.stderr
    proc = run_from(str(tmp_path), "stap-add-server-cert")
    assert proc.returncode == 1 and "usage: stap-add-server-cert" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    with open(tmp_path / "usr/lib/stap-server/stap_client.py") as f:
        assert 'SYSCONFDIR = "/etc"  # make install rewrites this line\n' in f.read()


def unit_path(top):
    found = [os.path.join(top, u) for u in UNITS if os.path.exists(os.path.join(top, u))]
    assert found, f"no stap-compile-server.service under {top}"
    return found[0]


def read_unit_section(top, section):
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str
    with open(unit_path(top)) as f:
        unit.read_string(f.read())
    return unit[section]


def read_unit(top):
    with open(unit_path(top)) as f:
        # Repeated keys (Environment=) are merged by configparser: keep them all.
        text = f.read()
    environment = dict(v.split("=", 1) for v in
                       re.findall(r"^Environment=(\S+)$", text, re.MULTILINE))
    return read_unit_section(top, "Service"), environment


# What stap-serverd needs to compile as stap-compile without being root (stap_server.py's
# SWITCH_CAPABILITIES), in setpriv's words.
UNIT_CAPABILITIES = "+chown,+dac_override,+kill,+setgid,+setuid"


def unit_capabilities(service):
    """The unit's AmbientCapabilities=, as setpriv's list (+name,...)."""
    return ",".join(sorted("+" + c.lower().removeprefix("cap_")
                           for c in service["AmbientCapabilities"].split()))


def test_systemd_unit(extracted, tmp_path):
    service, environment = read_unit(extracted)
    assert service["User"] == "stap-server"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the server alone, not to stap
    assert service["StateDirectory"] == "stap-server"
    assert service["LogsDirectory"] == "stap-server"
    assert service["LogsDirectoryMode"] == "0750"
    # Compiles run as stap-compile, never as stap-server (which owns the key): the
    # capabilities to switch to it, and no others.
    assert unit_capabilities(service) == UNIT_CAPABILITIES
    assert set(service["CapabilityBoundingSet"].split()) == set(
        service["AmbientCapabilities"].split())
    # A server that fails at start is not restarted every 5 s forever.
    unit = read_unit_section(extracted, "Unit")
    assert int(unit["StartLimitBurst"]) <= 10 and int(unit["StartLimitIntervalSec"]) >= 60
    assert environment["SYSTEMTAP_DIR"] == "/var/lib/stap-server/.systemtap"
    execstart = shlex.split(service["ExecStart"])
    assert execstart[0] == "/usr/bin/stap-serverd"
    assert "--log=/var/log/stap-server/stap-server.log" in execstart
    with open(os.path.join(extracted, "etc/logrotate.d/stap-compile-server")) as f:
        logrotate = f.read()
    assert "/var/log/stap-server/" in logrotate and "copytruncate" in logrotate
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (tools/install-deps installs systemd); "
                    "the unit's settings were checked, its syntax was not")
    # Syntax check with systemd itself; the command path made to exist here.
    with open(unit_path(extracted)) as f:
        text = f.read()
    text = re.sub(r"^Documentation=.*\n", "", text, flags=re.MULTILINE)
    text = text.replace("ExecStart=/usr/bin/stap-serverd",
                        f"ExecStart={extracted}/usr/bin/stap-serverd")
    copy = tmp_path / "stap-compile-server.service"
    copy.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in proc.stderr.splitlines() if copy.name in line]
    assert not problems, proc.stderr


# --------------------------------------------------------------------------
# Installing into a debootstrap chroot of this machine's release
# --------------------------------------------------------------------------

def os_release():
    fields = {}
    with open("/etc/os-release") as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                fields[k] = v.strip('"')
    return fields


def mounts_under(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == path or p.startswith(path + "/")]


def remove_tree(path):
    """rmtree, but never through a mount point (a bound /dev, /usr/src ...)."""
    if mounts_under(path):
        raise RuntimeError(f"refusing to remove {path}: mounts under it: {mounts_under(path)}")
    shutil.rmtree(path, ignore_errors=True)


# Runs in private mount, network and pid namespaces: every mount and process
# it makes disappears when it ends.
CHROOT_SETUP = r"""
set -eu
R=$1; shift
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount --make-rslave "$R/dev"
cp /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
enter_root() {
    # pivot_root, not chroot: a chrooted process may not create the user
    # namespaces that the server's bubblewrap sandbox needs.
    mount --rbind "$1" "$1"
    cd "$1"
    mkdir -p .oldroot
    pivot_root . .oldroot
    umount -l /.oldroot
    rmdir /.oldroot
    cd /
    shift
    exec "$@"
}
"$@"
"""

CHROOT_DEPS = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
apt-get install -y -q --no-install-recommends "$@" ||
    { apt-get update -q && apt-get install -y -q --no-install-recommends "$@"; }
apt-get clean
"""


def chroot_packages(debs):
    """What the cached chroot must hold so that dpkg -i of our packages needs
    no network: their dependencies (the first alternative the release has),
    and logrotate to try the rotation."""
    names = set()
    for deb in debs.values():
        for alternatives in dependency_alternatives(control_field(deb, "Depends")):
            names.add(next((a for a in alternatives if release_has(a)), alternatives[0]))
    return sorted((names - {CLIENT_PKG, SERVER_PKG}) | {"logrotate"})


def in_namespaces(root, argv, timeout, net=False):
    ns = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
          "--kill-child"] + (["--net"] if net else [])
    return subprocess.run(ns + ["sh", "-c", CHROOT_SETUP, "setup", root] + argv,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def chroot_tarball(debs):
    if os.geteuid() != 0:
        pytest.skip("the chroot install needs root")
    for tool in ("debootstrap", "unshare", "chroot"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (tools/install-deps installs debootstrap)")
    rel = os_release()
    codename = rel.get("VERSION_CODENAME")
    if rel.get("ID") != "debian" or not codename:
        pytest.skip("not a Debian release with a codename")
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    packages = chroot_packages(debs)
    key = hashlib.sha256(" ".join([codename, arch, MIRROR] + packages).encode()).hexdigest()
    tarball = os.path.join(CACHE, f"chroot-{codename}-{arch}-{key[:12]}.tar")
    if os.path.exists(tarball):
        return tarball
    os.makedirs(CACHE, 0o755, exist_ok=True)
    work = tempfile.mkdtemp(prefix="build.", dir=CACHE)
    root = os.path.join(work, "root")
    try:
        proc = subprocess.run(["debootstrap", "--variant=minbase", codename, root, MIRROR],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"debootstrap {codename} {MIRROR} failed: "
                        + (proc.stdout + proc.stderr).strip().splitlines()[-1])
        proc = in_namespaces(root, ["chroot", root, "sh", "-c", CHROOT_DEPS, "deps",
                                    *packages], timeout=900)
        if proc.returncode != 0:
            pytest.skip("cannot install the dependencies in the chroot: "
                        + (proc.stdout + proc.stderr).strip().splitlines()[-1])
        subprocess.run(["tar", "-C", root, "-cf", tarball + ".tmp", "."], check=True)
        os.replace(tarball + ".tmp", tarball)
        for old in glob.glob(os.path.join(CACHE, f"chroot-{codename}-{arch}-*.tar")):
            if old != tarball:
                os.unlink(old)
    finally:
        remove_tree(work)
    return tarball


# The test proper, inside the chroot.  Prints RESULT key=value lines.
INSIDE = r"""
set -eux
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
unset PYTHONPATH || true
result() { echo "RESULT $1=$2"; }
trap 'tail -20 /var/log/stap-server/stap-server.log 2>/dev/null || true' EXIT

dpkg -i /tmp/debs/stap-compile-client_*.deb
stap-client --help > /dev/null && result client_alone ok
dpkg -i /tmp/debs/stap-compile-server_*.deb
result account "$(getent passwd stap-server | cut -d: -f3,6,7)"
result compile_account "$(getent passwd stap-compile | cut -d: -f3,7)"
[ -e /var/lib/stap-server/.systemtap ] && result state_at_install yes || result state_at_install no
result dirs "$(stat -c %U:%G:%a /var/lib/stap-server /var/log/stap-server | paste -sd,)"
stap-client --help > /dev/null && result stap_client_help 0
stap-start-server --help > /dev/null && result stap_start_server_help 0
rc=0; stap-stop-server 2> /tmp/stop.err || rc=$?
result stap_stop_server_usage "$rc $(head -1 /tmp/stop.err | tr ' ' _)"

if [ -n "$KREL" ]; then
    # What systemd does for the unit (its directories are the postinst's): the
    # EnvironmentFile=, User=/Group=, AmbientCapabilities= and
    # CapabilityBoundingSet=, Environment=, then ExecStart=.  A stap stand-in
    # (stap_unit_whoami.sh, put there by the test) reports what a compile runs
    # as and can read, and runs the real stap.
    echo "STAP_SERVER_OPTIONS=\"-r $KREL --listen 127.0.0.1 --advertise none\"" \
        >> /etc/default/stap-compile-server
    set -a; . /etc/default/stap-compile-server; set +a
    caps=-all,$UNIT_CAPS
    env -i $UNIT_ENV STAP_SERVER_OPTIONS="$STAP_SERVER_OPTIONS" \
        SYSTEMTAP_STAP=/usr/local/bin/stap-whoami \
        setpriv --reuid=stap-server --regid=stap-server --init-groups --inh-caps=$caps \
        --ambient-caps=$caps --bounding-set=$caps sh -c "umask 022; exec $UNIT_EXEC" &
    pid=$!
    status=/var/lib/stap-server/.systemtap/run/stap-serverd.$pid.json
    for i in $(seq 600); do [ -e "$status" ] && break; kill -0 $pid; sleep 0.1; done
    result status_file "$([ -e "$status" ] && echo yes || echo no)"
    result server_uid "$(stat -c %U /proc/$pid)"
    cert=/var/lib/stap-server/.systemtap/ssl/server/stap-server.cert
    result cert_owner "$(stat -c %U "$cert")"
    port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$status")

    # logrotate with copytruncate while the server runs.
    logrotate -f -s /tmp/logrotate.state /etc/logrotate.d/stap-compile-server
    result rotated "$(ls /var/log/stap-server | tr '\n' ,)"

    # root trusts the server for every user as README.Debian says, then compiles.
    stap-add-server-cert "$cert" /etc/systemtap/ssl/client
    rc=0
    stap-client --server=127.0.0.1:$port -r "$KREL" -p2 -e 'probe begin { exit() }' \
        > /tmp/p2.out 2> /tmp/p2.err || rc=$?
    cat /tmp/p2.err
    result compile_rc $rc
    stap-client --server=127.0.0.1:$port -r "$KREL" -p2 -e 'probe begin { /* WHOAMI */ }' |
        sed -n 's/^\(compile_[a-z]*\)=/RESULT \1=/p'
    key=/var/lib/stap-server/.systemtap/ssl/server/key4.db
    setpriv --reuid=stap-compile --regid=stap-compile --clear-groups cat $key > /dev/null &&
        result compile_account_key read || result compile_account_key unreadable
    result log_after_rotation "$(grep -c 'request' /var/log/stap-server/stap-server.log || true)"

    kill -TERM $pid
    rc=0; wait $pid || rc=$?
    result stop_rc $rc
    result status_after_stop "$([ -e "$status" ] && echo present || echo removed)"
    result log_stopped "$(grep -c 'stopped' /var/log/stap-server/stap-server.log || true)"

    # A server started without systemd (by root) is stopped when the package goes.
    rootpid=$(stap-start-server -r "$KREL" --listen 127.0.0.1 --advertise none \
              --log /tmp/root-server.log)
    dpkg --remove stap-compile-server
    result root_server_status "$(ls /run/stap-server | tr '\n' ,)"
    result root_server_log "$(tail -1 /tmp/root-server.log | sed 's/.*\] //' | tr ' ' _)"
    result root_server_state "$(awk '{print $3}' /proc/$rootpid/stat 2>/dev/null || echo gone)"
fi

dpkg --purge stap-compile-server > /tmp/purge.out
cat /tmp/purge.out
result purge_says_revoke "$(grep -c 'stap-add-server-cert --revoke' /tmp/purge.out || true)"
result purge_revoked "$(grep -c '^revoked ' /tmp/purge.out || true)"
dpkg --purge stap-compile-client
result purged_state "$([ -e /var/lib/stap-server ] && echo present || echo removed)"
left=removed
[ -e /usr/lib/stap-server ] && left=$(ls -A /usr/lib/stap-server | tr '\n' ,)
result purged_lib "$left"
n=0
for c in stap-client stap-find-servers stap-add-server-cert stap-serverd stap-start-server \
         stap-stop-server stap-find-or-start-server; do [ -e /usr/bin/$c ] && n=$((n + 1)); done
result purged_bin $n
"""


def test_install_in_debootstrap_chroot(debs, chroot_tarball, extracted):
    """dpkg -i into a clean chroot of this release (no network needed: the
    cached chroot has the dependencies), the account made by postinst, no
    certificate at install time, the unit's command line run as systemd
    would (first start makes the certificate, a root client compiles -p2
    through it after trusting it, logrotate copytruncate, SIGTERM stops it
    cleanly), and purge leaves nothing behind."""
    sys.path.insert(0, TESTS)
    from shared import headers_release
    krel = headers_release()
    why_no_server = None if krel else "no kernel headers to serve"
    if not release_has("python3-nss"):
        # Debian 13: the NSS bindings are not packaged (python-nss-ng from PyPI).
        krel, why_no_server = None, "this release packages no python3-nss"
    service, environment = read_unit(extracted)
    work = tempfile.mkdtemp(prefix="stap-chroot.")
    root = os.path.join(work, "root")
    try:
        os.makedirs(root)
        subprocess.run(["tar", "-C", root, "-xf", chroot_tarball], check=True)
        os.makedirs(os.path.join(root, "tmp/debs"), exist_ok=True)
        for deb in debs.values():
            shutil.copy(deb, os.path.join(root, "tmp/debs"))
        os.makedirs(os.path.join(root, "usr/local/bin"), exist_ok=True)
        shutil.copy(os.path.join(TESTS, "programs", "stap_unit_whoami.sh"),
                    os.path.join(root, "usr/local/bin/stap-whoami"))
        binds = []
        if krel:  # the server serves an installed headers release of the host
            for d in ("/usr/lib/modules", "/usr/src"):
                os.makedirs(root + d, exist_ok=True)
                binds += [f"mount --bind {d} {root}{d} && mount -o remount,bind,ro {root}{d}"]
        env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in environment.items())
        script = "\n".join(["set -e", "ip link set lo up", *binds,
                            f"export KREL={shlex.quote(krel or '')}",
                            f"export UNIT_ENV={shlex.quote(env_words)}",
                            f"export UNIT_EXEC={shlex.quote(service['ExecStart'])}",
                            f"export UNIT_CAPS={unit_capabilities(service)}",
                            f"enter_root {root} bash -s"])
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "--kill-child", "--net", "sh", "-c", CHROOT_SETUP + "\n" + script, "setup", root],
            input=INSIDE, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-6000:]
        results = dict(line.split(" ", 1)[1].split("=", 1) for line in proc.stdout.splitlines()
                       if line.startswith("RESULT "))
        print(*(f"{k}={v}" for k, v in results.items()), sep="\n")
        uid, home, shell = results["account"].split(":")
        assert int(uid) < 1000 and home == "/var/lib/stap-server" and "nologin" in shell
        assert results["client_alone"] == "ok"
        assert results["state_at_install"] == "no"  # the certificate waits for the first start
        # The postinst's directories, for a server started without systemd too.
        assert results["dirs"] == "stap-server:stap-server:755,stap-server:stap-server:750"
        uid, shell = results["compile_account"].split(":")
        assert int(uid) < 1000 and "nologin" in shell
        assert results["stap_stop_server_usage"] == "1 usage:_stap-stop-server_PID"
        if krel:
            assert results["status_file"] == "yes", log[-6000:]
            assert results["server_uid"] == "stap-server"
            assert results["cert_owner"] == "stap-server"
            assert "stap-server.log.1" in results["rotated"].split(","), results["rotated"]
            assert results["compile_rc"] == "0", log[-6000:]
            assert int(results["log_after_rotation"]) >= 1  # still logging after copytruncate
            assert results["stop_rc"] == "0"
            assert results["status_after_stop"] == "removed"
            assert results["log_stopped"] == "1"
            # The unit's server compiles as stap-compile, with no capability, and neither
            # its sandbox nor its account can read the key.
            assert results["compile_user"] == "stap-compile", log[-6000:]
            assert results["compile_caps"] == ",".join(["0000000000000000"] * 3)
            assert results["compile_key"] == "unreadable"
            assert results["compile_account_key"] == "unreadable"
            # prerm stopped the server root started by hand: status file gone, log says so.
            assert results["root_server_status"] == "", results["root_server_status"]
            assert results["root_server_log"] == "stopped"
            assert results["root_server_state"] in ("gone", "Z"), results["root_server_state"]
            # purge revokes the server's certificate where this host trusted it, and says
            # how to do it on the others.
            assert results["purge_revoked"] == "1"
            assert int(results["purge_says_revoke"]) >= 1
        assert results["purged_state"] == "removed"
        assert results["purged_lib"] == "removed", results["purged_lib"]
        assert results["purged_bin"] == "0"
        if why_no_server:
            pytest.skip(f"packages installed and purged; server not run: {why_no_server}")
    finally:
        remove_tree(work)


# --------------------------------------------------------------------------
# pip install . into a venv
# --------------------------------------------------------------------------

def test_pip_install_into_venv(tmp_path):
    """`pip install .` (setup.cfg) into a --system-site-packages venv of
    /usr/bin/python3; the console scripts run from the venv's bin.  The
    source is copied first (setuptools writes build/ and *.egg-info), and
    the build uses the system's setuptools (no download)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "stap_client.py",
                 "stap_server.py"):
        shutil.copy(os.path.join(ROOT, name), src)
    env_dir = tmp_path / "venv"
    proc = subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages",
                           str(env_dir)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "ensurepip" in proc.stdout + proc.stderr:
        pytest.skip("python3-venv is not installed (tools/install-deps installs it)")
    assert proc.returncode == 0, proc.stderr
    bin_dir = env_dir / "bin"
    proc = subprocess.run([str(bin_dir / "pip"), "install", "--no-build-isolation",
                           "--no-input", "--disable-pip-version-check", "."],
                          cwd=src, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for command in CLIENT_COMMANDS + SERVER_COMMANDS:
        assert (bin_dir / command).exists(), command
    proc = subprocess.run([str(bin_dir / "stap-client"), "--help"], cwd=tmp_path,
                          env=clean_env(HOME=str(tmp_path)), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: stap-client")
    proc = subprocess.run([str(bin_dir / "stap-stop-server")], cwd=tmp_path,
                          env=clean_env(HOME=str(tmp_path)), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "usage: stap-stop-server PID" in proc.stderr
    # The modules come from the venv, NSS from the system's site-packages.
    proc = subprocess.run([str(bin_dir / "python"), "-c",
                           ("import stap_client, stap_server, nss.nss; "
                            "print(stap_client.__file__); print(stap_server.__file__)")],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for path in proc.stdout.split():
        assert path.startswith(str(env_dir)), path
