"""Unit tier (no root, no network, no stap): stap-client's command line.
How stap's options are tokenised, what goes to the server, to staprun and
nowhere, the one-line errors, server specs and the locale sent along."""

import os

import pytest

import stap_client
from stap_client import (
    Error,
    Limits,
    locale_lines,
    parse_server_spec,
    parse_stap_args,
    scan_stap_args,
    staprun_argv,
)

pytestmark = pytest.mark.unit

SCRIPT = "probe begin { exit() }"


# --------------------------------------------------------------------------
# scan_stap_args: stap's getopt
# --------------------------------------------------------------------------

def test_clusters_split_until_an_option_with_an_argument():
    assert scan_stap_args(["-vvp4"]) == [("opt", "-v", None), ("opt", "-v", None),
                                         ("opt", "-p", "4")]
    # the rest of a cluster after an option that takes one is its argument
    assert scan_stap_args(["-vI/usr/share/t"]) == [("opt", "-v", None),
                                                   ("opt", "-I", "/usr/share/t")]


def test_arguments_attached_or_separate():
    assert scan_stap_args(["-e", SCRIPT, "-p2"]) == [("opt", "-e", SCRIPT), ("opt", "-p", "2")]
    assert scan_stap_args(["--vp", "01", "--vp=10"]) == [("opt", "--vp", "01"),
                                                          ("opt", "--vp", "10")]
    # a long option without an argument keeps None; "=" always gives one
    assert scan_stap_args(["--skip-badvars", "--privilege=stapusr"]) == [
        ("opt", "--skip-badvars", None), ("opt", "--privilege", "stapusr")]
    # optional values come only after "="
    assert scan_stap_args(["--color", "x"]) == [("opt", "--color", None), ("arg", "x")]


def test_long_options_shortened_as_getopt_allows():
    assert scan_stap_args(["--priv=stapusr", "--sign-mod=/k", "--colo"]) == [
        ("opt", "--privilege", "stapusr"), ("opt", "--sign-module", "/k"), ("opt", "--color", None)]


def test_options_may_follow_operands_and_double_dash_ends_them():
    assert scan_stap_args(["script.stp", "-x", "123", "-", "--", "-p", "b"]) == [
        ("arg", "script.stp"), ("opt", "-x", "123"), ("arg", "-"), ("arg", "-p"), ("arg", "b")]
    assert scan_stap_args([]) == []


@pytest.mark.parametrize("argv,message", [  # getopt's words, as stap prints them
    (["-p"], "option requires an argument -- 'p'"),
    (["-vI"], "option requires an argument -- 'I'"),
    (["-e", SCRIPT, "--vp"], "option '--vp' requires an argument"),
    (["--runtime"], "option '--runtime' requires an argument"),
    (["-z"], "invalid option -- 'z'"),
    (["--guru-mode"], "unrecognized option '--guru-mode'"),
    (["--help=3"], "option '--help' doesn't allow an argument"),
    (["--co"], "option '--co' is ambiguous; possibilities: '--compatible' '--color' '--colour'"),
])
def test_missing_argument(argv, message):
    with pytest.raises(Error) as e:
        scan_stap_args(argv)
    assert str(e.value) == message


# --------------------------------------------------------------------------
# parse_stap_args: what goes where
# --------------------------------------------------------------------------

def test_server_staprun_and_local_options_are_separated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    inv = parse_stap_args(["-p4", "-e", SCRIPT, "-c", "ls -l", "-x", "42", "-s", "8",
                           "-S", "1,2", "-w", "-G", "x=1", "-m", "mymod", "-o", "out.txt",
                           "-v", "-v", "-k", "a1", "a2"])
    # -G is staprun's alone; -o and -k are local matters; operands after "--"
    assert inv.server_args == ["-p4", "-e" + SCRIPT, "-cls -l", "-x42", "-s8", "-S1,2", "-w",
                               "-mmymod", "-v", "-v", "--", "a1", "a2"]
    assert inv.staprun_opts == ["-c", "ls -l", "-t", "42", "-b", "8", "-S", "1,2", "-w"]
    assert inv.globals == ["x=1"]
    assert (inv.module_name, inv.output, inv.verbose, inv.last_pass, inv.keep) == \
        ("mymod", "out.txt", 2, 4, True)
    assert inv.files == []  # -e: nothing to ship


