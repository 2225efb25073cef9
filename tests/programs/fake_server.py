"""fake_server.py SERVER_DB REPLY_FILE ROOT: a TLS server (python-nss, in a process of its own:
NSS state is per process) with the database's server key on 127.0.0.1; prints its port, reads
one request, prints "request SIZE" and answers with the reply file's bytes as they are."""

import socket
import sys

sys.path.insert(0, sys.argv[3])
import stap_client  # noqa: E402

nss, ssl, nio, nerror = stap_client.nss_modules()
db = stap_client.CertDB(sys.argv[1])
nss.nss_init(db.spec)
ssl.set_domestic_policy()
ssl.config_server_session_id_cache()  # without it NSS dies of SIGFPE
with open(db.path + "/" + stap_client.SERVER_CERT_FILE, "rb") as f:
    der = f.read()
cert = nss.find_cert_from_nickname(stap_client.SERVER_NICKNAME)
assert bytes(cert.der_data) == der
key = nss.find_key_by_any_cert(cert)
with open(sys.argv[2], "rb") as f:
    reply = f.read()
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4)
listener.settimeout(30)
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
sock = ssl.SSLSocket.import_tcp_socket(conn.detach())
sock.set_ssl_option(ssl.SSL_SECURITY, True)
sock.set_ssl_option(ssl.SSL_HANDSHAKE_AS_SERVER, True)
sock.set_ssl_version_range("tls1.2", "tls1.3")
sock.config_secure_server(cert, key, cert.find_kea_type())
sock.reset_handshake(True)
sock.force_handshake_timeout(stap_client.nss_interval(10))
head = b""
while len(head) < 4:
    head += sock.recv(4 - len(head), stap_client.nss_interval(10))
size, got = int.from_bytes(head, "big", signed=True), 0
while got < size:
    got += len(sock.recv(min(65536, size - got), stap_client.nss_interval(10)))
print("request", size, flush=True)
sock.sendall(reply, stap_client.nss_interval(10))
sock.shutdown(nio.PR_SHUTDOWN_BOTH)
sock.close()
