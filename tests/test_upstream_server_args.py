# Ported from systemtap testsuite/systemtap.server/server_args.exp (cases reimplemented).
"""systemtap's server_args.exp: awkward argument strings (quotes, backslashes,
semicolons, newlines, "-I /") give through a compile server what the same
stap gives locally.

Upstream, for each argument string:
- If it names "/" as an -I directory, the client must refuse to send "/" and
  say "Unable to send / to the server" (unless an earlier option error,
  "ERROR: Safety pattern mismatch for -X parameter", comes first: then it
  falls through to the comparison below).
- Otherwise `stap OPTIONS` and `stap --use-server OPTIONS` are run through
  Tcl's `catch {exec ...} result`, and the client's result must match the
  local one line by line, where a server's names are allowed for a few kinds
  of line: a file under `script.../` for "Input file '...' is [empty or]
  missing.", a tapset/runtime path on a 14-space continuation line, a
  `stap_NNN` module name, `/path/stap: ...` for `stap: ...`, and the
  certificate host-name warning with its indented host lines skipped.  The
  local result must be used up; the client may print more after it.

Cases: the 30 "previously fixed" strings (their argv as Tcl hands them to
exec, decoded with tclsh: upstream's test data), then random strings built
like upstream's: Tcl's `expr srand(SEED)`, then for each of -I -e -D -c -S
int(rand()*10) characters drawn with int(rand()*46) from upstream's pool.
Tcl's generator is reimplemented below (Park-Miller "minimal standard",
Schrage's method) from Tcl's generic/tclBasic.c (ExprRandFunc,
ExprSrandFunc); test_tcl_generator_matches_tclsh checks it against tclsh.
Upstream seeds from the clock (or $STAP_RANDOM_SEED) and runs 10 strings;
here SEEDS are fixed and each case is named seedN-iterI.  All runs of all
cases are made four at a time up front (the module fixture `outcomes`).

Adaptations (see upstream_helpers): `-r KREL` comes first on every command
line (local stap too, so both sides stay comparable); the server is named
by HOST:PORT; our client's refusal of "/" is its own one-line error
("stap-client: ERROR: unable to send / to the server: ..."), which is
accepted in place of the real client's wording; our client takes
--server=HOST:PORT first (its syntax), the real client gets --use-server
where upstream puts it.  Lines equal to the machine's "Kernel function
symbol table missing" warning are dropped on both sides."""

import os
import re
import shutil
import subprocess
import threading

import pytest
from upstream_helpers import (  # noqa: F401  (pairings, pairing: fixtures)
    PAIRINGS,
    STAP,
    TIMEOUT,
    pairing,
    pairings,
    run_all,
    tcl_exec_result,
    without_ksym_warning,
)

pytestmark = pytest.mark.upstream

# Fuzz seeds and iterations (upstream: one seed from the clock, 10 iterations).
SEEDS = (1, 2, 3, 4, 5)
ITERATIONS = 10

# The argument pool of upstream's fuzzing, in order (46 characters).
POOL = "0123456789/;*'=-\\\"\n abcdefghijklmnopqrstuvwxyz"
FUZZED_OPTIONS = ("-I", "-e", "-D", "-c", "-S")

