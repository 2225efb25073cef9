#!/bin/sh
# stap_slow.sh: a stand-in for stap (SYSTEMTAP_STAP, copied by hardening_helpers.stand_in_program)
# that compiles with the real stap, but first sleeps SECONDS when its arguments say
# "SLOWPROBE SECONDS" (a comment in the -e script of a test's request): a compile that holds its
# slot for as long as the test needs.  stap -V (the server asks it once) goes to the real stap.
case "$*" in *" -V"*|-V*) exec /usr/bin/stap -V;; esac
seconds=$(expr "$*" : '.*SLOWPROBE \([0-9][0-9]*\)')
[ -z "$seconds" ] || sleep "$seconds"
exec /usr/bin/stap "$@"
