"""Unit tier (no root, no network, no stap): the listener's admission.
The connection table's eviction policy (issue 20, finding 7), on socket
pairs: when it is full a newcomer takes the place of the oldest unread
connection of the address holding the most, or of its own address when
that holds as many; the evicted one is shut down and taken out of its
address's line; nothing is evicted for a connection whose request is read.
And the line of FifoSlots, entered and waited for apart."""

import logging
import resource
import socket
import threading

import pytest

from stap_server import AddressSlots, ConnectionTable, DropCounts, FifoSlots

pytestmark = pytest.mark.unit


class Table:
    """A ConnectionTable of `limit` places with one slot per address, fed with socket pairs."""

    def __init__(self, limit, per_address=1):
        self.slots = AddressSlots(per_address, DropCounts())
        self.table = ConnectionTable(limit, self.slots, self.slots.drops)
        self.peers = {}  # the server's end -> the client's end

    def connect(self, address):
        ours, theirs = socket.socketpair()
        self.peers[ours] = theirs
        conn = self.table.admit(ours, address)
        if conn is None:
            ours.close()
        return conn

    def unread(self):
        return {address: len(line) for address, line in self.table.unread.items()}

    def close(self):
        for ours, theirs in self.peers.items():
            self.table.release(ours)
            ours.close()
            theirs.close()


def shut_down(table, conn):
    """Whether the client's end of conn sees the server's end shut down."""
    ours = next(s for s, c in table.table.held.items() if c is conn)
    theirs = table.peers[ours]
    theirs.settimeout(1)
    return theirs.recv(1) == b""


def test_a_newcomer_takes_the_place_of_the_largest_holders_oldest(caplog):
    t = Table(4)
    try:
        a1, a2, a3, b1 = [t.connect(x) for x in "aaab"]
        with caplog.at_level(logging.WARNING):
            c1 = t.connect("c")
        assert c1 is not None and a1.evicted and not a2.evicted
        assert shut_down(t, a1)
        assert t.unread() == {"a": 2, "b": 1, "c": 1}
        assert t.connect("d") is not None and a2.evicted
        assert t.unread() == {"a": 1, "b": 1, "c": 1, "d": 1}
        assert "dropped 1 connections from a (unread, oldest first)" in caplog.text
    finally:
        t.close()


def test_an_address_never_loses_its_last_one_to_a_bigger_one():
    t = Table(3)
    try:
        a1, a2, b1 = [t.connect(x) for x in "aab"]
        a3 = t.connect("a")  # a holds as many as any: its own oldest goes
        assert a1.evicted and not b1.evicted and not a3.evicted
        b2 = t.connect("b")  # b holds 1 < 2: a's oldest goes
        assert a2.evicted and not b1.evicted and not b2.evicted
        assert t.unread() == {"a": 1, "b": 2}
    finally:
        t.close()


def test_ties_go_oldest_first_and_read_requests_stay():
    t = Table(3)
    try:
        a1, b1, c1 = [t.connect(x) for x in "abc"]
        assert t.table.read(a1)
        d1 = t.connect("d")  # b, c hold 1 each, a none unread: b's is the oldest unread
        assert b1.evicted and not a1.evicted and not c1.evicted and d1 is not None
        assert not t.table.read(b1)  # evicted already
    finally:
        t.close()


def test_refused_when_every_request_held_is_read(caplog):
    t = Table(2)
    try:
        for conn in (t.connect("a"), t.connect("b")):
            t.table.read(conn)
        with caplog.at_level(logging.WARNING):
            assert t.connect("c") is None
        assert "dropped 1 connections from c at once" in caplog.text
    finally:
        t.close()


def test_an_evicted_connection_waiting_in_line_is_woken():
    t = Table(2)
    try:
        first, waiting = t.connect("a"), t.connect("a")  # one slot per address: waits
        got = []
        waiter = threading.Thread(target=lambda: got.append(
            t.slots.wait("a", waiting.turn, 30)))
        waiter.start()
        t.connect("b")  # a holds 2 > 0: its oldest, the first, goes
        t.connect("c")  # a holds 1, b 1: the oldest of them, a's second, goes
        waiter.join(5)
        assert got == [False] and first.evicted and waiting.evicted
        assert t.slots.counts("a") == (1, 0)  # the first's slot, given back by its handler
    finally:
        t.close()


def test_fifo_slots_hand_a_slot_to_a_waiting_turn():
    slots = FifoSlots(1)
    assert slots.take("k", 0)
    turn = slots.enter("k")
    assert not turn.is_set()
    slots.give_back("k")
    assert turn.is_set() and slots.withdraw("k", turn)
    late = slots.enter("k")
    assert not slots.withdraw("k", late) and slots.counts("k") == (1, 0)


def test_100_addresses_past_a_full_table_end_with_even_shares():
    """The finding's attack in small: 100 addresses x 16 into 1,024 places."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    if saved[1] < 5000:
        pytest.skip(f"needs 5,000 open files; the hard limit is {saved[1]}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(saved[0], 5000), saved[1]))
    t = Table(1024, per_address=16)
    try:
        for n in range(100):
            for _ in range(16):
                assert t.connect(f"10.0.0.{n}") is not None
        shares = t.unread().values()
        assert len(shares) == 100 and sum(shares) == 1024
        assert (min(shares), max(shares)) == (10, 11)
        assert t.connect("10.0.1.1") is not None  # one more: still let in
    finally:
        t.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
