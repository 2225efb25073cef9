#!/bin/sh
# stap_unit_whoami.sh: a stand-in for stap (SYSTEMTAP_STAP) in test_packaging's chroot, where the
# packaged unit's server runs: the real stap, except that a compile whose arguments say WHOAMI
# prints the account it runs as, its capabilities and whether it can read the server's key.
case "$*" in
  *WHOAMI*) echo "compile_user=$(id -un)"
            echo "compile_caps=$(awk '/^Cap(Prm|Eff|Amb):/ {print $2}' /proc/self/status |
                                 paste -sd,)"
            cat /var/lib/stap-server/.systemtap/ssl/server/key4.db > /dev/null 2>&1 &&
                echo compile_key=read || echo compile_key=unreadable ;;
  *) exec /usr/bin/stap "$@" ;;
esac