# Upstream's "previously fixed" argument strings, as argv (upstream numbers 0-29).
PREVIOUSLY_FIXED = [
    ["-p1", "-I=\\w94\nbh", "-e", "-Dhfuo0iu7", "-c"],
    ["-p1", "-I8o\\2ie", "-e'1\\", '-D\n"', "-c"],
    ["-p1", "-Ira\\3;c", "g", "-e0fle'qq", "-Dr/316k\\o8", "-cjyoc\n3"],
    ["-p1", "-I6p3", "-elc", "-Dqgsgv'", "-c"],
    ["-p1", '-I"vyv;z', '-ej"/3', "-D/", "01qck\n", "-c3u55zut"],
    ["-p1", "-I1", "-eo9e\nx047q", "-D9xyefk0a", "-cvl98/x1'i"],
    ["-p1", "-c;", "test.stp"],
    ["-p1", "-I4hgy96", "-e5oo39p", "-Ddx8v", "-c4;"],
    ["-p1", "-I", "-esq3wors", "-Dz", "-c*eibz8h2e"],
    ["-p1", "-I", "a", "-em339db5", "-Du2;c0ps", "-ch9o\\"],
    ["-p1", "-Ipfjps4", "-ebug4dc", "-Du8vd", "fvkl", "-c"],
    ["-p1", '-I0"nspzjyf', "-e5r3up8h", "-Dmi;ojp9m", "-cx;a2fat"],
    ["-p1", "-Iu", "-ek7;r", '-Dcu";', '-c"hc'],
    ["-p1", "-Icd4fidq", "m40mv", "-edn", "-D;8ha\\cjr", "-c1*vnq"],
    ["-p1", "-I;3", "-er8e", "-D", "-cb6k29z"],
    ["-p1", "-Ircj", "-e", "-D", "-c\\vmww"],
    ["-p1", "-Illc5", "-e65wof9", "qr*=x7x5", "-D", "-cgx;"],
    ["-p1", "-Iyaj420=3", '-e"', "-D", "-cd'5mi"],
    ["-p1", "-Ir", "-e", "-D29\\", "-cj2szt;4"],
    ["-p1", "-Ibno3=b4sk", "-e'", "-Dg2-j;e", "-c2ijx'"],
    ["-p1", "-I285v7pl", "-eo5\\0", "-D86s", "-c-c*v"],
    ["-l", "syscall.open*", "--", "-p5"],
    ["-l", "syscall.open*", "--", "-rfoo"],
    ["-p1", "-I/", "1\\nbzg3", "-ebf", "-Do", "-ckrll=\\;oh", "-S4"],
    ["-p1", "-I", "/", "1\\nbzg3", "-ebf", "-Do", "-ckrll=\\;oh", "-S4"],
    ["-p1", "1\\nbzg3", "-ebf", "-Do", "-ckrll=\\;oh", "-S4", "-I/"],
    ["-p1", "1\\nbzg3", "-ebf", "-Do", "-ckrll=\\;oh", "-S4", "-I", "/"],
    ["-p1", "-I", "-e\\;/", "-Dhn6", "-cejijqmi0", "-S3-k", "-"],
    ["-p1", "-I/", "-e/", "-D", "-c\\n1v\\;nd8", "-S--"],
    ["-p1", "-I/", "-e0xzu", "-Dxrk", "-c*sum8fe", "-St546jn"],
]


# --------------------------------------------------------------------------
# Tcl's random numbers and the fuzzed argument strings
# --------------------------------------------------------------------------

class TclRandom:
    """Tcl 8.x `expr srand(N)` / `rand()`: seed = 16807 * seed mod (2^31 - 1)
    by Schrage's method (127773 = (2^31 - 1) div 16807, 2836 = its remainder),
    rand() = seed / (2^31 - 1).  srand(N) keeps the low 31 bits of N (0 and
    2^31 - 1 are moved by xor with 123459876) and itself draws one number,
    as Tcl's ExprSrandFunc does by calling the rand function."""

    M, A, Q, R = 2147483647, 16807, 127773, 2836

    def __init__(self, seed):
        self.seed = seed & 0x7FFFFFFF
        if self.seed in (0, 0x7FFFFFFF):
            self.seed ^= 123459876
        self.rand()  # srand() returns a first random number

    def rand(self):
        hi, lo = divmod(self.seed, self.Q)
        self.seed = self.A * lo - self.R * hi
        if self.seed < 0:
            self.seed += self.M
        return self.seed * (1.0 / self.M)


def fuzzed_strings(seed, iterations):
    """upstream's option strings for one seed, in order."""
    rng = TclRandom(seed)
    out = []
    for _ in range(iterations):
        options = "-p1"
        for option in FUZZED_OPTIONS:
            options += " " + option
            for _ in range(int(rng.rand() * 10)):
                options += POOL[int(rng.rand() * len(POOL))]
        out.append(options)
    return out


def tcl_words(options):
    """The argv Tcl's `eval exec stap $options` gives stap once upstream has
    quoted '"', '\\', ';' and newlines: the string split at spaces (the pool
    holds no other character Tcl treats specially)."""
    return [w for w in options.split(" ") if w]


