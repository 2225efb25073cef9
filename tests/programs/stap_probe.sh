#!/bin/sh
# stap_probe.sh: a stand-in for stap (SYSTEMTAP_STAP) that reports what its compile can see and do
# instead of compiling: for each PATH, absent or what it holds and whether it can be written; its
# uid and capabilities, how many processes it sees, whether it reaches 127.0.0.1:PORT, whether
# the root file system, /usr and its work directory can be written.  PORT and the PATHs are the
# words after STANDIN in its arguments (a comment in the -e script of the test's request).
# stap -V (the server asks it once) goes to the real stap.
case "$*" in *" -V"*|-V*) exec /usr/bin/stap -V;; esac
report() {  # PATH: absent, or what it holds and whether it can be written
  p=$1
  if [ ! -e "$p" ] && [ ! -L "$p" ]; then echo "probe $p absent"; return; fi
  if [ -d "$p" ]; then n=$(ls -A "$p" 2>/dev/null | wc -l); what="entries=$n"
       w=$( (touch "$p/.probe" 2>/dev/null && echo write=yes) || echo write=no)
  else n=$(cat "$p" 2>/dev/null | wc -c); what="bytes=$n"
       w=$( (: >> "$p" 2>/dev/null && echo write=yes) || echo write=no); fi
  echo "probe $p $what $w"
}
set -- $(expr "$*" : '.*STANDIN \([^*]*\)')
port=${1:-0}
[ $# -eq 0 ] || shift
for p in "$@"; do report "$p"; done
echo "uid=$(id -u)"
echo "capabilities=$(awk '/^Cap(Prm|Eff|Amb):/ {print $2}' /proc/self/status | paste -sd,)"
echo "pids=$(ls /proc | grep -c '^[0-9]')"
if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", sys.argv[1]), 2)' \
     "$port" 2>/dev/null
then echo network=yes; else echo network=no; fi
( : > /stap-probe-root ) 2>/dev/null && echo rootfs=writable || echo rootfs=readonly
( : > /usr/stap-probe ) 2>/dev/null && echo usr=writable || echo usr=readonly
( : > "$PWD/tmp/probe" ) && echo work=writable
