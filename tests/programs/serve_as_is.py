"""serve_as_is.py ROOT SERVER_DB RELEASE LOG: a server (in this process) on the database's
certificate as it is, expired or not; prints its port, serves until stdin closes."""

import sys
import threading

sys.path.insert(0, sys.argv[1])
import stap_client  # noqa: E402
import stap_server  # noqa: E402

db = stap_client.CertDB(sys.argv[2])
config = stap_server.parse_config(["--listen", "127.0.0.1", "--ssl", db.path, "-r", sys.argv[3],
                                   "--log", sys.argv[4], "--advertise", "none"])
server = stap_server.CompileServer(config, stap_server.newest_certificate(db))
print(server.port, flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
