#!/bin/sh
# stap_whoami.sh: a stand-in for stap (SYSTEMTAP_STAP) whose compile prints the account it runs as:
# "uid=UID gid=GID home=HOME".  stap -V (the server asks it once) goes to the real stap.
case "$*" in *-V*) exec stap -V;; esac
echo "uid=$(id -u) gid=$(id -g) home=$HOME"
