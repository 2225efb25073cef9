# Ported from systemtap testsuite/systemtap.server/server_concurrency.exp (cases reimplemented).
"""systemtap's server_concurrency.exp: a server started with --max-threads 6
takes six -p4 requests at once (three scripts, each sent twice) and its log
says "Processing 6 concurrent requests...".  Upstream waits for the six
clients (up to 180 s each) and checks only that log line, not their exit
status: the scripts probe module("acpi*"), module("amd*") and module("dm-*")
functions, which need the modules' debuginfo.  Here there is none, so each
compile ends in pass 2 within a second; the six still overlap on the server,
which is what the log line is about.

Run with six real clients and with six of ours against our server, and with
six real clients against the real stap-serverd 4.8 (--max-threads 6).
Adaptations (see upstream_helpers): `-r KREL`; the server named by
HOST:PORT (upstream reads the port from the log's "Using network address"
line, ours prints it in its status file)."""

import os
import subprocess

import pytest
from upstream_helpers import REAL_SERVERD, STAP, Pairings, need_tools

pytestmark = pytest.mark.upstream

SCRIPTS = {
    "server_concurrency1.stp": 'probe module("acpi*").function("*") {\n  printf("hello");\n'
                               '  exit();\n}\n',
    "server_concurrency2.stp": 'probe module("amd*").function("*") {\n  printf("hello");\n'
                               '  exit();\n}\n',
    "server_concurrency3.stp": 'probe module("dm-*").function("*") {\n  printf("hello");\n'
                               '  exit();\n}\n',
}
ORDER = ["server_concurrency1.stp", "server_concurrency2.stp", "server_concurrency3.stp"] * 2


@pytest.fixture(scope="module")
def six(krel, runtime, cache_dir, shared_dir):
    need_tools(STAP, REAL_SERVERD, "unshare", "nsenter", "setpriv", "ss", "certutil")
    p = Pairings(krel, runtime, cache_dir, shared_dir, ours=("--max-threads", "6"),
                 real=("--max-threads", "6"))
    top = os.path.join(p.top, "scripts")
    os.makedirs(top)
    for name, text in SCRIPTS.items():
        with open(os.path.join(top, name), "w") as f:
            f.write(text)
    yield p, top
    p.close()


@pytest.mark.parametrize("pairing", ["real-client", "our-client", "real-server"])
def test_six_concurrent_requests(six, pairing, krel):
    pairings, top = six
    before = len(pairings.server_log(pairing))
    clients = [subprocess.Popen(pairings.argv(pairing, ["-r", krel, "-p4",
                                                        os.path.join(top, name)]),
                                env=pairings.env(pairing), cwd=pairings.workdir(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
               for name in ORDER]
    for c in clients:
        c.wait(180)
    log = pairings.server_log(pairing)[before:]
    assert "Processing 6 concurrent requests..." in log, log
