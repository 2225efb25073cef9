"""Unit tier (no root, no network, no stap): the server's pure parts.
Its options, a client's stap arguments (what is refused, what is passed on,
pass 5 lowered to 4), guru mode, the locale passed to stap, the compile's
limits and how a broken one is told, the reply's entries, the log line, and
the names and texts it advertises with."""

import dataclasses
import os
import pathlib
import re
import types

import pytest
from hardening_helpers import zip_bytes

import stap_server
from stap_client import (
    Error,
    Limits,
    ReplyContent,
    RequestArchive,
    open_archive,
    reply_entries,
    txt_rdata_text,
)
from stap_server import (
    COMPILE_LIMITS,
    OTHER_PATH_OPTIONS,
    OUTPUT_OPTIONS,
    SECRET_FILE_OPTIONS,
    Offer,
    Request,
    RequestRecord,
    ServerConfig,
    address_key,
    alternative_name,
    build_option_parser,
    check_argv_size,
    check_secret_file,
    client_arguments,
    dns_update_target,
    format_address,
    guru_reason,
    hide_paths,
    is_serverd_cmdline,
    limit_breached,
    limit_text,
    limits_argv,
    load_changed,
    locale_env,
    parse_config,
    parse_request,
    reply_for_client,
    secret_files,
    server_side_cause,
)

pytestmark = pytest.mark.unit

SCRIPT = "probe begin { exit() }"


def refused(fn, *args):
    with pytest.raises(Error) as e:
        fn(*args)
    return str(e.value)


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------

def test_option_defaults_and_repeatable_options():
    opts = build_option_parser("stap-serverd").parse_args(
        ["-r", "a", "-r", "b", "-I", "t", "-D", "A=1", "-B", "V=1", "--no-sandbox",
         "--max-unpacked-size", "5"])
    assert (opts.releases, opts.includes, opts.defines, opts.kbuild) == \
        (["a", "b"], ["t"], ["A=1"], ["V=1"])
    assert opts.max_request_size == 5  # the old name is an alias
    assert not opts.sandbox and not opts.allow_guru
    assert (opts.listen, opts.port, opts.advertise) == ("::", 0, "auto")
    assert (opts.result_cache_size, opts.max_compressed_request) == (64 << 20, 16 << 20)
    assert opts.compile_disk == 1 << 30 and opts.compile_cpu == 900


@pytest.mark.parametrize("argv,message", [
    (["--max-threads", "0"], "--max-threads must be at least 1"),
    (["--max-request-size", "0"], "--max-request-size must be at least 1"),
    (["--max-per-address", "-1"], "--max-per-address must be at least 1"),
    (["--compile-disk", "0"], "--compile-disk must be at least 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--port", "x"], "argument --port: invalid int value: 'x'"),
    (["--advertise", "loud"], "argument --advertise: invalid choice: 'loud' (choose from "
                              "'auto', 'avahi', 'mdns', 'none')"),
])
def test_bad_options_are_one_line_errors(argv, message):
    assert refused(parse_config, argv) == message


def test_dash_i_serves_every_installed_build_tree():
    installed = sorted(r for r in os.listdir("/lib/modules")
                       if os.path.isdir(f"/lib/modules/{r}/build")) \
        if os.path.isdir("/lib/modules") else []
    if not installed:
        assert refused(parse_config, ["-i"]) == \
            "-i: no kernel build tree is installed (/lib/modules/*/build)"
        return
    assert parse_config(["-i"]).releases == tuple(installed)
    assert parse_config(["-i", "-r", installed[-1]]).releases == \
        (installed[-1], *installed[:-1])  # -r first, then the rest, each once


def test_fetching_kernels_needs_the_sandbox():
    assert refused(parse_config, ["--fetch-kernels", "--no-sandbox"]) == (
        "--fetch-kernels needs the sandbox: only there is a fetched kernel presented as "
        "installed (drop --no-sandbox)")


def test_dns_update_target():
    opts = types.SimpleNamespace(dns_update="example.test", dns_server="10.0.0.53",
                                 tsig_key="/etc/k.key")
    assert dns_update_target(opts) == ("example.test.", "10.0.0.53", 53, "/etc/k.key")
    opts.dns_server = "[fd00::53]:5353"
    assert dns_update_target(opts) == ("example.test.", "fd00::53", 5353, "/etc/k.key")
    assert dns_update_target(types.SimpleNamespace(dns_update=None, dns_server=None,
                                                   tsig_key=None)) is None
    assert refused(dns_update_target, types.SimpleNamespace(
        dns_update="example.test", dns_server=None, tsig_key=None)) == \
        "--dns-update, --dns-server and --tsig-key go together"


