"""The server-side result cache: repeat requests are answered with the stored,
already signed reply, without running stap."""

import concurrent.futures
import os
import re
import uuid

import pytest

pytestmark = pytest.mark.integration


def cache_log(server):
    with open(server.log) as f:
        return re.findall(r" request client=.*? cache='(\w+)'", f.read())


def compile_p4(box, server, krel, script, *extra, cwd):
    os.makedirs(cwd, exist_ok=True)
    proc = box.run("stap-client", f"--server={server.address}", "-r", krel, "-p4", *extra,
                   "-e", script, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.decode().strip()
    # the server's stderr; stap-client's own progress lines depend on how long the compile took
    stderr = b"".join(l for l in proc.stderr.splitlines(keepends=True)
                      if not l.startswith(b"stap-client: "))
    with open(os.path.join(cwd, name), "rb") as f:
        return proc.stdout, stderr, f.read()


def unique_script():
    return f'probe begin {{ println("{uuid.uuid4().hex}"); exit() }}'


def test_repeat_request_is_a_hit_with_identical_results(server, sandbox, krel):
    script = unique_script()
    first = compile_p4(sandbox, server, krel, script, cwd=sandbox.path("one"))
    second = compile_p4(sandbox, server, krel, script, cwd=sandbox.path("two"))
    assert cache_log(server) == ["miss", "hit"]
    assert first == second  # same stdout, stderr and module bytes


def test_changes_miss(server, sandbox, krel):
    script = unique_script()
    compile_p4(sandbox, server, krel, script, cwd=sandbox.path("a"))
    compile_p4(sandbox, server, krel, script, "-DMAXACTION=12345", cwd=sandbox.path("b"))
    compile_p4(sandbox, server, krel, script.replace("println", "print"), cwd=sandbox.path("c"))
    # a tapset file of the request changes
    tapsets = sandbox.path("tapsets")
    os.makedirs(tapsets)
    for n, body in enumerate(("1", "2")):
        with open(os.path.join(tapsets, "t.stp"), "w") as f:
            f.write(f"function t() {{ return {body} }}\n")
        compile_p4(sandbox, server, krel, "probe begin { println(t()); exit() }", "-I", tapsets,
                   cwd=sandbox.path(f"d{n}"))
    assert cache_log(server) == ["miss"] * 5


def test_verbose_requests_are_not_cached(server, sandbox, krel):
    script = unique_script()
    for _ in range(2):
        proc = sandbox.run("stap-client", f"--server={server.address}", "-r", krel, "-p2", "-v",
                           "-e", script)
        assert proc.returncode == 0, proc.stderr
    assert cache_log(server) == ["skip", "skip"]


def test_concurrent_identical_requests_compile_once(server, sandbox, krel):
    script = unique_script()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda n: compile_p4(sandbox, server, krel, script, cwd=sandbox.path(f"c{n}")),
            range(4)))
    assert all(r == results[0] for r in results)
    log = cache_log(server)
    # the ones that came while it compiled say so ("merged"); later ones hit
    assert log.count("miss") == 1 and "merged" in log, log
    assert sorted(set(log) - {"miss"}) in (["merged"], ["hit", "merged"]), log
    with open(server.log) as f:
        assert f.read().count("rc=0") == 4


@pytest.mark.parametrize("size", ["0"])
def test_cache_can_be_turned_off(size, servers, sandbox, krel, runtime, cache_dir):
    srv = servers.start(sandbox, krel, runtime, "--result-cache-size", size, cache=cache_dir)
    for _ in range(2):
        proc = sandbox.run("stap-client", f"--server={srv.address}", "-r", krel, "-p2", "-e",
                           "probe begin { exit() }")
        assert proc.returncode == 0, proc.stderr
    assert cache_log(srv) == ["skip", "skip"]
