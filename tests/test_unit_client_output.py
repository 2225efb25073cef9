"""Unit tier (no root, no network, no stap): what stap-client and
stap-find-servers make of what they were told.  Advertised records (TXT
keys, the listing line, repeats, the trust shown), why no server was found,
the domains configured for wide-area browsing, the retry pause, and the
server's paths turned back into the user's own in stap's output."""

import pytest

from stap_client import (
    DiscoveryError,
    advertised_serial,
    backoff,
    describe_search,
    first_answering,
    format_server_line,
    local_paths,
    parse_avahi_txt,
    parse_stap_args,
    record_from_txt,
    trust_of,
    txt_dict,
    unescape_avahi_label,
    unique_records,
    wide_area_domains,
    without_module_paths,
)

pytestmark = pytest.mark.unit

TXT = {"sysinfo": "6.1.0-1-amd64 x86_64", "version": "4.8", "certinfo": "0a:0b",
       "optinfo": "", "slots": "2", "busy": "0"}


def record(**changes):
    rec = record_from_txt("Systemtap Compile Server on h", "h.local.", "10.0.0.1", "5555", TXT)
    return rec._replace(**changes)


def test_a_record_from_its_txt_keys():
    rec = record()
    assert (rec.host, rec.address, rec.port) == ("h.local", "10.0.0.1", 5555)
    assert (rec.sysinfo, rec.version, rec.certinfo) == ("6.1.0-1-amd64 x86_64", "4.8", "0a:0b")
    with pytest.raises(ValueError):
        record_from_txt("n", "h", "10.0.0.1", "port", TXT)


def test_txt_strings_first_key_wins_whatever_its_case():
    assert txt_dict([b"a=1", "A=2", "b", "=x", "c=x=y"]) == {"a": "1", "b": "", "c": "x=y"}
    assert parse_avahi_txt('"a=1" "b=x y" "c=q\\"d"') == ["a=1", "b=x y", 'c=q"d']
    assert unescape_avahi_label(r"Systemtap\032Compile\.x\\y") == "Systemtap Compile.x\\y"


def test_the_listing_line():
    assert format_server_line(record()) == (
        "h.local 10.0.0.1 5555 'sysinfo=6.1.0-1-amd64 x86_64' 'version=4.8' "
        "'certinfo=0a:0b' 'optinfo=' 'busy=0' 'slots=2'")


def test_one_server_seen_twice_is_listed_once():
    rec = record()
    assert unique_records([rec, rec._replace(port=1), rec]) == [rec, rec._replace(port=1)]


def test_trust_by_the_advertised_serial():
    rec = record()
    assert advertised_serial(rec) == 0x0A0B
    assert advertised_serial(record(certinfo="not hex")) is None
    assert trust_of(rec, {"ssl": {0x0A0B}, "signer": set()}) == "ssl"
    assert trust_of(rec, {"ssl": {0x0A0B}, "signer": {0x0A0B}}) == "ssl,signer"
    assert trust_of(record(certinfo=""), {"ssl": {0x0A0B}, "signer": set()}) == "none"


def test_why_no_server_was_found():
    assert describe_search([], "avahi") == \
        "no server is advertised on the local network (searched with avahi)"
    assert describe_search([record(), record(host="g", sysinfo="5.10 aarch64")], "mdns") == (
        "no advertised server serves it (g serves 5.10 aarch64, "
        "h.local serves 6.1.0-1-amd64 x86_64; searched with mdns)")


def test_the_first_back_end_that_answers_is_taken():
    """The "auto" choice over a registry of back ends: avahi when its daemon answers, else our own;
    a back end chosen by name is tried alone, and its absence is a one-line error."""
    ask = lambda back_end: back_end()
    no_daemon = {"avahi": lambda: None, "mdns": lambda: []}
    assert first_answering(no_daemon, ask) == ("mdns", [])
    daemon = {**no_daemon, "avahi": lambda: ["a record"]}
    assert first_answering(daemon, ask) == ("avahi", ["a record"])
    assert first_answering(daemon, ask, "mdns") == ("mdns", [])
    with pytest.raises(DiscoveryError, match="^no avahi daemon answers$"):
        first_answering(no_daemon, ask, "avahi")


def test_wide_area_domains_from_options_and_the_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("STAP_SYSCONFDIR", str(tmp_path))
    assert wide_area_domains() == []  # none configured: no unicast DNS query at all
    assert wide_area_domains(["a.test"]) == ["a.test"]
    (tmp_path / "systemtap").mkdir()
    (tmp_path / "systemtap" / "stap-server-domains").write_text(
        "# domains to browse\nb.test\n\n  search  # the host's search domains\na.test\n")
    assert wide_area_domains(["a.test"]) == ["a.test", "b.test", "search"]


def test_the_retry_pause_doubles_up_to_8_s_with_jitter():
    for attempt, base in ((0, 0.25), (1, 0.5), (3, 2.0), (5, 8.0), (9, 8.0)):
        for _ in range(20):
            assert base * 0.5 <= backoff(attempt) <= base * 1.5


def test_module_paths_of_the_server_are_dropped():
    assert without_module_paths(b"a\n/tmp/x/stap_1.ko\nb.ko is a name\nlast.ko") == \
        b"a\nb.ko is a name\n"


def test_the_users_files_are_named_as_stap_would_here(tmp_path):
    script = tmp_path / "x.stp"
    script.write_text("probe begin {}")
    inv = parse_stap_args(["-p2", "-I", "/nonexistent/t", str(script)])
    out = local_paths(f"error in script{script}:1 and tapset/nonexistent/t/a.stp:2".encode(),
                      inv)
    assert out == f"error in {script}:1 and /nonexistent/t/a.stp:2".encode()

    class Stdin:
        def read(self):
            return b"probe begin {}"

    inv = parse_stap_args(["-p2", "-"], stdin=Stdin())
    assert local_paths(b"parse error at script/-:1:2", inv) == b"parse error at <input>:1:2"
