#!/usr/bin/python3
"""Where our server's time for one request goes, measured in-process.

    python3 bench/server_phases.py KREL RT SCRIPT PASS REPS -- [stap-serverd options]

Runs stap_server.CompileService.handle() (no TLS) REPS times on the request that
`stap-client -r KREL -pPASS SCRIPT` would send, with timing wrappers around
its phases, and prints one JSON object: median milliseconds per phase.
Uses the environment's STAP_SYSCONFDIR / SYSTEMTAP_DIR (the server database
of a sandbox whose server already started once).  Imports the modules as
they are now; changes nothing in them.
"""

import functools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import stap_client as client  # noqa: E402
import stap_server as server  # noqa: E402

TIMES = {}


def wrap(module, name, label=None):
    fn = getattr(module, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES.setdefault(label or name, []).append((time.perf_counter() - t) * 1000)

    setattr(module, name, timed)


def main(argv):
    sep = argv.index("--")
    krel, rt, script, p, reps = argv[:sep]
    srv_opts = argv[sep + 1:]
    cfg_argv = ["--listen", "127.0.0.1", "-r", krel, "--result-cache-size", "0"]  # stap each round
    cfg_argv += (["-R", rt] if rt else []) + srv_opts
    config = server.parse_config(cfg_argv)
    inv = client.parse_stap_args(["-r", krel, f"-p{p}", script])
    data, _ = client.build_request(inv)
    version = server.stap_version()
    client.open_databases([config.db])
    credentials = server.Credentials(server.newest_certificate(config.db))
    wrap(client, "extract_archive", "unpack (extract_archive)")
    wrap(server, "parse_request")
    wrap(server, "run_compile", "run_compile (stap in the sandbox, as the compile account)")
    wrap(server, "reply_for_client")
    wrap(server, "signed_reply", "signed_reply (zip + JAR signature, in-process)")
    wrap(server, "result_key")
    wrap(server.subprocess, "Popen", "  subprocess.Popen() calls (fork+exec, all)")
    totals = []
    service = server.CompileService(config, credentials, version)
    for _ in range(int(reps) + 1):
        record = server.RequestRecord()
        t = time.perf_counter()
        service.handle(server.Admission.READ, data, record)
        totals.append((time.perf_counter() - t) * 1000)
    # the first round is a warm-up
    out = {"CompileService.handle total": statistics.median(totals[1:])}
    for k, v in TIMES.items():
        per = len(v) // (int(reps) + 1) or 1
        rounds = [sum(v[i * per:(i + 1) * per]) for i in range(1, int(reps) + 1)]
        out[k] = statistics.median(rounds) if rounds else statistics.median(v)
    out["rc"] = record.rc
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
