#!/bin/sh
# staprun_trap.sh: a stand-in for staprun (SYSTEMTAP_STAPRUN) that writes "started" to
# $STAPRUN_RECORD.started and waits for a signal (30 s at most, then exits 9); on SIGTERM or SIGINT
# it records which one in $STAPRUN_RECORD.sig and exits 0, as staprun does.
trap 'echo TERM > "$STAPRUN_RECORD.sig"; exit 0' TERM
trap 'echo INT > "$STAPRUN_RECORD.sig"; exit 0' INT
echo started > "$STAPRUN_RECORD.started"
i=0
while [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
exit 9
