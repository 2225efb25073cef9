#!/bin/sh
# staprun_record.sh: a stand-in for staprun (SYSTEMTAP_STAPRUN, or "staprun" on a minimal host's
# PATH) where the kernel would load a module: records its arguments, the module it was given and
# its working directory under the prefix $STAPRUN_RECORD, then exits with $STAPRUN_RC (default 0).
rec="${STAPRUN_RECORD:?}"
printf '%s\n' "$@" > "$rec.args"
for a in "$@"; do case "$a" in *.ko) /bin/cp "$a" "$rec.ko";; esac; done
pwd > "$rec.cwd"
exit "${STAPRUN_RC:-0}"
