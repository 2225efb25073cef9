# Ported from systemtap testsuite/systemtap.server/client_args.exp (cases reimplemented).
"""systemtap's client_args.exp: which options stap accepts from a compile
server's client.  A server runs stap with `--client-options` before the
client's options; stap then refuses server-side paths and settings (-R,
-r PATH, --tmpdir, -k, -q, --remote, cache and server options, ...) and,
at --unprivileged (= --privilege=stapusr) or --privilege=stapsys, also -B,
-D, -I, -m.  Upstream checks this by running the local stap with
`--client-options` spelled out: an invalid set must print "ERROR" (or
"You can't specify ... when --privilege=stapusr|stapsys is specified"), a
valid one exactly the -p1 parse tree of test.stp.  Each set with
--unprivileged is also run with --privilege=stapusr and with
--privilege=stapsys in its place.

Port: the sets are sent through a compile server, which supplies
`--client-options` itself, first: the client gets the set without the
word "--client-options".  A set is replayable that way when only privilege
options come before its --client-options (stap checks only the options
that follow it, and a server always puts it first), or when it has none and
is invalid anyway (a safety-pattern error); the other valid sets test local
stap's option order and have no server-side counterpart: they are listed
in NOT_THROUGH_A_SERVER and reported, with that reason, by one skipped test.

Lanes: the real 4.8 client and our stap-client against our server, the
real client against the real stap-serverd 4.8, and a raw request (exactly
the set's words as argvN, the script inside the request, sent by a minimal
TLS client of Python's ssl module) to our server and to the real one: the
raw lanes are the server-side check itself, since clients keep some options
for themselves.  The real 4.8 client acts on -R, -k, --ldd, --tmpdir,
--use-server*, --list-servers, --trust-servers, the cache options, --remote
and --remote-prefix itself and never sends them (measured against our
server's log); our stap-client keeps only -k and refuses the others it
cannot send with an ERROR line (a refusal, as upstream wants).  A set a
lane's client keeps is skipped in that lane, with that reason.  The real
client given -m NAME at -p1 also prints "Copy failed (...NAME.ko...)",
against the real server too: that line of its own is not compared.

Adaptations (see upstream_helpers): `uname -r` becomes KREL and -r KREL
comes first on every command line (the running kernel has no build tree);
the server is named by HOST:PORT; the machine's "Kernel function symbol
table missing" warning line is dropped from the output compared with the
parse tree; through a server the parse tree names test.stp as the server
saw it, `script` + its absolute path (the real server's form), or as given
(what our client maps it back to)."""

import os
import re
import shlex

import pytest
from upstream_helpers import (  # noqa: F401  (pairings: a fixture)
    pairings,
    raw_request,
    request_zip,
    run_all,
    tcl_exec_result,
    without_ksym_warning,
    write_scripts,
)

pytestmark = pytest.mark.upstream

INVALID = [
    "--unprivileged --client-options -B X=Y",
    "--unprivileged --client-options -D X=Y",
    "--unprivileged --client-options -I foo",
    "--unprivileged --client-options -m test",
    "--unprivileged --client-options -R foo",
    "--unprivileged --client-options -k",
    "--unprivileged --client-options -B X=Y -D X=Y -I foo -m test -R foo -k -r UNAME",
    "--client-options --unprivileged -B X=Y",
    "--client-options --unprivileged -D X=Y",
    "--client-options --unprivileged -I foo",
    "--client-options --unprivileged -m test",
    "--client-options --unprivileged -R foo",
    "--client-options --unprivileged -k",
    "--client-options --unprivileged -B X=Y -D X=Y -I foo -m test -R foo -k -r UNAME",
    "--client-options -B X=Y --unprivileged",
    "--client-options -D X=Y --unprivileged",
    "--client-options -I foo --unprivileged",
    "--client-options -m test --unprivileged",
    "--client-options -R foo --unprivileged",
    "--client-options -k --unprivileged",
    "--client-options -B X=Y -D X=Y -I foo -m test -R foo -k -r UNAME --unprivileged",
    "--client-options -R /path",
    "--client-options --ldd",
    "--client-options --tmpdir=/tmp",
    "--client-options --use-server",
    "--client-options --use-server-on-error",
    "--client-options --list-servers",
    "--client-options --trust-servers",
    "--client-options --disable-cache",
    "--client-options --poison-cache",
    "--client-options --clean-cache",
    "--client-options --all-modules",
    "--client-options --remote=foo",
    "--client-options --remote-prefix",
    "--client-options --modinfo=foo",
    '-D "foo;bar"',
    "-D 2=4",
    "--client-options -r /path",
    "-S /path",
    "--client-options -q",
    "--client-options -k",
]