def test_every_path_option_is_classified_as_secret_or_not():
    """A new option naming a file must be declared a secret (masked in the sandbox, checked at
    start) or not; the parser's metavars tell which options name files."""
    actions = build_option_parser("stap-serverd")._actions
    paths = {a.option_strings[0] for a in actions if re.search(r"FILE|DIR|PATH", a.metavar or "")}
    assert paths == set(SECRET_FILE_OPTIONS) | set(OTHER_PATH_OPTIONS)
    assert not set(SECRET_FILE_OPTIONS) & set(OTHER_PATH_OPTIONS)
    config = build_option_parser("stap-serverd").parse_args(["--tsig-key", "k", "--log", "l"])
    assert secret_files(config) == [("--tsig-key", os.path.abspath("k"))]


# The options reviewed as deciding nothing in a reply: they bound, place or announce the server, or
# decide only which requests it takes (a request's release, architecture and fetched kernel tree are
# in the result cache's key from the request; failed compiles and guru mode are never cached).
OTHER_OPTIONS = ("--port", "--listen", "--log", "-r", "-i", "--fetch-kernels", "--kernel-cache",
                 "--kernel-cache-size", "-a", "--max-threads", "--max-wait", "--queue",
                 "--allow-guru", "--max-compressed-request", "--max-request-size",
                 "--max-pending-bytes", "--tmpdir-min-free", "--io-timeout", "--handshake-timeout",
                 "--max-per-address", "--compile-timeout", "--result-cache-size", "--renew-check",
                 "--tmpdir", "--dns-update", "--dns-server", "--tsig-key", "--load-refresh",
                 "--advertise", *(f"--compile-{n}" for n, *_ in COMPILE_LIMITS))


def test_every_option_is_classified_as_deciding_the_reply_or_not():
    """A new option that changes the compiled module or the reply must be declared so, naming the
    configuration field through which it reaches the result cache's key (else the cache answers
    with replies made before it changed); one that does not must be declared so too."""
    actions = build_option_parser("stap-serverd")._actions
    options = {a.option_strings[0] for a in actions if a.dest != "help"}
    assert options - set(OTHER_OPTIONS) == set(OUTPUT_OPTIONS), \
        "an option changes the reply (OUTPUT_OPTIONS) or not (OTHER_OPTIONS here): declare which"
    assert options == set(OUTPUT_OPTIONS) | set(OTHER_OPTIONS)
    assert not set(OUTPUT_OPTIONS) & set(OTHER_OPTIONS)
    assert set(OUTPUT_OPTIONS.values()) <= {f.name for f in dataclasses.fields(ServerConfig)}


