"""The fixtures and hooks of the tests (their library is tests/shared.py): a private sysconfdir
and SYSTEMTAP_DIR, the unprivileged test account, the kernel release with headers, the runtime
fixture, running servers (cleaned up by pid) and a recording staprun stand-in.  setup.cfg puts
the modules and tests/ on sys.path."""

import os
import shutil
import tempfile

import pytest
from shared import (
    SHARED,
    TEST_USER,
    copy_program,
    fixed_runtime_for,
    headers_release,
    make_sandbox,
    need_root,
    start_server,
)

# --------------------------------------------------------------------------
# The kernel release, the runtime fixture, stap's knowledge of the kernel
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def krel():
    rel = headers_release()
    if not rel:
        pytest.skip("no installed kernel headers (apt-get install linux-headers-amd64)")
    return rel


@pytest.fixture(scope="session")
def shared_dir():
    os.makedirs(SHARED, 0o755, exist_ok=True)
    os.chmod(SHARED, 0o755)
    return SHARED


@pytest.fixture(scope="session")
def runtime():
    """No -R for our server: it fixes the runtime for a kernel itself (spec 5, 11)."""
    return None


@pytest.fixture(scope="session")
def fixed_runtime(krel, shared_dir):
    """The -R directory that stap run without our server (the real stap-serverd, a local stap)
    needs for these headers, or None: made by our server's own table of fixes."""
    return fixed_runtime_for(krel, shared_dir)


@pytest.fixture(scope="session")
def cache_dir(shared_dir):
    """A root server's --cache-dir (stap's knowledge of each kernel), kept between sessions."""
    path = os.path.join(shared_dir, "knowledge-cache")
    os.makedirs(path, 0o755, exist_ok=True)
    return path


# --------------------------------------------------------------------------
# Sandboxes: environment for a user, with private sysconfdir and SYSTEMTAP_DIR
# --------------------------------------------------------------------------

@pytest.fixture
def sandbox():
    """Root's sandbox (as root) or the caller's own."""
    box = make_sandbox()
    yield box
    shutil.rmtree(box.top, ignore_errors=True)


@pytest.fixture
def user_sandbox():
    """A sandbox for the unprivileged test account."""
    need_root()
    box = make_sandbox(TEST_USER)
    yield box
    shutil.rmtree(box.top, ignore_errors=True)


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------

@pytest.fixture
def servers():
    """Start servers with servers.start(box, ...); all are stopped afterwards."""
    started = []

    class Starter:
        def start(self, *args, **options):
            """shared.start_server's arguments."""
            srv = start_server(*args, **options)
            started.append(srv)
            return srv

    yield Starter()
    for srv in started:
        srv.stop()


@pytest.fixture
def server(servers, sandbox, krel, runtime, cache_dir):
    """One root (or caller's) server on loopback serving the headers release."""
    return servers.start(sandbox, krel, runtime, cache=cache_dir)


# --------------------------------------------------------------------------
# A staprun stand-in that records what it was given
# --------------------------------------------------------------------------

@pytest.fixture
def staprun(tmp_path):
    """(env, record prefix): set env to make stap-client use the stand-in."""
    d = tempfile.mkdtemp(prefix="staprun.")
    os.chmod(d, 0o777)
    script = copy_program("staprun_record.sh", os.path.join(d, "staprun"))
    record = os.path.join(d, "rec")
    yield {"SYSTEMTAP_STAPRUN": script, "STAPRUN_RECORD": record}, record
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# Tiers: every test says which it is
# --------------------------------------------------------------------------

UNIT_LINE = "pytestmark = pytest.mark.unit"


def tier_markers(config):
    """The markers setup.cfg declares as tiers (their description starts with "tier:")."""
    declared = (line.split(":", 1) for line in config.getini("markers"))
    return {name.strip() for name, *about in declared
            if about and about[0].strip().startswith("tier:")}


def pytest_collection_modifyitems(config, items):
    """A test file without its tier (pytestmark = pytest.mark.TIER) fails the collection:
    `make test-unit` and `-m` select by tier, and an unmarked test would silently fall out.  A
    unit file says so in the one line `make test-unit` looks for, which imports no other file."""
    tiers = tier_markers(config)
    wrong = sorted({item.location[0] for item in items
                    if len({m.name for m in item.iter_markers()} & tiers) != 1
                    or item.get_closest_marker("unit") and UNIT_LINE not in
                    item.path.read_text().splitlines()})
    if wrong:
        raise pytest.UsageError(f"name one tier ({', '.join(sorted(tiers))}) with pytestmark "
                                f"(a unit file in the line {UNIT_LINE!r}) in: {', '.join(wrong)}")
