"""find_servers.py ROOT ARGS: the client's find_servers(**ARGS) (ARGS a JSON object of its keyword
arguments) in this process; prints as JSON the seconds it took, the records found and the lines
stap-find-servers would print for them.  test_discovery_harness runs it inside a host of its
network."""

import json
import sys
import time

sys.path.insert(0, sys.argv[1])
import stap_client as client  # noqa: E402

args = json.loads(sys.argv[2])
started = time.monotonic()
records = client.find_servers(**args)
seconds = time.monotonic() - started
print(json.dumps({"seconds": seconds,
                  "records": [r._asdict() for r in records],
                  "lines": [client.format_server_line(r) for r in records]}))
