#!/bin/sh
# stap_slow_warm_up.sh: a stand-in for stap (SYSTEMTAP_STAP), a slow compiler for the server's
# knowledge warm-up (its script, alone, is the last argument): it writes half a stapconf header
# into its own cache, takes a minute and gives up.  Requests get the real stap.
case "$*" in
  *"-e probe begin { exit() }") ;;
  *) exec /usr/bin/stap "$@" ;;
esac
mkdir -p "$SYSTEMTAP_DIR/cache/00"
printf '#define STAPCONF_HALF' > "$SYSTEMTAP_DIR/cache/00/stapconf_0123456789abcdef_1.h"
sleep 60
echo "stap-standin: gave up" >&2
exit 1
