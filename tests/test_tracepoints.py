"""stap's tracepoint query modules are the server's knowledge (issues 20/21): a kernel.trace probe
makes stap build one object per tracepoint header of the kernel (172 objects, 40 MB for the 6.1
headers).  The server's own warm-up builds them once per kernel; later compiles read them through
links in their own stap cache, read-only, and a compromised compile cannot change them.  The
servers use the tests' shared --cache-dir, so a warm run pays no warm-up."""

import filecmp
import hashlib
import os
import re
import shutil
import uuid

import pytest
from shared import PROGRAMS

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0,
                                 reason="needs root: the compile account, --cache-dir")]

BUILT_HERE = "Processing tracepoint header"  # stap -vvv, building a tracepoint query itself
USED_CACHED = re.compile(r"^Pass 2: using cached \S+/tracequery_[0-9a-f]+_\d+\.o$", re.M)
TROJAN = b"TROJAN-TRACEQUERY"  # what the compromised stap, stap_poison.sh, writes


def client(box, srv, *args, timeout=900):
    return box.run("stap-client", f"--server={srv.address}", *args, timeout=timeout)


def text(proc):
    return (proc.stdout + proc.stderr).decode(errors="replace")[-4000:]


def trace_warm_ups(srv):
    with open(srv.log) as f:
        return len(re.findall(r"stap tracepoint knowledge for \S+ \S+: warming up", f.read()))


def tracepoint_knowledge(cache, krel):
    """{path: sha256} of every file in the tracepoint knowledge directories of krel."""
    found = {}
    top = os.path.join(cache, "knowledge")
    for name in os.listdir(top):
        if name.startswith(f"{krel}-") and name.endswith(".tracequery"):
            for root, _, names in os.walk(os.path.join(top, name)):
                for n in names:
                    with open(os.path.join(root, n), "rb") as f:
                        found[os.path.join(root, n)] = hashlib.sha256(f.read()).hexdigest()
    return found


def compile_trace(box, srv, krel, name, probe='kernel.trace("sched_switch")'):
    """A new script on probe, -p4 -vvv; returns stap's stderr after checking its module."""
    mark = uuid.uuid4().hex
    proc = client(box, srv, "-r", krel, "-p4", "-vvv", "-m", name, "-e",
                  f'probe {probe} {{ printf("{mark} %d\\n", pid()) exit() }}')
    assert proc.returncode == 0, text(proc)
    with open(box.path(f"{name}.ko"), "rb") as f:
        module = f.read()
    assert module.startswith(b"\x7fELF") and mark.encode() in module and TROJAN not in module
    return proc.stderr.decode(errors="replace")


def test_a_second_kernel_trace_compile_builds_no_tracepoint_query(servers, sandbox, krel,
                                                                   runtime, cache_dir):
    """Two different kernel.trace scripts against one server: at most the first waits for the
    server's warm-up; neither builds a tracepoint query itself (stap -vvv says so), both use
    the server's, and both modules are right.  So does a script on a tapset's alias of
    kernel.trace, which does not name it."""
    srv = servers.start(sandbox, krel, runtime, cache=cache_dir)
    for n, probe in enumerate(['kernel.trace("sched_switch")', 'kernel.trace("sched_switch")',
                               "scheduler.ctxswitch"]):
        err = compile_trace(sandbox, srv, krel, f"trace{n}", probe)
        assert BUILT_HERE not in err, err[-2000:]
        assert len(USED_CACHED.findall(err)) > 100, err[-2000:]
    assert trace_warm_ups(srv) <= 1
    knowledge = tracepoint_knowledge(cache_dir, krel)
    assert len(knowledge) > 100, "no tracepoint knowledge stored"
    for path in knowledge:
        st = os.lstat(path)
        assert st.st_uid == 0 and not st.st_mode & 0o022, f"{path} is not the server's alone"


def test_compromised_compile_cannot_change_the_tracepoint_queries(servers, sandbox, krel,
                                                                   runtime, cache_dir,
                                                                   shared_dir):
    """A compromised stap, given the server's tracepoint query modules, writes into every one it
    can find; the files stay the server's bytes, and the next real compile uses them, unbuilt."""
    made = os.path.join(PROGRAMS, "stap_poison.sh")
    stand_in = os.path.join(shared_dir, "stap-poisoner")  # kept: its stamp keeps the knowledge
    if not os.path.exists(stand_in) or not filecmp.cmp(made, stand_in, shallow=False):
        shutil.copy(made, stand_in)
    sandbox.env["SYSTEMTAP_STAP"] = stand_in
    srv = servers.start(sandbox, krel, runtime, cache=cache_dir)
    compile_trace(sandbox, srv, krel, "before")  # waits for the warm-up on a cold cache
    knowledge = tracepoint_knowledge(cache_dir, krel)
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e",
                  f'probe kernel.trace("sched_switch") {{ /* POISON {TROJAN.decode()} */ }}',
                  timeout=300)
    attack = proc.stdout.decode(errors="replace")
    print(attack)
    assert proc.returncode == 1 and re.search(r"^found [1-9]\d+$", attack, re.M), text(proc)
    assert not re.search(r"^(overwrote|appended to|chmod) |^planted by /stap/tracequery", attack,
                         re.M), attack  # planted: only beside its own links, in its own cache
    err = compile_trace(sandbox, srv, krel, "after")
    assert BUILT_HERE not in err and USED_CACHED.search(err), err[-2000:]
    assert tracepoint_knowledge(cache_dir, krel) == knowledge
    assert trace_warm_ups(srv) <= 1
