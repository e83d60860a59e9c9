"""The scripts' commands without Redis: the keys and arguments each call sends (in the order
its script's header gives), and each script's reply parsed into typed values."""

from __future__ import annotations

import hashlib
import re

import pytest

from strands_dedup import DedupConfig
from strands_dedup._keys import KeySchema
from strands_dedup._protocol import Busy, Claimed, Grant, Queued, QueueFull, Replay, Taken
from strands_dedup._store.commands import (
    SCRIPTS,
    Commands,
    CommitLost,
    Committed,
    HeldLeaseRef,
    HeldTicketRef,
    ReadFirst,
    Settled,
    TooFull,
    TurnMoved,
    claim_again,
    parse_claim,
    parse_conversation,
    parse_flags,
    parse_release,
    parse_session,
    parse_session_release,
    parse_settle,
    parse_stream_append,
)

pytestmark = pytest.mark.timeout(10)

CONFIG = DedupConfig(namespace="ns", lease_ttl=3, result_ttl=60)
KEYS = KeySchema("ns").for_token("tok", "tenant")
SESSION = KeySchema("ns").for_session("s-1")


def test_every_script_in_lua_is_known_with_its_sha() -> None:
    from importlib import resources

    files = resources.files("strands_dedup._store").joinpath("lua")
    names = {f.name.removesuffix(".lua") for f in files.iterdir() if f.name.endswith(".lua")}
    assert set(SCRIPTS) == names - {"fence"}  # fence.lua is the prelude of claim and release
    for script in SCRIPTS.values():
        assert script.sha == hashlib.sha1(script.source.encode()).hexdigest()
        assert script.source.startswith("--[[")  # every script starts with its header
    assert "function next_fence" in SCRIPTS["claim"].source
    assert "function next_fence" in SCRIPTS["release"].source
    assert "function next_fence" not in SCRIPTS["settle"].source


def test_the_claim_and_settle_calls() -> None:
    commands = Commands(CONFIG, cluster=False)
    claim = commands.claim(KEYS, "ab1", b'{"fp":null}')
    assert claim.keys == (KEYS.lease, KEYS.fence, KEYS.result)
    assert claim.args == ("ab1", b"3000", b'{"fp":null}', str(CONFIG.fence_ttl_ms).encode())
    assert claim.evalsha() == ("EVALSHA", SCRIPTS["claim"].sha, 3, *claim.keys, *claim.args)
    assert claim.eval()[:2] == ("EVAL", SCRIPTS["claim"].source)
    settle = commands.settle(KEYS, "ab1", 7, b"env", b"Venv")
    # the value message of the stored envelope is built by the script: sent once
    assert settle.args == ("ab1", "7", b"env", b"60000", KEYS.channel, b"", "PUBLISH")
    shared = commands.settle(KEYS, "ab1", 7, b"", b"Venv")  # a failure shared, not stored
    assert (shared.args[2], shared.args[5]) == (b"", b"Venv")
    assert Commands(CONFIG, cluster=True).settle(KEYS, "o", 1, b"", b"R1").args[-1] == "SPUBLISH"


def test_the_batched_calls_put_each_items_keys_in_order() -> None:
    commands = Commands(CONFIG, cluster=False)
    other = KeySchema("ns").for_token("other")
    renew = commands.renew([HeldLeaseRef(KEYS, b"v1"), HeldLeaseRef(other, b"v2")])
    assert renew.keys == (
        KEYS.lease,
        KEYS.fence,
        KEYS.result,
        other.lease,
        other.fence,
        other.result,
    )
    assert renew.args == (b"3000", str(CONFIG.fence_ttl_ms).encode(), b"v1", b"v2")
    tickets = commands.session_renew([HeldTicketRef(SESSION, "t1"), HeldTicketRef(SESSION, "t2")])
    assert tickets.keys == (SESSION.holders, SESSION.qexp) * 2
    assert tickets.args == (b"3000", "t1", "t2")
    append = commands.stream_append(KEYS, "ab1", 4, [(b"b", b""), (b"c", b"x")], 9000, 0)
    assert append.keys == (KEYS.lease, KEYS.fence, KEYS.stream)
    assert append.args == ("ab1", 4, 9000, KEYS.channel, "PUBLISH", 0, b"b", b"", b"c", b"x")


