"""advertise.py ROOT OFFER: advertise one server on the link as the server does (the first of its
LINK_PUBLISHERS that publishes: avahi, else our own mDNS responder), with OFFER a JSON object of
port, sysinfos, version, certinfo and optinfo.  Prints as JSON the mode, the instance names and
the seconds it took, then withdraws the advertisement when stdin closes and prints "stopped".
test_discovery_harness runs it inside a host of its network."""

import json
import sys
import time

sys.path.insert(0, sys.argv[1])
import stap_client as client  # noqa: E402
import stap_server as server  # noqa: E402

cfg = json.loads(sys.argv[2])
offer = server.Offer(cfg["port"], cfg["sysinfos"], cfg["version"], cfg["certinfo"],
                     cfg.get("optinfo", ""))
started = time.monotonic()
mode, adv = client.first_answering(server.LINK_PUBLISHERS, lambda make: make(offer).start())
print(json.dumps({"mode": mode, "names": adv.names, "seconds": time.monotonic() - started}),
      flush=True)
sys.stdin.read()  # until the test closes our stdin
adv.stop()
print("stopped", flush=True)
