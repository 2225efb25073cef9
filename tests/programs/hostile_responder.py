"""hostile_responder.py: a multicast DNS responder for one hostile advertisement, on the
loopback interface of the network namespace it runs in.  It prints "ready", then answers every
query (unicast, to the asker's port) with the PTR, SRV, TXT and A records of an instance whose
name, host name and TXT values carry terminal controls."""

import socket

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.SRV import SRV

IN = dns.rdataclass.IN
service = dns.name.from_text("_stap._tcp.local.")
instance = dns.name.Name((b"Evil\x1b[2J server",) + service.labels)
host = dns.name.Name((b"evil\x1b[2Jhost", b"local", b""))
txt = [b"sysinfo=6.1.0-99-amd64\x1b[1A\xc2\x9b31m\xe2\x80\xae x86_64",
       b"version=4.8\x1b[2J\x1b[H\x07",
       b"certinfo=01:02\r\nh 10.0.0.1 1 'sysinfo=x' 'trust=ssl,signer'\x1b[K",
       b"optinfo=\x7f\x9b", b"e\x1bvil=\x00x"]
records = [(service, PTR(IN, dns.rdatatype.PTR, instance)),
           (instance, SRV(IN, dns.rdatatype.SRV, 0, 0, 5555, host)),
           (instance, TXT(IN, dns.rdatatype.TXT, txt)),
           (host, A(IN, dns.rdatatype.A, "127.0.0.1"))]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", 5353))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                socket.inet_aton("224.0.0.251") + socket.inet_aton("127.0.0.1"))
print("ready", flush=True)
while True:
    wire, source = sock.recvfrom(9000)
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        continue
    if query.flags & dns.flags.QR or source[1] == 5353:
        continue
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.AA
    for name, rdata in records:
        reply.answer.append(dns.rrset.from_rdata(name, 120, rdata))
    sock.sendto(reply.to_wire(), source)