def test_script_file_and_stdin_are_shipped(tmp_path):
    script = tmp_path / "x.stp"
    script.write_text(SCRIPT)
    inv = parse_stap_args(["-p2", str(script), "arg"])
    assert inv.server_args == ["-p2", f"script{script}", "--", "arg"]
    assert inv.files == [(f"script{script}", str(script))]

    class Stdin:
        def read(self):
            return b"probe begin { println(1) }"

    inv = parse_stap_args(["-p2", "-"], stdin=Stdin())
    assert inv.server_args == ["-p2", "script/-"]
    assert inv.files == [("script/-", b"probe begin { println(1) }")]


def test_a_missing_script_is_left_to_stap_on_the_server(tmp_path):
    inv = parse_stap_args(["-p2", str(tmp_path / "missing.stp")])
    assert inv.server_args == ["-p2", f"script{tmp_path}/missing.stp"]
    assert inv.files == []


def test_tapset_directories_are_shipped_file_by_file(tmp_path):
    tree = tmp_path / "tapsets"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.stp").write_text("function a() { return 1 }\n")
    (tree / "sub" / "b.stpm").write_text("@define b %( 2 %)\n")
    os.symlink("/etc/passwd", tree / "link.stp")  # links are not sent
    inv = parse_stap_args(["-p2", "-I", str(tree), "-e", SCRIPT])
    assert inv.server_args == ["-p2", f"-Itapset{tree}", "-e" + SCRIPT]
    assert inv.files == [(f"tapset{tree}/a.stp", f"{tree}/a.stp"),
                         (f"tapset{tree}/sub/b.stpm", f"{tree}/sub/b.stpm")]


def test_listing_needs_no_script_and_help_or_version_none_either():
    assert parse_stap_args(["-l", 'kernel.function("vfs_read")']).listing
    assert parse_stap_args(["--help"]).help
    assert parse_stap_args(["-V"]).version


def test_client_options_are_taken_out():
    inv = parse_stap_args(["--server=h:1", "--server=[::1]:2", "--ssl=/db", "--domain=x.test",
                           "--deadline=2.5", "-p2", "-e", SCRIPT])
    assert inv.servers == ["h:1", "[::1]:2"]
    assert (inv.ssl_dirs, inv.domains, inv.deadline) == (["/db"], ["x.test"], 2.5)
    assert inv.server_args == ["-p2", "-e" + SCRIPT]


@pytest.mark.parametrize("argv,message", [
    ([], "A script must be specified.\nTry '-i' for building a script interactively.\n"
         "Try '--help' for more information. [man stap]\n"
         "A message like [man foo] means for more info, run % man foo"),
    (["-p6", "-e", SCRIPT], "Invalid pass number (should be 1-5)."),
    (["-e", SCRIPT, "-Dx y", "-c"],  # stap checks values as it reads them: -D before -c
     "ERROR: Safety pattern mismatch for -D parameter ('x y' vs. "
     "'^[a-z_][a-z_0-9]*(=-?[a-z_0-9]+)?$') rc=1"),
    (["-e", SCRIPT, "-mA_b\n"],
     "ERROR: Safety pattern mismatch for -m parameter ('A_b\n' vs. '^[a-z0-9_]+$') rc=1"),
    (["-R", "/rt", "-e", SCRIPT], "-R names a local runtime directory; give -R to the server "
                                  "instead"),
    (["-r", "/lib/modules/x/build", "-e", SCRIPT],
     "-r /lib/modules/x/build names a local build tree; give a kernel release instead"),
    (["--tmpdir=/t", "-e", SCRIPT],
     "--tmpdir names a local directory and cannot be used with stap-client"),
    (["--remote=h", "-e", SCRIPT], "--remote runs on another host and cannot be used with "
                                   "stap-client"),
    (["--use-server", "-e", SCRIPT],
     "--use-server is what stap-client does already and cannot be used with stap-client"),
    (["--ssl", "-e", SCRIPT], "option --ssl needs a value (--ssl=VALUE)"),
    (["--deadline=soon", "-e", SCRIPT], "--deadline=soon: give seconds"),
    (["--server=h:0", "-e", SCRIPT], "--server=h:0: invalid port '0'"),
])
def test_one_line_errors(argv, message):
    with pytest.raises(Error) as e:
        parse_stap_args(argv)
    assert str(e.value) == message