def names_root_tapset(options):
    """upstream: -I followed by '/' at the end of the string or before a space."""
    return bool(re.search(r"-I */$", options) or re.search(r"-I */ ", options))


CASES = [(f"fixed-{n:02d}", argv, names_root_tapset(" ".join(argv)))
         for n, argv in enumerate(PREVIOUSLY_FIXED)]
CASES += [(f"seed{seed}-iter{i}", tcl_words(s), names_root_tapset(s))
          for seed in SEEDS for i, s in enumerate(fuzzed_strings(seed, ITERATIONS))]


def test_tcl_generator_matches_tclsh():
    """What was verified: our generator gives tclsh's strings for our seeds
    (and a few awkward ones), and the pool is upstream's 46 characters."""
    tclsh = shutil.which("tclsh")
    if not tclsh:
        pytest.skip("tclsh is not installed: cannot cross-check the generator")
    assert len(POOL) == 46
    script = (
        "set pool [lindex $argv 0]\n"
        "foreach seed [lrange $argv 1 end] {\n"
        "  expr srand($seed)\n"
        f"  for {{set i 0}} {{$i < {ITERATIONS}}} {{incr i}} {{\n"
        "    set s -p1\n"
        f"    foreach o {{{' '.join(FUZZED_OPTIONS)}}} {{\n"
        '      append s " $o"\n'
        "      set k [expr {int(rand() * 10)}]\n"
        "      for {set c 0} {$c < $k} {incr c} {\n"
        "        append s [string index $pool [expr {int(rand() * [string length $pool])}]]\n"
        "      }\n"
        "    }\n"
        "    puts [binary encode hex [encoding convertto utf-8 $s]]\n"
        "  }\n"
        "}\n")
    seeds = list(SEEDS) + [0, 2147483647, 1700000000]
    out = subprocess.run([tclsh, "/dev/stdin", POOL, *map(str, seeds)], input=script,
                         text=True, capture_output=True, timeout=30, check=True)
    got = [bytes.fromhex(l).decode() for l in out.stdout.split()]
    assert got == [s for seed in seeds for s in fuzzed_strings(seed, ITERATIONS)]


# --------------------------------------------------------------------------
# upstream's comparison of the client's output with local stap's
# --------------------------------------------------------------------------

def compare(expected_text, received_text):
    """None when received matches expected by upstream's rules, else the
    first mismatch.  The server's names are taken literally (upstream puts
    them into regular expressions with only some characters quoted)."""
    expected, received = expected_text.split("\n"), received_text.split("\n")
    skipping_hosts, n, line = False, 0, ""
    for line in received:
        if skipping_hosts:
            if re.fullmatch(r"  \S+", line):
                continue
            skipping_hosts = False
        if re.match(r"WARNING: The domain name, [^,]*, does not match the DNS name\(s\) on "
                    r"the server certificate:", line):
            skipping_hosts = True
            continue
        want = expected[n] if n < len(expected) else ""
        if m := re.match(r" {14}(.*)", want):
            data = re.escape(m.group(1))
            if re.match(r" {14}tapset.*/" + data, line) or \
                    re.match(r" {14}runtime.*/" + data, line) or \
                    (re.match(r" {14}stap_[0-9]*", want) and re.match(r" {14}stap_[0-9]*", line)):
                n += 1
                continue
        elif m := re.match(r"Input file '(.*)' is empty or missing.", want):
            if re.match(r"Input file 'script.*/" + re.escape(m.group(1))
                        + "' is empty or missing.", line):
                n += 1
                continue
        elif m := re.match(r"Input file '(.*)' is missing.", want):
            if re.match(r"Input file 'script.*/" + re.escape(m.group(1)) + "' is missing.",
                        line):
                n += 1
                continue
        elif (m := re.match(r"(.*/stap): (.*)", line)) and \
                re.match(r"stap: " + re.escape(m.group(2)), want):
            n += 1
            continue
        if line != want:
            break
        n += 1
    if n == len(expected) and len(expected) <= len(received):
        return None
    return (f"line {n + 1}: expected {expected[n] if n < len(expected) else ''!r}, "
            f"got {line!r}")


