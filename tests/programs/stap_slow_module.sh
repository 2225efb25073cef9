#!/bin/sh
# stap_slow_module.sh: a stand-in for stap (SYSTEMTAP_STAP) whose compile takes 0.6 s to write a
# module of random bytes (tmp/stap_real.ko) and names it: time for an attacker to swap names in
# the request directory meanwhile.  stap -V (the server asks it once) goes to the real stap.
case "$*" in *" -V"*|-V*) exec /usr/bin/stap -V;; esac
sleep 0.3
head -c 4096 /dev/urandom > tmp/stap_real.ko
sleep 0.3
echo "$PWD/tmp/stap_real.ko"