VALID = [
    "-a i386",
    "-B X=Y",
    "-D X=Y",
    "-I foo",
    "-m test",
    "-r UNAME",
    "-a i386 -B X=Y -D X=Y -I foo -m test -r UNAME",
    "--unprivileged",
    "--unprivileged -a i386",
    "--unprivileged -B X=Y",
    "--unprivileged -D X=Y",
    "--unprivileged -I foo",
    "--unprivileged -m test",
    "--unprivileged -R foo",
    "--unprivileged -r UNAME",
    "--unprivileged -a i386 -B X=Y -D X=Y -I foo -m test -R foo -r UNAME",
    "--client-options",
    "--client-options -a i386",
    "--client-options -D X=Y",
    "--client-options -I foo",
    "--client-options -m test",
    "--client-options -r UNAME",
    "--client-options -a i386 -D X=Y -I foo -m test -r UNAME",
    "--unprivileged --client-options",
    "--client-options --unprivileged",
    "--unprivileged -a i386 --client-options",
    "--unprivileged -B X=Y --client-options",
    "--unprivileged -D X=Y --client-options",
    "--unprivileged -I foo --client-options",
    "--unprivileged -m test --client-options",
    "--unprivileged -R foo --client-options",
    "--unprivileged -r UNAME --client-options",
    "--unprivileged -a i386 -B X=Y -D X=Y -I foo -m test -R foo -r UNAME --client-options",
    "-a i386 --unprivileged --client-options",
    "-B X=Y --unprivileged --client-options",
    "-D X=Y --unprivileged --client-options",
    "-I foo --unprivileged --client-options",
    "-m test --unprivileged --client-options",
    "-R foo --unprivileged --client-options",
    "-r UNAME --unprivileged --client-options",
    "-a i386 -B X=Y -D X=Y -I foo -m test -R foo -r UNAME --unprivileged --client-options",
    "-a i386 --client-options --unprivileged",
    "-B X=Y --client-options --unprivileged",
    "-D X=Y --client-options --unprivileged",
    "-I foo --client-options --unprivileged",
    "-m test --client-options --unprivileged",
    "-R foo --client-options --unprivileged",
    "-r UNAME --client-options --unprivileged",
    "-a i386 -B X=Y -D X=Y -I foo -m test -R foo -r UNAME --client-options --unprivileged",
]

PRIVILEGE_WORDS = ("--unprivileged", "--privilege=stapusr", "--privilege=stapsys")


def variants(options):
    """upstream's substitutions: the set itself, then (when it says
    --unprivileged) the same with --privilege=stapusr, then with stapsys."""
    out = [options]
    if "--unprivileged" in options:
        out.append(options.replace("--unprivileged", "--privilege=stapusr"))
        out.append(options.replace("--unprivileged", "--privilege=stapsys"))
    return out


def through_a_server(words):
    """True when a server, which puts --client-options before everything,
    gives the set upstream's meaning: nothing but privilege options come
    before the set's own --client-options."""
    if "--client-options" not in words:
        return False
    return all(w in PRIVILEGE_WORDS for w in words[:words.index("--client-options")])


def cases():
    out = []
    for kind, table in (("invalid", INVALID), ("valid", VALID)):
        for n, options in enumerate(table):
            for v, text in enumerate(variants(options)):
                words = shlex.split(text)  # as Tcl's eval splits it (one "..." word)
                replayable = through_a_server(words) or (kind == "invalid" and
                                                         "--client-options" not in words)
                out.append((f"{kind}-{n:02d}" + ("", "-stapusr", "-stapsys")[v], kind, text,
                            words, replayable))
    return out


ALL_CASES = cases()
CASES = [c for c in ALL_CASES if c[4]]
NOT_THROUGH_A_SERVER = [c for c in ALL_CASES if not c[4]]


# Options the real 4.8 client acts on itself and never sends (measured: our
# server's log shows what each request carried): a set holding one cannot
# reach a server through that client.  Our client sends everything except -k
# (it keeps its own temporary directory) and refuses the rest locally with an
# ERROR line, which counts as the refusal upstream looks for.
REAL_CLIENT_KEEPS = ("-R", "-k", "--ldd", "--tmpdir", "--use-server", "--use-server-on-error",
                     "--list-servers", "--trust-servers", "--disable-cache", "--poison-cache",
                     "--clean-cache", "--all-modules", "--remote", "--remote-prefix")
OUR_CLIENT_KEEPS = ("-k",)
LANES = ("real-client", "our-client", "real-server", "raw-ours", "raw-real")
# The real 4.8 client, given -m NAME at -p1, still looks for NAME.ko and says
# so (against the real server too): that line is its own, not the server's.
COPY_FAILED = re.compile(r'^Copy failed \(".*/(\w+)\.ko" to "\1\.ko"\): No such file or '
                         r"directory$")


