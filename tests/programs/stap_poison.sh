#!/bin/sh
# stap_poison.sh: a compromised stand-in for stap (SYSTEMTAP_STAP, a compiler bug), the real stap
# except for a request whose arguments say "POISON TROJAN" (a comment in its script): then it
# writes TROJAN into every tracepoint query file it can find, through links too, and into the
# directories holding them, says what worked and how many it found, and fails.
trojan=$(expr "$*" : '.*POISON \([^ *]*\)') || exec /usr/bin/stap "$@"
find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -name 'tracequery_*' -print \
     2>/dev/null > /tmp/found
while read -r p; do
  for q in "$p" "$(readlink -f "$p")"; do
    printf '%s' "$trojan" > "$q" 2>/dev/null && echo "overwrote $q"
    printf '%s' "$trojan" >> "$q" 2>/dev/null && echo "appended to $q"
    chmod 0666 "$q" 2>/dev/null && echo "chmod $q"
    printf '%s' "$trojan" > "$(dirname "$q")/stap_planted.o" 2>/dev/null && echo "planted by $q"
  done
done < /tmp/found
echo "found $(wc -l < /tmp/found)"
exit 1