# --------------------------------------------------------------------------
# staprun_argv: pass 5 as stap would run it
# --------------------------------------------------------------------------

def test_staprun_gets_what_stap_would_give_it(monkeypatch, tmp_path):
    monkeypatch.delenv("SYSTEMTAP_STAPRUN", raising=False)
    monkeypatch.chdir(tmp_path)
    inv = parse_stap_args(["-p4", "-v", "-v", "-v", "-o", "out.txt", "-c", "ls", "-F",
                           "-G", "a=1", "-G", "b=2", "-e", SCRIPT])
    # -v one fewer time, -o absolute, -F with -o is -D, -R without -m, -G after the module
    assert staprun_argv(inv, "/tmp/m.ko") == [
        "staprun", "-v", "-v", "-o", f"{tmp_path}/out.txt", "-c", "ls", "-D", "-R",
        "/tmp/m.ko", "a=1", "b=2"]


def test_staprun_named_module_flight_recorder_and_override(monkeypatch):
    monkeypatch.setenv("SYSTEMTAP_STAPRUN", "/opt/my-staprun")
    inv = parse_stap_args(["-F", "-m", "mine", "-e", SCRIPT])
    assert staprun_argv(inv, "mine.ko") == ["/opt/my-staprun", "-L", "mine.ko"]
    monkeypatch.setenv("SYSTEMTAP_STAPRUN", "")
    assert staprun_argv(parse_stap_args(["-e", SCRIPT]), "m.ko") == ["staprun", "-R", "m.ko"]


# --------------------------------------------------------------------------
# Server specs, the locale sent, archive limits
# --------------------------------------------------------------------------

@pytest.mark.parametrize("spec,parsed", [
    ("host", ("host", None)),
    ("host.example:5555", ("host.example", 5555)),
    ("10.0.0.1:1", ("10.0.0.1", 1)),
    ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ("[::1]", ("::1", None)),
    ("fe80::1", ("fe80::1", None)),  # a bare IPv6 address has no port
])
def test_server_specs(spec, parsed):
    assert parse_server_spec(spec) == parsed


@pytest.mark.parametrize("spec,message", [
    (":80", "--server=:80: no host name"),
    ("h:65536", "--server=h:65536: invalid port '65536'"),
    ("h:x", "--server=h:x: invalid port 'x'"),
])
def test_bad_server_specs(spec, message):
    with pytest.raises(Error) as e:
        parse_server_spec(spec)
    assert str(e.value) == message


def test_locale_lines_carry_stap_s_eight_settings_as_they_are():
    # the server judges the values, and tells which it dropped (real clients send them too)
    env = {"LC_TIME": "de_DE.UTF-8", "LANG": "C.UTF-8", "LC_ALL": "$(id)", "HOME": "/root",
           "LANGUAGE": "de", "LC_CTYPE": "en_US.ISO-8859-1@euro", "LC_PAPER": "a4"}
    assert locale_lines(env) == "LANG=C.UTF-8\nLC_ALL=$(id)\n" \
                                "LC_CTYPE=en_US.ISO-8859-1@euro\nLC_TIME=de_DE.UTF-8\n"
    assert locale_lines({}) == ""


def test_limits_override_only_known_bounds():
    limits = Limits(max_entries=3)
    assert (limits.max_entries, limits.max_total_bytes) == (3, Limits.max_total_bytes)
    assert Limits().max_entries == 10000  # the class default is untouched
    with pytest.raises(TypeError) as e:
        Limits(max_files=1)
    assert str(e.value) == "no such limit: max_files"


def test_getopt_errors_print_as_stap_prints_them(capsys):
    """stap-client stands for `stap --use-server`: a command line stap's
    getopt refuses gets stap 4.8's three lines, exit 1 (checked against the
    real stap by the upstream server_args port)."""
    rc = stap_client.dispatch(stap_client.COMMANDS, ["stap-client", "-p1", "-e", SCRIPT, "-c"])
    assert rc == 1
    assert capsys.readouterr().err == (
        "stap: option requires an argument -- 'c'\n"
        "Try '--help' for more information. [man stap]\n"
        "A message like [man foo] means for more info, run % man foo\n")
