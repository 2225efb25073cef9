"""Unit tier (no root, no stap): the server's table of known runtime fixes.  Which fixes a kernel's
headers and a runtime need, the fixed copy (made once, under a temporary name, read-only to
others, remade when the runtime changes), how stap is pointed at it, and the line a runtime
failure with no known fix gets."""

import os
import stat
import types

import pytest

import stap_server
from stap_client import Error
from stap_server import (
    RUNTIME_FIXES,
    needed_fixes,
    runtime_binds,
    runtime_copy,
    runtime_failure,
    stap_argv,
)

pytestmark = pytest.mark.unit

OLD_RUNTIME = b"""typedef typeof(&task_work_cancel) task_work_cancel_fn;
#define task_work_cancel (* (task_work_cancel_fn)kallsyms_task_work_cancel)
        kallsyms_task_work_cancel = (void *)kallsyms_lookup_name("task_work_cancel");
"""
FIXED_RUNTIME = b"""typedef typeof(&task_work_cancel_func) task_work_cancel_fn;
#define task_work_cancel_func (* (task_work_cancel_fn)kallsyms_task_work_cancel)
        kallsyms_task_work_cancel = (void *)kallsyms_lookup_name("task_work_cancel_func");
"""
NEW_HEADER = b"struct callback_head *task_work_cancel_func(struct task_struct *, void *);\n"
OLD_HEADER = b"struct callback_head *task_work_cancel(struct task_struct *, void *);\n"


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def trees(tmp_path):
    """(kernel trees, runtime): a -common tree whose task_work.h has the new name, a build tree
    without it, and a runtime with systemtap 4.8's stp_task_work.c."""
    build, common, runtime = (str(tmp_path / n) for n in ("build", "common", "runtime"))
    write(os.path.join(build, "Makefile"), b"include common\n")
    write(os.path.join(common, "include/linux/task_work.h"), NEW_HEADER)
    write(os.path.join(runtime, "stp_task_work.c"), OLD_RUNTIME)
    write(os.path.join(runtime, "linux/runtime.h"), b"/* untouched */\n")
    return [build, common], runtime


def config_for(tmp_path, runtime):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755, exist_ok=True)
    return types.SimpleNamespace(runtime=runtime, cache_dir=str(cache))


def test_the_fix_is_needed_only_when_both_feature_tests_match(trees):
    kernel, runtime = trees
    assert [f.name for f in needed_fixes(kernel, runtime)] == ["task_work_cancel_func"]
    write(os.path.join(kernel[1], "include/linux/task_work.h"), OLD_HEADER)
    assert needed_fixes(kernel, runtime) == ()  # an older kernel
    write(os.path.join(kernel[1], "include/linux/task_work.h"), NEW_HEADER)
    write(os.path.join(runtime, "stp_task_work.c"), OLD_RUNTIME.replace(
        b'"task_work_cancel"', b'"task_work_cancel_func"'))
    assert needed_fixes(kernel, runtime) == ()  # a runtime that knows the new name
    assert needed_fixes(["/nonexistent"], runtime) == ()


def test_the_fixed_copy_changes_only_the_fixed_file(trees, tmp_path):
    kernel, runtime = trees
    fixed = runtime_copy(config_for(tmp_path, runtime), kernel)
    assert fixed.fixes == RUNTIME_FIXES
    assert os.path.dirname(fixed.path) == str(tmp_path / "cache" / stap_server.FIXED_RUNTIMES)
    assert fixed.view == f"{stap_server.SANDBOX_RUNTIME}/{os.path.basename(fixed.path)}"
    with open(os.path.join(fixed.path, "stp_task_work.c"), "rb") as f:
        assert f.read() == FIXED_RUNTIME
    with open(os.path.join(fixed.path, "linux/runtime.h"), "rb") as f:
        assert f.read() == b"/* untouched */\n"
    with open(os.path.join(runtime, "stp_task_work.c"), "rb") as f:
        assert f.read() == OLD_RUNTIME  # the source is never changed
    for top, dirs, files in os.walk(fixed.path):
        for name in dirs + files:
            mode = stat.S_IMODE(os.stat(os.path.join(top, name)).st_mode)
            assert mode == (0o755 if name in dirs else 0o644), (name, oct(mode))
    assert os.listdir(os.path.dirname(fixed.path)) == [os.path.basename(fixed.path)]


def test_the_copy_is_made_once_and_again_when_the_runtime_changes(trees, tmp_path):
    kernel, runtime = trees
    config = config_for(tmp_path, runtime)
    first = runtime_copy(config, kernel)
    inode = os.stat(os.path.join(first.path, "stp_task_work.c")).st_ino
    again = runtime_copy(config, kernel)
    assert again == first
    assert os.stat(os.path.join(again.path, "stp_task_work.c")).st_ino == inode
    write(os.path.join(runtime, "linux/runtime.h"), b"/* a newer systemtap */\n")
    newer = runtime_copy(config, kernel)
    assert newer.path != first.path
    with open(os.path.join(newer.path, "linux/runtime.h"), "rb") as f:
        assert f.read() == b"/* a newer systemtap */\n"


