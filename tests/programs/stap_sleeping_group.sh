#!/bin/sh
# stap_sleeping_group.sh: the real stap (SYSTEMTAP_STAP), except that a compile whose arguments say
# SLOWPROBE sleeps in the background and waits for it: two processes of one group, both with
# STAP_TEST_MARK set to this file's path in their environment, so that test_faults finds them from
# outside the sandbox (the sandbox shows the file at the same path).
for a in "$@"; do
  case "$a" in
    *SLOWPROBE*)
      STAP_TEST_MARK="$0" exec /bin/sh -c 'sleep 60 & wait; exit 0';;
  esac
done
exec /usr/bin/stap "$@"
