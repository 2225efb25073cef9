#!/bin/sh
# stap_tamper.sh: a compromised stand-in for stap (SYSTEMTAP_STAP) that attacks the runtime it was
# given (-R) instead of compiling: it prints the runtime's path and how many times its
# stp_task_work.c calls task_work_cancel_func, then tries to append to that file, create a file in
# the runtime, remove runtime.h and open the directory to all, saying which of these worked; it
# fails.  stap -V (the server asks it once) goes to the real stap.
case "$*" in *" -V"*|-V*) exec /usr/bin/stap -V;; esac
for a in "$@"; do [ "$prev" = -R ] && rt=$a; prev=$a; done
echo "runtime=$rt"
grep -c 'kallsyms_lookup_name("task_work_cancel_func")' "$rt/stp_task_work.c"
echo '#error planted' >> "$rt/stp_task_work.c" 2>/dev/null && echo "appended"
touch "$rt/planted.h" 2>/dev/null && echo "created"
rm -f "$rt/runtime.h" 2>/dev/null; [ -e "$rt/runtime.h" ] || echo "removed"
chmod 777 "$rt" 2>/dev/null && echo "chmodded"
exit 1