def test_the_session_calls_fill_all_fourteen_arguments() -> None:
    commands = Commands(CONFIG, cluster=False)
    acquire = commands.session_acquire(
        SESSION, ticket="", owner="ab1", mode="queue", limit=1, max_queue=5, meta="{}",
        seq=None, gap_ms=100, first_seq=1, idle_ttl_ms=5000,
    )  # fmt: skip
    assert acquire.keys == (*SESSION.all, SESSION.conversation)
    assert acquire.args == (
        "acquire", "", "ab1", "queue", 1, 5, 3000, "{}", "", 100, 1, SESSION.channel, "PUBLISH",
        5000,
    )  # fmt: skip
    release = commands.session_release(SESSION, "t1", 5000)
    assert len(release.args) == 14 and release.args[:2] == ("release", "t1")
    header = SCRIPTS["session"].source.split("]]", 1)[0]
    assert max(int(n) for n in re.findall(r"ARGV\[(\d+)\]", header)) == 14
    conversation = commands.conversation(
        SESSION, [("s", b"{}")], ticket="t1", fence=3, turn=2, idle_ttl_ms=10,
        max_messages=100, max_bytes=1000,
    )  # fmt: skip
    assert conversation.keys == (SESSION.conversation, SESSION.holders, SESSION.state)
    assert conversation.args == ("t1", 3, 2, 10, 100, 1000, "s", b"{}")


def test_claim_replies() -> None:
    assert parse_claim([b"R", b"env"]) == Replay(b"env")
    assert parse_claim([b"C", 3]) == Claimed(3)
    assert parse_claim([b"C", b"3"]) == Claimed(3)  # a retried claim finding its own lease
    busy = parse_claim([b"L", b'ab12|4|{"fp":"f1","h":"host","p":9}', 1500])
    assert isinstance(busy, Busy)
    assert (busy.lease.owner, busy.lease.fence, busy.lease.pttl_ms) == ("ab12", 4, 1500)
    assert busy.lease.fingerprint == "f1" and busy.lease.meta["p"] == 9
    for junk in ([b"?"], [], None, b"C"):
        with pytest.raises(ValueError, match="unexpected claim reply"):
            parse_claim(junk)


def test_settle_release_renew_append_replies() -> None:
    assert parse_settle([1, b"ok"]) == Settled(True, "ok")
    assert parse_settle([0, b"fence", b"9"]) == Settled(False, "fence")
    assert parse_settle([0, "fence", ""]) == (False, "fence")  # decoded: a completed token
    with pytest.raises(ValueError, match="unexpected settle reply"):
        parse_settle(1)
    assert parse_release([1, b"ab|3|{}"]) == b"ab|3|{}"
    assert parse_release([0]) is None
    assert parse_flags([1, 0, 1]) == [True, False, True]
    with pytest.raises(ValueError):
        parse_flags(b"x")
    assert parse_stream_append(1) is True and parse_stream_append(0) is False


def test_session_replies() -> None:
    grant = parse_session([b"H", b"t1", b"5|-1|-1|0", [b"turn", b"2", "n", 1]])
    assert grant == Grant("t1", 5, None, False, {b"turn": b"2", b"n": b"1"})
    assert parse_session([b"H", b"t1", b"6|2|3|1"]) == Grant("t1", 6, (2, 3), True)
    assert parse_session([b"Q", b"t2", 1, 2, 300]) == Queued("t2", 1, 2, 300)
    assert parse_session([b"B", 1, 0, 50]) == Taken(1, 0, 50)
    assert parse_session([b"O", 1, 9]) == QueueFull(1, 9)
    with pytest.raises(ValueError, match="unexpected session reply"):
        parse_session([b"Z"])
    assert parse_session_release([b"X", 1]) is True
    assert parse_session_release([b"X", 0]) is False
    with pytest.raises(ValueError):
        parse_session_release([b"H", 1])


def test_conversation_replies() -> None:
    assert parse_conversation([b"OK", 3, 2500]) == Committed(3, 2500)
    assert parse_conversation([b"LOST", 0]) == CommitLost()
    assert parse_conversation([b"TURN", 4]) == TurnMoved(4)
    assert parse_conversation([b"FULL", 101, 2000]) == TooFull(101, 2000)
    with pytest.raises(ValueError, match="unexpected conversation reply"):
        parse_conversation([b"NOPE"])


def test_a_slow_claim_is_sent_again() -> None:
    assert not claim_again(10.0, 10.5, 1.0)
    assert claim_again(10.0, 11.5, 1.0)


def test_claims_read_first_only_while_replays_are_common() -> None:
    read_first = ReadFirst()
    assert not read_first  # a new store claims first: a fresh call is one round trip
    for _ in range(3):
        read_first.saw(True)
    assert not read_first
    read_first.saw(True)  # the fourth replay in a row
    assert read_first
    for _ in range(200):  # replays only, for a while
        read_first.saw(True)
    fresh = 0
    while read_first:
        read_first.saw(False)
        fresh += 1
    assert 60 <= fresh <= 80  # then about 70 fresh calls in a row switch back
    for _ in range(200):  # one replay in twenty: claim first
        for i in range(20):
            read_first.saw(i == 0)
    assert not read_first
    for _ in range(200):  # one in five: read first
        for i in range(5):
            read_first.saw(i == 0)
    assert read_first