def test_no_copy_for_a_runtime_that_needs_no_fix(trees, tmp_path):
    kernel, runtime = trees
    write(os.path.join(kernel[1], "include/linux/task_work.h"), OLD_HEADER)
    config = config_for(tmp_path, runtime)
    assert runtime_copy(config, kernel) is None
    assert not os.path.exists(os.path.join(config.cache_dir, stap_server.FIXED_RUNTIMES))
    assert runtime_binds(None) == []


def test_a_copy_in_a_directory_others_can_write_is_refused(trees, tmp_path):
    kernel, runtime = trees
    config = config_for(tmp_path, runtime)
    os.mkdir(os.path.join(config.cache_dir, stap_server.FIXED_RUNTIMES), 0o777)
    os.chmod(os.path.join(config.cache_dir, stap_server.FIXED_RUNTIMES), 0o777)
    with pytest.raises(Error, match="that group and others cannot write"):
        runtime_copy(config, kernel)


def test_stap_gets_the_fixed_runtime_read_only_and_last(trees, tmp_path):
    kernel, runtime = trees
    fixed = runtime_copy(config_for(tmp_path, runtime), kernel)
    assert runtime_binds(fixed) == ["--ro-bind", fixed.path, fixed.view]
    config = types.SimpleNamespace(stap_options=["-R", "/srv/runtime", "-I", "/srv/tapset"])
    req = types.SimpleNamespace(release="6.1.0-57-amd64", arch="x86_64", args=["-p4", "s.stp"],
                                build_env=None)
    argv = stap_argv(config, req, "/stap/request", fixed.view)
    assert argv[argv.index("/srv/tapset") + 1:argv.index("--client-options")] == \
        ["-R", fixed.view, "--tmpdir=/stap/request/tmp"]
    assert "-R" not in stap_argv(config, req, "/w")[argv.index("/srv/tapset") + 1:]


RUNTIME_ERROR = (b"In file included from /tmp/stap/stap_1_src.c:24:\n"
                 b"/usr/share/systemtap/runtime/linux/runtime.h:9:2: error: #error broken\n"
                 b"Pass 4: compilation failed.  [man error::pass4]\n")


def test_a_failure_in_the_runtime_gets_one_line_after_staps_output(trees, tmp_path):
    kernel, runtime = trees
    line = runtime_failure(RUNTIME_ERROR, "/usr/share/systemtap/runtime", None)
    assert line == (b"stap-serverd: ERROR: pass 4 failed in the stap runtime (linux/runtime.h) "
                    b"and no known runtime fix applies: this systemtap may be too old for this "
                    b"kernel\n")
    fixed = runtime_copy(config_for(tmp_path, runtime), kernel)
    error = RUNTIME_ERROR.replace(b"/usr/share/systemtap/runtime", fixed.view.encode())
    line = runtime_failure(error, fixed.view, fixed)
    assert b"(linux/runtime.h) even with the known fixes task_work_cancel_func applied" in line
    script_error = b"/stap/request/tmp/stap_1_src.c:9:2: error: embedded C broke\n"
    assert runtime_failure(script_error, "/usr/share/systemtap/runtime", None) == b""


def test_a_fetched_kernel_is_shown_alone_and_read_only(tmp_path):
    """kernel_binds: the fetched release's /lib/modules entry and /usr/src trees on read-only
    tmpfs mounts that hide the host's, and its kbuild over the installed one."""
    root = tmp_path / "trees" / "6.1.0-50-amd64"
    for d in ("usr/src/linux-headers-6.1.0-50-amd64", "usr/src/linux-headers-6.1.0-50-common",
              "lib/modules/6.1.0-50-amd64", "usr/lib/linux-kbuild-no-such"):
        (root / d).mkdir(parents=True)
    kernel = stap_server.FetchedKernel("6.1.0-50-amd64", str(root), 0)
    modules = os.path.realpath("/lib/modules")
    assert stap_server.kernel_binds(kernel) == [
        "--size", "65536", "--tmpfs", "/usr/src",
        "--ro-bind", f"{root}/usr/src/linux-headers-6.1.0-50-amd64",
        "/usr/src/linux-headers-6.1.0-50-amd64",
        "--ro-bind", f"{root}/usr/src/linux-headers-6.1.0-50-common",
        "/usr/src/linux-headers-6.1.0-50-common",
        "--remount-ro", "/usr/src",
        "--size", "65536", "--tmpfs", modules,
        "--ro-bind", f"{root}/lib/modules/6.1.0-50-amd64", f"{modules}/6.1.0-50-amd64",
        "--remount-ro", modules]  # a kbuild the host lacks is not bound
    assert stap_server.header_trees("6.1.0-50-amd64", kernel) == [
        f"{root}/usr/src/linux-headers-6.1.0-50-amd64",
        f"{root}/usr/src/linux-headers-6.1.0-50-common"]
    assert stap_server.kernel_binds(None) == []
