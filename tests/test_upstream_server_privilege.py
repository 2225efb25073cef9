# Ported from systemtap testsuite/systemtap.server/server_privilege.exp (cases reimplemented).
"""systemtap's server_privilege.exp: a server compiles modules at every
privilege level, signs those below stapdev, and the setuid staprun lets each
kind of user load exactly what its groups allow, refusing a module whose
signature does not match it.

Upstream, as root: trust the server as a module signer inside a private
mount namespace (over /etc/systemtap, so the machine's signers stay as they
are); compile hello.stp (test.stp for stapusr) with -p4 and --unprivileged,
--privilege=stapusr, stapsys, stapdev: rc 0, a "stap_....ko" line, the
module and (below stapdev) its .sgn in the cwd; run `staprun MODULE` in the
namespace as the optional users stapusr (groups stapusr), stapsys (stapusr,
stapsys) and stapdev (stapusr, stapdev): unprivileged and stapusr modules
load for all three, stapsys modules for stapsys and stapdev only, stapdev
modules for stapdev only; last, the stapusr module's .sgn renamed onto the
unprivileged module's must be refused.  (Upstream also meant to overwrite
four bytes of a .sgn and expect a refusal, but its `set rc 1` skips that
step; it is run here as intended.)

Lanes: the real client and ours against our server (each trusting it as a
signer its own way: `stap --trust-servers=signer,no-prompt` and our
`stap-add-server-cert --signer --yes`), and the real client against the
real stap-serverd 4.8.

Adaptations (see upstream_helpers): `-r KREL`; servers named by HOST:PORT;
scratch users stapusrtest, stapsystest, stapdevtest stand for upstream's
optional users (created here when missing, with upstream's groups); modules
cannot be loaded on this machine, so "staprun loaded it" becomes "staprun
accepted it and asked the kernel" (the kernel's "Function not implemented"),
and a refusal is staprun saying no before that; staprun 4.8 needs its
signer database prepared (README, "Signed modules for stapusr users")."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest
from shared import CLIENT
from upstream_helpers import (  # noqa: F401  (pairings, stap_users: fixtures)
    PYTHON,
    pairings,
    prepare_for_staprun_48,
    stap_users,
    staprun_accepted,
    with_etc,
    write_scripts,
)

pytestmark = pytest.mark.upstream

PRIVILEGES = ["--unprivileged", "--privilege=stapusr", "--privilege=stapsys",
              "--privilege=stapdev"]
# who may load a module of each privilege (upstream's expectations)
MAY_LOAD = {"--unprivileged": {"stapusr", "stapsys", "stapdev"},
            "--privilege=stapusr": {"stapusr", "stapsys", "stapdev"},
            "--privilege=stapsys": {"stapsys", "stapdev"},
            "--privilege=stapdev": {"stapdev"}}
LANES = ["real-client", "our-client", "real-server"]


def in_namespace(etc, argv, user=None, env=None, timeout=300):
    return subprocess.run(with_etc(etc, argv, user), capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def lanes(pairings):
    """Per lane: a throw-away /etc/systemtap (its signer database trusting
    the lane's server), made the lane's way; and a shared cwd for modules."""
    out = {}
    for lane in LANES:
        top = tempfile.mkdtemp(prefix=f"etc-{lane}.", dir=pairings.top)
        os.chmod(top, 0o755)
        etc = os.path.join(top, "systemtap")
        os.makedirs(etc, 0o755)
        if lane == "our-client":
            proc = in_namespace(etc, [PYTHON, CLIENT, "stap-add-server-cert", "--signer",
                                      "--yes", pairings.server.address],
                                env={**pairings.box.env, "STAP_SYSCONFDIR": top})
        else:
            proc = in_namespace(etc, pairings.argv(lane, ["--trust-servers=signer,no-prompt"]),
                                env=pairings.env(lane))
        cwd = tempfile.mkdtemp(prefix=f"modules-{lane}.", dir=pairings.top)
        os.chmod(cwd, 0o755)
        out[lane] = {"etc": etc, "trust": proc, "cwd": cwd, "modules": {}}
        if proc.returncode == 0 and os.path.isdir(os.path.join(etc, "staprun")):
            prepare_for_staprun_48(etc)
    return out


# upstream "adding trusted signer" (in a namespace)
@pytest.mark.parametrize("lane", LANES)
def test_adding_trusted_signer(lanes, lane):
    proc = lanes[lane]["trust"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = subprocess.run(["certutil", "-L", "-d", "sql:" + os.path.join(
        lanes[lane]["etc"], "staprun")], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) > 4, listed.stdout


def staprun_as(lanes, lane, user, module):
    """(accepted, what staprun said): accepted when staprun verified the
    module and asked the kernel to load it (the kernel here refuses)."""
    proc = in_namespace(lanes[lane]["etc"], ["staprun", module], user=user, timeout=60)
    said = proc.stdout + proc.stderr
    return staprun_accepted(said), said


@pytest.mark.parametrize("privilege", PRIVILEGES)
@pytest.mark.parametrize("lane", LANES)
def test_compile_and_run(pairings, lanes, stap_users, lane, privilege, krel):
    """upstream's compile_with_privilege, then the three users' staprun."""
    scripts = write_scripts(os.path.join(pairings.top, "scripts"))
    script = os.path.join(scripts, "test.stp" if privilege == "--privilege=stapusr"
                          else "hello.stp")
    cwd = tempfile.mkdtemp(prefix="compile.", dir=lanes[lane]["cwd"])
    os.chmod(cwd, 0o755)
    proc = pairings.run(lane, ["-r", krel, "-p4", privilege, script], cwd=cwd, server_last=True)
    names = re.findall(r"^(stap_\S*\.ko)$", proc.stdout, re.M)
    assert proc.returncode == 0 and names, proc.stdout + proc.stderr  # "module compile"
    module = os.path.join(cwd, names[0])
    assert os.path.isfile(module), os.listdir(cwd)  # "module exists"
    if privilege != "--privilege=stapdev":
        assert os.path.isfile(module + ".sgn"), os.listdir(cwd)  # "... and signature exist"
    for name in os.listdir(cwd):
        os.chmod(os.path.join(cwd, name), 0o644)
    lanes[lane]["modules"][privilege] = module
    if lanes[lane]["trust"].returncode != 0:
        pytest.fail("the server is not a trusted signer in this lane's namespace")
    wrong = []
    for role, user in stap_users.items():
        accepted, said = staprun_as(lanes, lane, user, module)
        if accepted != (role in MAY_LOAD[privilege]):
            wrong.append(f"{role} user: {'accepted' if accepted else 'refused'}, expected "
                         f"{'accepted' if not accepted else 'refused'}:\n{said}")
    assert not wrong, "\n".join(wrong)


# upstream "module verification": a .sgn that is not the module's is refused
@pytest.mark.parametrize("lane", LANES)
def test_module_verification(lanes, stap_users, lane):
    mods = lanes[lane]["modules"]
    if not {"--unprivileged", "--privilege=stapusr"} <= set(mods):
        pytest.skip("the unprivileged and stapusr modules were not built in this lane")
    if lanes[lane]["trust"].returncode != 0:
        pytest.skip("the server is not a trusted signer in this lane's namespace")
    work = tempfile.mkdtemp(prefix="verify.", dir=lanes[lane]["cwd"])
    os.chmod(work, 0o755)
    unpriv = os.path.join(work, os.path.basename(mods["--unprivileged"]))
    for suffix in ("", ".sgn"):
        shutil.copy(mods["--unprivileged"] + suffix, unpriv + suffix)
    # (upstream skips this step by mistake) four bytes of the signature changed
    with open(unpriv + ".sgn", "r+b") as f:
        f.seek(10)
        f.write(b"\xde\xad\xbe\xef")
    accepted, said = staprun_as(lanes, lane, stap_users["stapusr"], unpriv)
    assert not accepted and "Unable to verify" in said, said
    # "module rename": the stapusr module's signature over the unprivileged one's
    os.replace(mods["--privilege=stapusr"] + ".sgn", unpriv + ".sgn")
    os.chmod(unpriv + ".sgn", 0o644)
    accepted, said = staprun_as(lanes, lane, stap_users["stapusr"], unpriv)
    assert not accepted and "Unable to verify" in said, said
