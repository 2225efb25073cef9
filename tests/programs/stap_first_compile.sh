#!/bin/sh
# stap_first_compile.sh: a stand-in for stap (SYSTEMTAP_STAP), the real stap, which for a request
# whose arguments say PLANT or LOOK first says whether its cache ($SYSTEMTAP_DIR) was given the
# kernel's knowledge (stapconf headers) and whether it holds the planted BOGUS; after a PLANT
# compile it overwrites the stapconf headers it made with a BOGUS one of its own.
case "$*" in
  *PLANT*|*LOOK*) ;;
  *) exec /usr/bin/stap "$@" ;;
esac
if ls "$SYSTEMTAP_DIR"/cache/*/stapconf_*.h >/dev/null 2>&1; then echo "given knowledge"
else echo "given no knowledge"; fi
grep -rqs BOGUS "$SYSTEMTAP_DIR" && echo "given the planted knowledge"
/usr/bin/stap "$@" || exit 1
case "$*" in *PLANT*)
  for f in "$SYSTEMTAP_DIR"/cache/*/stapconf_*.h; do
    printf '#define BOGUS 1\n' > "$f" && echo planted
  done
esac
