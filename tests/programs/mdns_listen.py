"""mdns_listen.py ADDRESS: join the multicast DNS group on the interface of ADDRESS, print
"joined", then the source address of the first datagram to the group's port (10 s at most)."""

import socket
import struct
import sys

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("224.0.0.251", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton(sys.argv[1])))
print("joined", flush=True)
s.settimeout(10)
print(s.recvfrom(100)[1][0], flush=True)