def test_the_configuration_is_built_once_and_never_changes(tmp_path):
    """parse_config's derived fields each have one type (--dns-update's zone becomes the whole
    target, in a field of its own name, only once); nothing changes them afterwards."""
    key = tmp_path / "k.key"
    key.write_text("key")
    key.chmod(0o600)
    if not stap_server.installed_releases():
        pytest.skip("no kernel build tree is installed (/lib/modules/*/build) to serve")
    release = stap_server.installed_releases()[0]
    config = parse_config(["-r", release, "--ssl", str(tmp_path / "db"), "--tmpdir",
                           str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--dns-update",
                           "example.test", "--dns-server", "10.0.0.53", "--tsig-key", str(key)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1
    assert (config.releases, config.tmpdir, config.kernel_cache, config.dns_update) == \
        ((release,), str(tmp_path), str(tmp_path / "c") + "-kernels",
         ("example.test.", "10.0.0.53", 53, str(key)))
    assert config.stap_options == () and config.compile_limits["disk"] == 1 << 30


def test_a_secret_file_must_be_private(tmp_path):
    key = tmp_path / "k.key"
    key.write_text("key")
    key.chmod(0o604)
    assert refused(check_secret_file, "--tsig-key", str(key)) == \
        f"--tsig-key {key}: group or others may read or write it (mode 0604); chmod 600 {key}"
    key.chmod(0o620)
    assert "(mode 0620); chmod 600" in refused(check_secret_file, "--tsig-key", str(key))
    key.chmod(0o600)
    check_secret_file("--tsig-key", str(key))
    (tmp_path / "link").symlink_to(key)
    assert "link is a symbolic link; name the key file itself" in \
        refused(check_secret_file, "--tsig-key", str(tmp_path / "link"))
    assert refused(check_secret_file, "--tsig-key", str(tmp_path)) == \
        f"--tsig-key {tmp_path} is not a regular file"
    assert refused(check_secret_file, "--tsig-key", str(tmp_path / "no")) == \
        f"cannot read --tsig-key {tmp_path / 'no'}: No such file or directory"


def test_private_paths_are_covered_wherever_the_sandbox_shows_them(tmp_path, monkeypatch):
    """After every bind: a private directory by an empty read-only one, a private file (a
    secret) by /dev/null, at each place a bind shows it; nothing inside what is covered already,
    nothing shown nowhere."""
    etc, tree, home = tmp_path / "etc", tmp_path / "tree", tmp_path / "home"
    for d in (etc / "db", tree / "ssl" / "server", home):
        d.mkdir(parents=True)
    for f in (etc / "k.key", etc / "db" / "k2.key", tree / "t.key", home / "h.key"):
        f.write_text("secret")
    private = [etc / "db", etc / "db" / "k2.key", etc / "k.key", tree / "ssl" / "server",
               tree / "t.key", home / "h.key", tmp_path / "missing"]
    monkeypatch.setattr(stap_server, "private_paths", lambda config: list(map(str, private)))
    binds = [(str(etc), "/etc"), (str(tree), str(tree))]
    argv = stap_server.private_masks(None, binds)
    cover_dir = lambda p: ["--size", "4096", "--tmpfs", p, "--remount-ro", p]
    assert argv == (cover_dir("/etc/db") + ["--ro-bind", "/dev/null", "/etc/k.key"]
                    + ["--ro-bind", "/dev/null", f"{tree}/t.key"]
                    + cover_dir(f"{tree}/ssl/server")), argv


# --------------------------------------------------------------------------
# A client's stap arguments
# --------------------------------------------------------------------------

@pytest.fixture
def top():
    """A received request: a script and a shipped tapset directory."""
    return RequestArchive(open_archive(zip_bytes([("script/tmp/x.stp", SCRIPT),
                                                  ("tapset/t/", b"")])), Limits())


def test_pass_5_is_lowered_and_the_output_file_dropped(top):
    args, release, lowered, scripts = client_arguments(
        ["-vp5", "-k", "-o/tmp/out", "-r6.1.0-9-amd64", "-Itapset/t", "--privilege=stapusr",
         "script/tmp/x.stp", "a", "b"], top, "6.1.0-1-amd64")
    # -k goes to stap, which refuses it from a client in its own words
    assert args == ["-v", "-p4", "-k", "-Itapset/t", "--privilege=stapusr", "script/tmp/x.stp",
                    "--", "a", "b"]
    assert (release, lowered) == ("6.1.0-9-amd64", True)  # -r names the release wanted
    assert scripts == [("script/tmp/x.stp", SCRIPT.encode())]


def test_no_pass_means_pass_5_and_a_listing_compiles_nothing(top):
    assert client_arguments(["-e", SCRIPT, "x"], top, "r") == (
        ["-e" + SCRIPT, "-p4", "--", "x"], "r", True, [("-e", SCRIPT.encode())])
    assert client_arguments(["-L", 'kernel.function("x")'], top, "r") == (
        ['-Lkernel.function("x")'], "r", False, [])
    assert client_arguments(["-p2", "-e", SCRIPT, "-mmod_1"], top, "r") == (
        ["-p2", "-e" + SCRIPT, "-mmod_1"], "r", False, [("-e", SCRIPT.encode())])


@pytest.mark.parametrize("args,message", [
    (["-R/x", "-e", SCRIPT], "option -R is not allowed: it names a runtime directory on the "
                             "server"),
    (["--poison-cache", "-e", SCRIPT], "option --poison-cache is not allowed: it damages the "
                                       "cache on the server"),
    (["--sign-module", "-e", SCRIPT], "option --sign-module is not allowed: it names a key "
                                      "directory on the server"),
    (["-I../..", "-e", SCRIPT], "-I path ../.. is not inside the request"),
    (["-d/bin/ls", "-e", SCRIPT], "-d path /bin/ls is not inside the request"),
    (["../../etc/passwd"], "script path ../../etc/passwd is not inside the request"),
    (["-r/lib/modules/x", "-e", SCRIPT], "-r /lib/modules/x: a build tree path is not allowed; "
                                         "give a release"),
    (["-m", "a-b", "-e", SCRIPT], "-m a-b: a module name is letters, digits and underscores"),
])
def test_refused_arguments(top, args, message):
    assert refused(client_arguments, args, top, "r") == message


GOOD_RELEASES = ["6.1.0-57-amd64", "6.1.0-50-cloud-amd64", "5.14.0-362.8.1.el9_3.x86_64",
                 "6.12.9+bpo-amd64", "4.19.0-1~exp1", "6" * 64]
BAD_RELEASES = ["..", "6.1.0..57", "-rf", "6.1.0;id", "$(id)", "`id`", "a b", "6.1.0*",
                "linux-headers-6.1.0=1.0", "6.1.0-57-amd64:i386", "6.1.0?", "[6]", "~6", ".6",
                "a\nb", "6" * 65, "6.1.0-57-amd64,6.1.0-50-amd64", "6|x", "6>x", "6'x", '6"x']


@pytest.mark.parametrize("release", GOOD_RELEASES)
def test_a_plain_release_name_is_taken(top, release):
    assert client_arguments([f"-r{release}", "-e", SCRIPT], top, "r")[1] == release
    assert request_release(top, release) == release


@pytest.mark.parametrize("release", BAD_RELEASES)
def test_a_release_that_is_not_a_plain_name_is_refused(top, release):
    message = ("is not a kernel release name (letters, digits and . _ + ~ -, starting with a "
               "letter or digit, no .., at most 64 characters)")
    assert refused(client_arguments, [f"-r{release}", "-e", SCRIPT], top, "r") == \
        f"-r {release!r} {message}"
    if not re.search(r"\s", release):  # sysinfo is split at white space
        assert refused(request_release, top, release) == f"release {release!r} {message}"


def request_release(top, release):
    """The release parse_request takes from a request whose sysinfo names it."""
    archive = RequestArchive(open_archive(zip_bytes([("sysinfo", f"sysinfo: {release} x86_64"),
                                                     ("argv1", "-p2")])), Limits())
    config = types.SimpleNamespace(releases=[release], arch="x86_64", allow_guru=False,
                                   fetch_kernels=False)
    return parse_request(archive, config).release


def test_guru_mode_is_told_with_its_reason():
    assert guru_reason(["-p4", "-g"], []) == "option -g"
    assert guru_reason(["--", "-g"], []) is None  # a script argument, not an option
    assert guru_reason([], [("-e", b"probe begin { %{ x %} }")]) == "embedded C in -e"
    # in a comment or a string it is not embedded C
    assert guru_reason([], [("x.stp", b'# %{\n// %{\n/* %{ */ probe begin { print("%{") }')]) \
        is None
    assert guru_reason([], [("x.stp", b'@cast(p, "task_struct", "kernel<linux/sched.h>")')]) \
        is None


@pytest.mark.parametrize("header", ["</etc/shadow>", "<linux/../../x.h>"])
def test_headers_naming_server_files_are_refused(header):
    text = f'@cast(p, "task_struct", "kernel{header}")'.encode()
    assert refused(guru_reason, [], [("x.stp", text)]) == (
        f"x.stp: header {header} names a file on the server; name headers relative to the "
        "kernel or system include directories")


def test_the_arguments_fit_the_kernels_limits():
    check_argv_size([(128 << 10) - 1])  # the arguments' sizes, before they are read
    assert refused(check_argv_size, [128 << 10]) == (
        "the request's arguments are too long (131073 bytes, the longest 131072; limits "
        "1048576 in all, 131071 each)")
    assert refused(check_argv_size, [100 << 10] * 11) == (
        "the request's arguments are too long (1126411 bytes, the longest 102400; limits "
        "1048576 in all, 131071 each)")


def test_locale_values_are_passed_or_refused_in_the_real_servers_words():
    env, notices = locale_env(b"LANG=C.UTF-8\nLC_ALL=$(id)\nPATH=/evil\nLC_TIME=de_DE.UTF-8\n"
                              b"LANGUAGE=de\nno equals sign\n")
    assert env == {"LANG": "C.UTF-8", "LC_TIME": "de_DE.UTF-8"}
    assert notices == (b"Server: Localization value '$(id)' contains illegal characters\n"
                       b"Server: Localization key 'PATH' not found in global list\n"
                       b"Server: Localization key 'LANGUAGE' not found in global list\n"
                       b"Server: Localization key=value line 'no equals sign' cannot be parsed\n")
    assert locale_env(None) == ({}, b"")


# --------------------------------------------------------------------------
# Limits of a compile
# --------------------------------------------------------------------------

def limits_config(sandbox=True):
    return types.SimpleNamespace(compile_limits={n: d for n, d, *_ in COMPILE_LIMITS},
                                 sandbox=sandbox)


def test_limit_texts():
    config = limits_config()
    assert [limit_text(config, n) for n, *_ in COMPILE_LIMITS] == [
        "file size limit (536870912 bytes, --compile-file-size)",
        "memory limit (8589934592 bytes, --compile-memory)",
        "processes limit (256, --compile-processes)",
        "cpu limit (900 s, --compile-cpu)",
        "disk limit (1073741824 bytes, --compile-disk)",
    ]


def test_a_broken_limit_is_recognised_by_its_signal_or_words():
    config = limits_config()
    assert limit_breached(0, b"File size limit exceeded", config) is None  # it succeeded
    assert limit_breached(128 + 25, b"", config) == limit_text(config, "file-size")  # SIGXFSZ
    assert limit_breached(128 + 24, b"", config) == limit_text(config, "cpu")  # SIGXCPU
    assert limit_breached(1, b"cc1: out of memory allocating", config) == \
        limit_text(config, "memory")
    assert limit_breached(1, b"sh: fork: retry: Resource", config) == \
        limit_text(config, "processes")
    assert limit_breached(1, b"semantic error: no match", config) is None


def test_the_server_side_cause_of_a_failed_compile():
    """What the log line names: the server's to fix, never the client's script."""
    config = types.SimpleNamespace(tmpdir="/srv/tmp", cache_dir="/srv/cache")
    assert server_side_cause(b"Pass 4\nstap-serverd: ERROR: the compile exceeded its cpu limit "
                             b"(1 s, --compile-cpu)\n", config) == \
        "the compile exceeded its cpu limit (1 s, --compile-cpu)"
    assert server_side_cause(b"cc1: fatal error: error writing to x.s: No space left on device",
                             config) == ("No space left on device in --tmpdir /srv/tmp or the "
                                         "stap cache /srv/cache")
    assert server_side_cause(b"bwrap: Creating new namespace failed: Operation not permitted\n",
                             config) == ("sandbox failure: bwrap: Creating new namespace failed: "
                                         "Operation not permitted")
    assert server_side_cause(b"semantic error: no match while resolving probe point\n",
                             config) is None


def test_prlimit_arguments():
    assert limits_argv(limits_config()) == [
        "prlimit", "--fsize=536870912", "--as=8589934592", "--nproc=256", "--cpu=900:905",
        "--core=0", "--"]
    # without the sandbox's user namespace the process count would be the account's
    assert "--nproc=256" not in limits_argv(limits_config(sandbox=False))


# --------------------------------------------------------------------------
# The reply and the log
# --------------------------------------------------------------------------

def request(lowered, signed=False, notices=b""):
    return Request(version="4.8", release="r", arch="x86_64", args=[], env={},
                   lowered=lowered, signed=signed, notices=notices)


def test_reply_for_client_names_the_module_and_puts_notices_first():
    compiled = ReplyContent(rc=0, stdout=b"hello\n<server>/stap_1.ko\n",
                            stderr=b"Pass 4 in <server>/work/tmp\n", module=("stap_1.ko", b"ko"))
    assert reply_for_client(compiled, request(lowered=False, notices=b"Server: n\n"), None,
                            "4.8") == \
        ReplyContent(0, b"hello\nstap_1.ko\n", b"Server: n\nPass 4 in <server>/work/tmp\n", "4.8",
                     ("stap_1.ko", b"ko"))
    # pass 5: the client names the module itself
    assert reply_for_client(compiled, request(lowered=True), None, "4.8").stdout == b"hello\n"


def test_a_module_for_stapusr_is_signed():
    class Key:
        def module_signature(self, data):
            return b"signature of " + data

    compiled = ReplyContent(rc=0, stdout=b"", stderr=b"", module=("m.ko", b"ko"))
    assert reply_for_client(compiled, request(lowered=True, signed=True), Key(), "4.8").module \
        == ("m.ko", b"ko", b"signature of ko")


def test_reply_entries_in_the_real_servers_layout():
    assert reply_entries(ReplyContent(0, b"o", b"e", "4.8", ("m.ko", b"ko", b"sig"))) == [
        ("version", b"4.8"), ("rc", b"0"), ("stdout", b"o"), ("stderr", b"e"),
        ("stap000000/m.ko", b"ko"), ("stap000000/m.ko.sgn", b"sig")]
    assert reply_entries(ReplyContent(1, b"", b"e", "4.8")) == [
        ("version", b"4.8"), ("rc", b"1"), ("stdout", b""), ("stderr", b"e")]


def test_hide_paths_longest_first():
    assert hide_paths(b"/tmp/s.x/work/tmp/a and /tmp/s.x",
                      ["/tmp/s.x", "/tmp/s.x/work", None]) == b"<server>/tmp/a and <server>"


def test_request_log_lines_are_bounded():
    record = RequestRecord(options="x" * 250, client="10.0.0.1:5", rc=0)
    # fields in a fixed order, unset ones left out, each cut with its length noted
    assert record.log_line() == \
        f"request client='10.0.0.1:5' options='{'x' * 199}...[252 chars] rc=0"
    full = RequestRecord(**{name: "y" * 300 for name in RequestRecord.FIELDS}).log_line()
    assert full == full[:stap_server.LOG_LINE_MAX] + "...[2663 chars]"


def test_the_first_error_of_a_request_is_kept():
    record = RequestRecord()
    record.fail("first")
    record.fail("second")
    assert record.log_line() == "request error='first'"
    with pytest.raises(AttributeError):
        record.update(bogus=1)


def test_one_client_is_an_address_or_an_ipv6_64():
    assert address_key("10.1.2.3") == "10.1.2.3"
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert address_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not-an-address") == "not-an-address"
    assert format_address(("::ffff:127.0.0.1", 5)) == "127.0.0.1:5"
    assert format_address(("::1", 5, 0, 0)) == "[::1]:5"


# --------------------------------------------------------------------------
# Advertising and finding our own servers
# --------------------------------------------------------------------------

def test_instance_names_and_texts():
    assert alternative_name("X") == "X #2" and alternative_name("X #9") == "X #10"
    assert Offer(1, ["a", "b", "c"], "4.8", "", host="h").names() == [
        "Systemtap Compile Server on h", "Systemtap Compile Server on h #2",
        "Systemtap Compile Server on h #3"]
    assert Offer(1, ["r x86_64"], "4.8", "01:02", hint={"slots": 2}).txt("r x86_64") == [
        "sysinfo=r x86_64", "version=4.8", "certinfo=01:02", "optinfo=", "slots=2"]
    assert txt_rdata_text(['a="b"', "c\\d"]) == '"a=\\"b\\"" "c\\\\d"'


def test_load_changes_worth_telling():
    hint = {"busy": 1, "queued": 0, "compile": 3.0}
    assert load_changed(hint, dict(hint, queued=1))        # 1 -> 2: another power of two
    assert not load_changed(dict(hint, queued=1), dict(hint, busy=2, queued=1))  # 2 -> 3
    assert load_changed(hint, dict(hint, compile=5.0))     # half as long again
    assert not load_changed(hint, dict(hint, compile=4.0))


def test_what_stap_stop_server_takes_for_a_server():
    assert is_serverd_cmdline(["/usr/bin/python3", "/usr/bin/stap-serverd", "-r", "x"])
    assert is_serverd_cmdline(["python3", "/src/stap_server.py", "stap-serverd"])
    assert not is_serverd_cmdline(["python3", "stap_server.py", "stap-start-server"])
    assert not is_serverd_cmdline(["sleep", "stap-serverd"])
    assert not is_serverd_cmdline(["python3"])


# --------------------------------------------------------------------------
# A DNS zone that refuses an update (the zone's server is a stand-in: no network)
# --------------------------------------------------------------------------

def zone_registration(tmp_path, rcodes):
    """A ZoneRegistration of two sysinfos whose updates get rcodes in turn; the sent updates
    are kept."""
    rcode = pytest.importorskip("dns.rcode", reason="dnspython (the --dns-update back end) is not "
                                "installed")
    key = tmp_path / "k.key"
    key.write_text('key "k" { algorithm hmac-sha256; secret "c2VjcmV0c2VjcmV0c2VjcmV0"; };\n')
    offer = Offer(7000, ["6.1 x86_64", "6.2 x86_64"], "4.8", "01:02", listen="10.0.0.5",
                  host="h")
    zone = stap_server.ZoneRegistration(("example.test.", "10.0.0.53", 53, str(key)), offer)
    zone.sent, answers = [], iter(rcodes)
    zone.send = lambda msg: zone.sent.append(msg.to_text()) or getattr(rcode, next(answers))
    return zone


def test_a_zone_refusing_the_second_instance_gets_the_first_withdrawn(tmp_path):
    zone = zone_registration(tmp_path, ["NOERROR", "REFUSED", "NOERROR"])
    with pytest.raises(Error, match="refused: REFUSED"):
        zone.start()
    assert len(zone.sent) == 3
    withdrawal = zone.sent[-1]  # a failed start leaves nothing of it in the zone
    assert "Systemtap\\032Compile\\032Server\\032on\\032h._stap._tcp.example.test. ANY ANY" \
        in withdrawal.splitlines(), withdrawal
    assert zone.instances == []


def test_a_refused_zone_refresh_is_a_warning(tmp_path, caplog):
    zone = zone_registration(tmp_path, ["NOERROR", "NOERROR", "NOTAUTH"])
    zone.start()
    with caplog.at_level("WARNING"):
        zone.refresh()
    assert "DNS UPDATE of example.test. at 10.0.0.53 refused: NOTAUTH" in caplog.text


# --------------------------------------------------------------------------
# stap's cache: each compile's own, with copies of the server's knowledge
# --------------------------------------------------------------------------

HEADER = "ea/stapconf_eae2_722.h"


def test_each_compile_gets_its_own_stap_cache_with_copies_of_the_knowledge(tmp_path):
    ws = stap_server.Workspace(str(tmp_path))
    try:
        ws.hand_over(None, {HEADER: b"#define X 1\n"})
        cache = pathlib.Path(ws.work, ".systemtap", "cache")
        assert (cache / HEADER).read_bytes() == b"#define X 1\n"
        (cache / "ea" / "stapconf_ffff_1.h").symlink_to("/etc/passwd")  # a compile's link
        (cache / "ea" / "stap_ffff_1.ko").write_bytes(b"module")
        assert ws.stap_knowledge() == {HEADER: b"#define X 1\n"}
    finally:
        ws.remove()


def test_a_request_holding_the_compiles_stap_directory_is_refused(tmp_path):
    ws = stap_server.Workspace(str(tmp_path))
    try:
        pathlib.Path(ws.work, ".systemtap").mkdir()
        assert refused(ws.hand_over, None) == ("request entry .systemtap is not allowed: the "
                                               "compile's own stap cache goes there")
    finally:
        ws.remove()


@pytest.mark.parametrize("args, builds", [(["-p4", "-e" + SCRIPT], True),
                                          (["-p4", "-p2", "x.stp"], False),
                                          (["x.stp", "-p4", "--", "-p2"], True),
                                          (["-L", 'kernel.function("x")'], False)])
def test_only_pass_4_waits_for_the_kernels_knowledge(args, builds):
    assert stap_server.builds_module(Request("4.8", "r", "x86_64", args, {}, False)) is builds


def test_knowledge_is_stored_whole_and_only_the_servers_own_is_loaded(tmp_path, caplog):
    path = str(tmp_path / "6.1.0-1-amd64-x86_64-0123456789abcdef")
    assert stap_server.load_knowledge(path) is None
    stap_server.store_knowledge(path, {HEADER: b"h"})
    assert stap_server.load_knowledge(path) == {HEADER: b"h"}
    assert [n for n in tmp_path.iterdir() if n.name.startswith(".new-")] == []
    stap_server.store_knowledge(path, {HEADER: b"other"})  # there already: left as it is
    assert stap_server.load_knowledge(path) == {HEADER: b"h"}
    (tmp_path / "6.1.0-1-amd64-x86_64-0123456789abcdef").chmod(0o775)
    assert stap_server.load_knowledge(path) is None
    assert "must be a directory of uid" in caplog.text


def test_only_a_kernels_first_compile_runs_without_knowledge_and_it_holds_the_kernels_lock(
        tmp_path):
    """The first pass 4 for a kernel with no stored knowledge gets none and the path to make it at
    (the kernel's lock stays held, for the warm-up after it to release); once knowledge is stored
    there, compiles get it and hold nothing."""
    config = types.SimpleNamespace(cache_dir=str(tmp_path), arch="x86_64", runtime=None,
                                   includes=())
    req = Request("4.8", "6.1.0-1-amd64", "x86_64", ["-p4", "-e" + SCRIPT], {}, False)
    assert stap_server.kernel_knowledge(config, dataclasses.replace(req, args=["-p2"])) == \
        ({}, None)
    files, path = stap_server.kernel_knowledge(config, req)
    known = stap_server.KNOWN_KERNELS[path]
    assert files == {} and path == stap_server.knowledge_path(config, req)
    assert not known.lock.acquire(blocking=False), "the first compile does not hold the lock"
    os.mkdir(tmp_path / "knowledge")
    stap_server.store_knowledge(path, {HEADER: b"h"})  # as the warm-up after it would
    known.lock.release()
    assert stap_server.kernel_knowledge(config, req) == ({HEADER: b"h"}, None)
    assert not known.lock.locked()


TRACEQUERY = "9c/tracequery_9cbd_791.o"


@pytest.mark.parametrize("entries, args, traces", [
    ([], ["-p4", "-e", 'probe kernel.trace("sched_switch") {}'], True),
    ([], ["-p4", "-e", 'probe kernel . trace("*")? {}'], True),
    ([], ["-p4", "-e", 'probe kernel.function("schedule") {}'], False),
    ([("t/a.stp", b'probe my.switch = kernel.trace("sched_switch") {}')],
     ["-p4", "-It", "-e", "probe my.switch {}"], True),
])
def test_a_request_naming_kernel_trace_is_told_by_its_scripts(entries, args, traces):
    archive = RequestArchive(open_archive(zip_bytes(
        [("version", b"4.8"), ("sysinfo", b"sysinfo: 6.1.0-1-amd64 x86_64")]
        + [(f"argv{n}", a.encode()) for n, a in enumerate(args, 1)]
        + [(f"tapset/{name}", data) for name, data in entries])), Limits())
    config = types.SimpleNamespace(releases=["6.1.0-1-amd64"], arch="x86_64", allow_guru=False,
                                   fetch_kernels=False)
    assert parse_request(archive, config).traces is traces


def test_the_tracepoint_queries_are_links_into_the_servers_directory_shown_read_only(tmp_path):
    shared = stap_server.SharedFile(str(tmp_path / "k.tracequery"), "/stap/tracequery",
                                    TRACEQUERY)
    assert stap_server.shared_binds({HEADER: b"h", TRACEQUERY: shared}) == [
        "--ro-bind", str(tmp_path / "k.tracequery"), "/stap/tracequery"]
    ws = stap_server.Workspace(str(tmp_path))
    try:
        ws.hand_over(None, {HEADER: b"h", TRACEQUERY: shared})
        cache = pathlib.Path(ws.work, ".systemtap", "cache")
        assert os.readlink(cache / TRACEQUERY) == f"/stap/tracequery/{TRACEQUERY}"
        assert not ws.built_tracepoint_queries()  # the server's links are not the compile's
        (cache / "9c" / "tracequery_ffff_1.o").write_bytes(b"")
        assert ws.built_tracepoint_queries()
    finally:
        ws.remove()


def test_tracepoint_knowledge_is_loaded_as_names_of_regular_files(tmp_path):
    path = str(tmp_path / "6.1.0-1-amd64-x86_64-0123456789abcdef.tracequery")
    stap_server.store_knowledge(path, {TRACEQUERY: b"", "9c/tracequery_9cbe_791.o": b"\x7fELF"})
    os.symlink("/etc/passwd", os.path.join(path, "9c", "tracequery_9cbf_791.o"))
    assert stap_server.load_knowledge(path, stap_server.TRACEQUERY_KNOWLEDGE,
                                      stap_server.is_regular) == {
        TRACEQUERY: True, "9c/tracequery_9cbe_791.o": True}
