# Ported from systemtap testsuite/systemtap.server/server_req_size.exp (cases reimplemented).
"""systemtap's server_req_size.exp: a server started with
`--max-compressed-request 10` or `--max-request-size 10` (bytes) refuses an
ordinary request, and its log says why: " request file is too large" for
the first, "Uncompressed request size of" for the second.  Upstream checks
only the log (not the client's exit status), after running hello.stp
through the server; so does this port, for requests of the real client and
of ours, with the real stap-serverd 4.8 started the same way as reference.

Adaptations (see upstream_helpers): `-r KREL`; the server named by
HOST:PORT; hello.stp's pass 5 becomes -p4 (the request is refused before
any pass anyway)."""

import os

import pytest
from upstream_helpers import REAL_SERVERD, STAP, Pairings, need_tools, write_scripts

pytestmark = pytest.mark.upstream

LIMITS = {"--max-compressed-request": " request file is too large",
          "--max-request-size": "Uncompressed request size of"}


@pytest.fixture(scope="module", params=list(LIMITS))
def limited(request, krel, runtime, cache_dir, shared_dir):
    """Our server and the real one, both started with OPTION 10."""
    need_tools(STAP, REAL_SERVERD, "unshare", "nsenter", "setpriv", "ss", "certutil")
    option = request.param
    p = Pairings(krel, runtime, cache_dir, shared_dir, ours=(option, "10"), real=(option, "10"))
    yield option, p
    p.close()


@pytest.mark.parametrize("pairing", ["real-client", "our-client", "real-server"])
def test_request_size_limit(limited, pairing, krel):
    option, pairings = limited
    hello = os.path.join(write_scripts(os.path.join(pairings.top, "scripts")), "hello.stp")
    before = len(pairings.server_log(pairing))
    proc = pairings.run(pairing, ["-r", krel, "-p4", hello], server_last=True, timeout=120)
    log = pairings.server_log(pairing)[before:]
    assert LIMITS[option] in log, (f"{option} 10: the server's log does not say "
                                   f"{LIMITS[option]!r}:\n{log}\n--- client:\n{proc.stderr}")
