#!/bin/sh
# stap_breaches.sh: a stand-in for stap (SYSTEMTAP_STAP) whose compile goes over the resource
# limit its arguments name (FILE_SIZE, MEMORY, PROCESSES, CPU or DISK, a comment in the -e script of
# the test's request), then fails.  stap -V (the server asks it once) goes to the real stap.
case "$*" in *" -V"*|-V*) exec /usr/bin/stap -V;; esac
case "$*" in
  *FILE_SIZE*) head -c 3000000 /dev/zero > tmp/big ;;
  *MEMORY*) python3 -c 'bytearray(600 << 20)' ;;
  *PROCESSES*) for i in $(seq 40); do sleep 3 & done; wait ;;
  *CPU*) while :; do :; done ;;
  *DISK*) for i in $(seq 60); do head -c 900000 /dev/zero > tmp/f$i; sleep 0.05; done ;;
esac
exit 1
