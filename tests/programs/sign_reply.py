"""sign_reply.py ROOT SERVER_DB < repr((rc, stderr, module)) > REPLY: a reply signed by the
database's server key (module: the bytes of stap_fake.ko, or None for no module)."""

import ast
import sys

sys.path.insert(0, sys.argv[1])
import stap_client  # noqa: E402
import stap_server  # noqa: E402

rc, stderr, module = ast.literal_eval(sys.stdin.read())
db = stap_client.CertDB(sys.argv[2])
stap_client.open_databases([db])
key = stap_server.ServerKey(stap_server.newest_certificate(db))
sys.stdout.buffer.write(stap_server.signed_reply(key, stap_client.ReplyContent(
    rc, b"", stderr, "4.8", module and ("stap_fake.ko", module))))
