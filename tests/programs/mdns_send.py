"""mdns_send.py: send one datagram to the multicast DNS group."""

import socket

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"hello", ("224.0.0.251", 5353))