REFUSED_ROOT = {
    "real-client": re.compile(r"^Unable to send / to the server$", re.M),
    "real-server": re.compile(r"^Unable to send / to the server$", re.M),
    # our client's own one-line error format (stap-client: ERROR: ...)
    "our-client": re.compile(r"^stap-client: ERROR: unable to send / to the server\b", re.M),
}
SAFETY_FIRST = re.compile(r"^ERROR: Safety pattern mismatch for -. parameter ", re.M)

def local_result(krel, argv, cwd, stapdir):
    """`catch {exec stap OPTIONS} result` locally.  stap's own directory is
    kept for the session and later ones: a fresh one costs a minute's kernel
    configuration probe on the first -l."""
    # run as upstream does, by the name "stap" ("stap: ..." in its messages)
    proc = subprocess.run(["stap", "-r", krel, *argv], executable=STAP, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "HOME": cwd, "LANG": "C.UTF-8",
                               "SYSTEMTAP_DIR": stapdir}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)
    return without_ksym_warning(tcl_exec_result(proc))


def outcome(pairings, pairing, krel, argv, root_tapset, local):
    """What upstream's stap_direct_and_with_client decides, as
    ("refused", output) when the client refused to send "/" (a pass),
    ("no-refusal", output) when it should have and did not, or
    ("compared", mismatch or None, local result, client result)."""
    if root_tapset:
        # upstream spawns `stap OPTIONS --use-server=...`: stdout and stderr as one stream
        proc = subprocess.run(pairings.argv(pairing, ["-r", krel, *argv], server_last=True),
                              env=pairings.env(pairing), cwd=pairings.workdir(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
        said = proc.stdout
        refused = REFUSED_ROOT[pairing].search(said)
        safety = SAFETY_FIRST.search(said)
        if not (safety and (not refused or safety.start() < refused.start())):
            return ("refused", said) if refused else ("no-refusal", said)
        # an option error came first: upstream falls through to the comparison
    expected = local()
    proc = pairings.run(pairing, ["-r", krel, *argv])
    received = without_ksym_warning(tcl_exec_result(proc))
    return ("compared", compare(expected, received), expected, received)


@pytest.fixture(scope="module")
def outcomes(pairings, krel, shared_dir):
    """Every case in every pairing, run four at a time up front (the local
    result once a case, when a comparison needs it)."""
    stapdir = os.path.join(shared_dir, "upstream-local-systemtap")
    # Warm local stap's cache with a plain listing first: run after some of the fuzzed cases in a
    # fresh cache, its kernel queries came out empty (stap's cache keys miss their options).
    local_result(krel, ["-l", "syscall.open*"], pairings.workdir(), stapdir)
    locals_ = {}
    lock = threading.Lock()

    def local(case_id, argv):
        with lock:
            entry = locals_.setdefault(case_id, {"lock": threading.Lock()})
        with entry["lock"]:
            if "value" not in entry:
                entry["value"] = local_result(krel, argv, pairings.workdir(), stapdir)
            return entry["value"]

    jobs = {(case_id, pairing): (lambda p=pairing, c=case_id, a=argv, r=root:
                                 outcome(pairings, p, krel, a, r, lambda: local(c, a)))
            for case_id, argv, root in CASES for pairing in PAIRINGS}
    return run_all(jobs)


@pytest.mark.parametrize("case_id,argv,root_tapset", CASES, ids=[c[0] for c in CASES])
def test_server_args(outcomes, pairing, case_id, argv, root_tapset):
    why = f"{case_id} (argv {argv!r}; fuzz seeds {SEEDS}, {ITERATIONS} iterations a seed)"
    result, error = outcomes[case_id, pairing]
    if error:
        raise error
    if result[0] != "compared":
        assert result[0] == "refused", f"{why}: the client did not refuse to send /:\n{result[1]}"
        return
    _, mismatch, expected, received = result
    assert mismatch is None, (f"{why}: {mismatch}\n--- local stap:\n{expected}\n"
                              f"--- through the server:\n{received}")