def kept_by(words, lane):
    keeps = {"real-client": REAL_CLIENT_KEEPS, "real-server": REAL_CLIENT_KEEPS,
             "our-client": OUR_CLIENT_KEEPS}.get(lane, ())
    return [w for w in words if w.split("=")[0] in keeps]


class Result:
    def __init__(self, rc, stdout, stderr):
        self.returncode, self.stdout, self.stderr = rc, stdout, stderr


def lane_run(pairings, lane, krel, test_stp, kind, words):
    """What stap said for one set in one lane (a Result)."""
    sent = [w.replace("UNAME", krel) for w in words if w != "--client-options"]
    if lane.startswith("raw-"):
        # exactly the set (without --client-options: the server adds it first)
        args = ["-r" + krel, *sent, "-p1", "script/test.stp"] if kind == "valid" else \
            ["-r" + krel, "script/test.stp", "-p1", *sent]
        with open(test_stp, "rb") as f:
            reply = raw_request(pairings, lane[4:], request_zip(
                krel, args, [("script/test.stp", f.read())]))
        return Result(reply.rc, reply.stdout, reply.stderr)
    if kind == "invalid":  # upstream: stap TEST.STP -p1 OPTIONS
        return pairings.run(lane, ["-r", krel, test_stp, "-p1", *sent])
    return pairings.run(lane, ["-r", krel, "-p1", *sent, test_stp])  # stap_run_exact's order


@pytest.fixture(scope="module")
def test_stp(pairings):
    return os.path.join(write_scripts(os.path.join(pairings.top, "scripts")), "test.stp")


@pytest.fixture(scope="module")
def results(pairings, krel, test_stp):
    """Every lane of every replayable set, run four at a time up front."""
    jobs = {}
    for case_id, kind, _text, words, _replayable in CASES:
        for lane in LANES:
            if not kept_by(words, lane):
                jobs[case_id, lane] = (lambda lane=lane, kind=kind, words=words:
                                       lane_run(pairings, lane, krel, test_stp, kind, words))
    return run_all(jobs)


def invalid_said(output, text):
    """upstream's check: "ERROR", or stap's refusal naming the privilege."""
    level = "stapsys" if "--privilege=stapsys" in text else "stapusr"
    return re.search(rf"ERROR|You can't specify .* when --privilege={level} is specified",
                     output, re.S)


PARSE_TREE = ["# parse tree dump", None, "probe begin{", "exit();", "}", "", ""]


def test_sets_without_a_server_side_counterpart():
    """The valid sets that put options before --client-options: stap leaves
    those options unchecked, but a server always puts --client-options
    first, so these sets mean something else through any server."""
    assert len(ALL_CASES) == 202 and len(NOT_THROUGH_A_SERVER) == 106
    pytest.skip(f"{len(NOT_THROUGH_A_SERVER)} of upstream's {len(ALL_CASES)} runs have no "
                "server-side counterpart (options before --client-options, which a server "
                "always puts first): " + ", ".join(c[0] for c in NOT_THROUGH_A_SERVER))


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("case_id,kind,text,words,replayable", CASES,
                         ids=[c[0] for c in CASES])
def test_client_args(results, lane, krel, test_stp, case_id, kind, text, words, replayable):
    if kept_by(words, lane):
        who = "our stap-client" if lane == "our-client" else "the real 4.8 client"
        pytest.skip(f"{case_id} ({text!r}): {who} keeps "
                    f"{' '.join(kept_by(words, lane))} for itself, so the set never reaches "
                    "a server through it (the raw-* lanes send it as it is)")
    result, error = results[case_id, lane]
    if error:
        raise error
    output = tcl_exec_result(result)
    why = f"{case_id} ({text!r}, lane {lane})"
    if kind == "invalid":
        assert invalid_said(output, text), f"{why}: not refused:\n{output}"
        return
    lines = without_ksym_warning(output).split("\n")
    if lane in ("real-client", "real-server"):
        lines = [l for l in lines if not COPY_FAILED.match(l)]
    # the file line: as given, or as the server saw it (script/<path>)
    forms = {f"# file {test_stp}", f"# file script{test_stp}", "# file script/test.stp"}
    expected = list(PARSE_TREE)
    expected[1] = lines[1] if len(lines) > 1 and lines[1] in forms else f"# file {test_stp}"
    # stap_run_exact: every line received equals the expected one ("" past the end)
    want = lambda n: expected[n] if n < len(expected) else ""  # noqa: E731
    bad = [(n + 1, line, want(n)) for n, line in enumerate(lines) if line != want(n)]
    assert not bad, f"{why}: line {bad[0][0]}: expected {bad[0][2]!r}, got {bad[0][1]!r}:\n" \
        + "\n".join(lines)
