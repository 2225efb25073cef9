"""raw_client.py HOST PORT CAFILE < REQUEST > REPLY: a minimal protocol client (Python's ssl
module, nothing of ours): connect, check the peer against the one certificate given (PEM), send
the 4-byte big-endian size and the request, read the reply to EOF."""

import socket
import ssl
import sys

host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
request = sys.stdin.buffer.read()
ctx = ssl.create_default_context(cafile=cafile)
ctx.check_hostname = False
with socket.create_connection((host, port), timeout=120) as raw, ctx.wrap_socket(raw) as tls:
    tls.sendall(len(request).to_bytes(4, "big") + request)
    chunks = []
    while True:
        try:
            chunk = tls.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
sys.stdout.buffer.write(b"".join(chunks))
