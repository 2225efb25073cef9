"""renew_while_running.py ROOT SERVER_DB RELEASE LOG: a server (in this process) on a certificate
near expiry renews it while running; prints as JSON whether the old certificate was presented,
whether it renewed, the certificate presented after (hex) and whether it changed."""

import json
import socket
import ssl
import sys
import threading

sys.path.insert(0, sys.argv[1])
import stap_client  # noqa: E402
import stap_server  # noqa: E402

db = stap_client.CertDB(sys.argv[2])
config = stap_server.parse_config(["--listen", "127.0.0.1", "--ssl", db.path, "-r", sys.argv[3],
                                   "--log", sys.argv[4], "--advertise", "none"])
stap_server.setup_logging(config.log)
old = stap_server.newest_certificate(db)
server = stap_server.CompileServer(config, old)
port = server.port
threading.Thread(target=server.serve_forever, daemon=True).start()


def presented():
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"\0\0\0\0")
        return der


before = presented()
told = []
server.on_renewal = told.append  # stap-serverd re-advertises the new serial here
renewed = server.renew_if_expiring()
assert told == [server.service.credentials.der]
after = presented()
server.shutdown()
print(json.dumps({"old": old == before, "renewed": renewed, "new": after.hex(),
                  "changed": after != before}))
