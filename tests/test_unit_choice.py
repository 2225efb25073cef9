"""Unit tier (no root, no network, no stap): how a client chooses among
advertised servers.  Signers first when staprun will want a signature,
then the servers about as free as the freest in rendezvous order for the
request, then the busier ones; what makes two requests the same; what the
load hint means."""

import io
import types
import zipfile

import pytest

import stap_client
import stap_server
from stap_client import ServerRecord, expected_wait, rank_servers, request_identity

pytestmark = pytest.mark.unit


def record(port, certinfo="01:02", version="4.8", **load):
    txt = {k: str(v) for k, v in load.items()}
    return ServerRecord(host="a.local", address="10.0.0.1", port=port, sysinfo="r x86_64",
                        version=version, certinfo=certinfo, txt=txt, name=f"s{port}")


def test_expected_wait_from_the_load_hint():
    assert expected_wait(record(1)) == 0.0  # no hint: assume free
    assert expected_wait(record(1, slots=2, busy=1, queued=0, compile=3)) == 0.0
    assert expected_wait(record(1, slots=2, busy=2, queued=0, compile=3)) == 3.0
    assert expected_wait(record(1, slots=2, busy=2, queued=5, compile=3)) == 9.0
    assert expected_wait(record(1, slots="x", busy=2, queued=5, compile=3)) == 0.0


def test_rendezvous_sends_identical_requests_to_one_server_and_spreads_others():
    fleet = [record(p, slots=2, busy=0, queued=0, compile=3) for p in (1, 2, 3)]
    first = {rank_servers(fleet, b"same request")[0].port for _ in range(5)}
    assert len(first) == 1
    # the order does not depend on the order discovery found them in
    assert rank_servers(fleet[::-1], b"same request")[0].port in first
    chosen = {rank_servers(fleet, f"request {n}".encode())[0].port for n in range(30)}
    assert chosen == {1, 2, 3}


def test_busy_servers_go_last_and_signers_first():
    free = record(1, slots=2, busy=0, queued=0, compile=3)
    nearly = record(2, slots=2, busy=2, queued=0, compile=1)  # 1 s: within the grace
    busy = record(3, slots=2, busy=2, queued=10, compile=3)  # 18 s
    busier = record(4, slots=1, busy=1, queued=10, compile=3)  # 33 s
    for identity in (b"a", b"b", b"c", b"d"):
        order = [r.port for r in rank_servers([busier, busy, nearly, free], identity)]
        assert set(order[:2]) == {1, 2} and order[2:] == [3, 4], order
    signer = record(5, certinfo="0a:0b", slots=1, busy=1, queued=10, compile=3)
    order = rank_servers([free, signer], b"x", signers={0x0a0b})
    assert [r.port for r in order] == [5, 1]


def test_newer_versions_first_among_equals():
    old, new = record(1, version="4.6"), record(2, version="5.1")
    assert [r.port for r in rank_servers([old, new], b"x")] == [2, 1]


def zipped(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def test_request_identity_ignores_dates_version_and_locale():
    one = zipped([("version", "4.8"), ("argv1", "-p2"), ("locale", "LANG=C\n")])
    two = zipped([("argv1", "-p2"), ("version", "5.0"), ("locale", "LANG=de_DE.UTF-8\n")])
    other = zipped([("version", "4.8"), ("argv1", "-p4")])
    identity = lambda data: request_identity(zipfile.ZipFile(io.BytesIO(data)).infolist())
    assert identity(one) == identity(two)
    assert identity(one) != identity(other)


def test_serial_specs_are_told_from_hosts():
    assert stap_client.SERIAL_SPEC.match("70:60:53:1a")
    assert stap_client.SERIAL_SPEC.match("00:c1:02")
    for spec in ("host", "host:1234", "[fe80::1]:1234", "10.0.0.1:5555", "fe80::1"):
        assert not stap_client.SERIAL_SPEC.match(spec), spec


def test_servers_with_the_release_first_then_those_that_fetch_kernels():
    def rec(port, sysinfo, address="10.0.0.1"):
        return ServerRecord(host="a.local", address=address, port=port, sysinfo=sysinfo,
                            version="4.8", certinfo="01:02", txt={}, name=f"s{port}{sysinfo}")
    exact = rec(1, "6.1.0-57-amd64 x86_64")
    fetching = rec(2, "x86_64")
    both = [rec(3, "6.1.0-57-amd64 x86_64"), rec(3, "x86_64")]  # one server, two instances
    other = rec(4, "6.1.0-50-amd64 x86_64")
    arm = rec(5, "aarch64")
    records = [other, fetching, arm, *both, exact]
    assert stap_client.serving(records, "6.1.0-57-amd64 x86_64") == (
        [both[0], exact], [fetching])
    assert stap_client.serving(records, "6.1.0-9-amd64 x86_64") == ([], [fetching, both[1]])
    order = [p.port for p in stap_client.compatible_first(records, "6.1.0-57-amd64 x86_64")]
    assert set(order[:2]) == {1, 3} and order[2] == 2 and sorted(order[3:]) == [4, 5]


def test_a_fetching_server_also_advertises_its_bare_architecture():
    config = types.SimpleNamespace(releases=["6.1.0-57-amd64"], arch="x86_64",
                                   fetch_kernels=False)
    assert stap_server.advertised_sysinfos(config) == ["6.1.0-57-amd64 x86_64"]
    config.fetch_kernels = True
    assert stap_server.advertised_sysinfos(config) == ["6.1.0-57-amd64 x86_64", "x86_64"]
