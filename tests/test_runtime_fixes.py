"""The runtime fixed by the server (issue 21, spec 5 and 11): a server started without -R builds
pass 4 for headers that systemtap 4.8's runtime does not build against, with its own fixed copy
of the runtime, made once, logged, read-only to the compile; a pass-4 failure in the runtime that
no known fix covers gets one line after stap's output."""

import hashlib
import os
import shutil
import stat
import types

import pytest
from hardening_helpers import server_tmpdir, stand_in_program
from shared import fixed_runtime_for, read_text, wait_until

import stap_server

pytestmark = pytest.mark.integration


def client(box, srv, *args, **kw):
    return box.run("stap-client", f"--server={srv.address}", *args, **kw)


def fixes_for(krel):
    return stap_server.needed_fixes(stap_server.header_trees(krel), stap_server.STOCK_RUNTIME)


@pytest.fixture
def needs_fix(krel):
    if not fixes_for(krel):
        pytest.skip(f"the installed runtime builds for {krel} as it is: no fix to apply")


def tree_digest(top):
    h = hashlib.sha256()
    for path in stap_server.walk_files(top):
        st = os.lstat(path)
        h.update(f"{os.path.relpath(path, top)} {oct(st.st_mode)} {st.st_uid}\n".encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def fixed_copies(cache_dir):
    top = os.path.join(cache_dir, stap_server.FIXED_RUNTIMES)
    return [os.path.join(top, n) for n in os.listdir(top)] if os.path.isdir(top) else []


def test_pass_4_without_R_uses_the_servers_fixed_runtime(needs_fix, servers, sandbox, krel,
                                                          cache_dir):
    srv = servers.start(sandbox, krel, cache=cache_dir)
    fixed = stap_server.runtime_copy(types.SimpleNamespace(runtime=None, cache_dir=cache_dir),
                                     stap_server.header_trees(krel))
    logged = (f"runtime fix task_work_cancel_func for {krel}: the kernel renamed "
              f"task_work_cancel to task_work_cancel_func (runtime {fixed.path})")
    wait_until(lambda: logged in read_text(srv.log), 10, "the runtime fix was not logged")
    work = sandbox.path("work")
    os.makedirs(work)
    proc = client(sandbox, srv, "-r", krel, "-p4", "-m", "fixed_rt", "-e",
                  'probe begin { println("hi"); exit() }', cwd=work, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    assert os.listdir(work) == ["fixed_rt.ko"]
    st = os.stat(fixed.path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o755)
    with open(os.path.join(fixed.path, "stp_task_work.c")) as f:
        assert 'kallsyms_lookup_name("task_work_cancel_func")' in f.read()
    assert fixed.path in fixed_copies(cache_dir)


def test_a_compile_cannot_change_the_fixed_runtime(needs_fix, servers, sandbox, krel,
                                                   cache_dir):
    sandbox.env["SYSTEMTAP_STAP"] = stand_in_program(sandbox, "stap_tamper.sh")  # attacks its -R
    srv = servers.start(sandbox, krel, None, "--tmpdir", server_tmpdir(sandbox), cache=cache_dir)
    copies = {path: tree_digest(path) for path in fixed_copies(cache_dir)}
    assert copies
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e", "probe begin { exit() }", timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 1
    assert f"runtime={stap_server.SANDBOX_RUNTIME}/" in out, out
    assert "\n1\n" in out, out  # it was given the fixed copy
    for word in ("appended", "created", "removed", "chmodded"):
        assert word not in out, out
    assert {path: tree_digest(path) for path in copies} == copies


@pytest.fixture
def broken_runtime(krel, shared_dir):
    """(-R directory, fixes the server applies to it): a copy of the runtime stap would use
    for krel, with the server's fixes ("fixed") or the stock one ("stock"), and an #error in
    runtime.h, which every module includes.  Kept in shared_dir under a name that changes with
    the source: stap probes the kernel's configuration once per runtime path."""
    def make(kind):
        source = (fixed_runtime_for(krel, shared_dir) if kind == "fixed" else None) \
            or stap_server.STOCK_RUNTIME
        stamp = hashlib.sha256(b"".join(map(stap_server.stat_line,
                                            stap_server.walk_files(source)))).hexdigest()[:12]
        path = os.path.join(shared_dir, f"broken-runtime-{kind}-{stamp}")
        if not os.path.isdir(path):
            new = path + ".new"
            shutil.rmtree(new, ignore_errors=True)
            shutil.copytree(source, new)
            with open(os.path.join(new, "runtime.h"), "a") as f:
                f.write("#error deliberately broken\n")
            os.rename(new, path)
        return path, stap_server.needed_fixes(stap_server.header_trees(krel), path)
    return make


@pytest.mark.parametrize("kind", ["fixed", "stock"])
def test_a_runtime_failure_is_told_in_one_line_after_staps_output(kind, broken_runtime, servers,
                                                                  sandbox, krel, cache_dir):
    runtime, fixes = broken_runtime(kind)
    if kind == "stock" and not fixes:
        pytest.skip(f"the installed runtime builds for {krel} as it is: no fix to apply")
    srv = servers.start(sandbox, krel, runtime, cache=cache_dir)
    proc = client(sandbox, srv, "-r", krel, "-p4", "-e", "probe begin { exit() }", timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    lines = err.rstrip("\n").split("\n")
    assert "#error deliberately broken" in err
    known = (f"even with the known fixes {', '.join(f.name for f in fixes)} applied" if fixes
             else "and no known runtime fix applies")
    assert lines[-1] == ("stap-serverd: ERROR: pass 4 failed in the stap runtime (runtime.h) "
                         f"{known}: this systemtap may be too old for this kernel"), err
    assert "Pass 4: compilation failed" in "\n".join(lines[:-1]), err  # stap's output first
