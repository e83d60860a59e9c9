"""The parts beside the engine, without Redis: reading a stored result back, the eviction policy
read once, the sessions held or waited for, the stats publisher's lifecycle."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from strands_dedup import (
    DedupConfig,
    FingerprintMismatch,
    JsonSerializer,
    NotStored,
    PrimaryFailed,
    SerializationError,
    SignedPickleSerializer,
    StoreRefused,
    StoreUnavailable,
)
from strands_dedup._engine.health import SessionActivity, StorePolicy
from strands_dedup._engine.observe import Observer, StatsPublisher
from strands_dedup._keys import KeySchema
from strands_dedup._protocol import Role, decode_envelope, encode_envelope, envelope_header
from strands_dedup._serialization import outcome_from_bytes, outcome_from_envelope

pytestmark = pytest.mark.timeout(10)

KEYS = KeySchema("parts").for_token("req-1", scope="tenant-1")


def _stored(
    payload: bytes = b'{"n":1}', *, ok: bool = True, fp: str | None = "fp-1", **header: Any
) -> bytes:
    head = envelope_header(
        ok=ok,
        fence=7,
        fingerprint=fp,
        serializer=header.pop("serializer", "json"),
        created_ms=0,
        token=KEYS.token,
        scope="tenant-1",
        **header,
    )
    return encode_envelope("owner-1", head, payload)


# -- reading a stored result back -------------------------------------------------------------


def test_a_stored_result_reads_back_as_the_callers_type_role_and_fence() -> None:
    outcome = outcome_from_bytes(
        _stored(), Role.WAITER, KEYS, "fp-1", dict[str, int], JsonSerializer()
    )
    assert (outcome.value, outcome.role, outcome.fence) == ({"n": 1}, Role.WAITER, 7)
    same = outcome_from_envelope(
        decode_envelope(_stored()), Role.REPLAY, KEYS, None, Any, JsonSerializer()
    )
    assert (same.value, same.role) == ({"n": 1}, Role.REPLAY)


def test_what_a_stored_result_stands_for_is_raised_with_its_token() -> None:
    json = JsonSerializer()
    with pytest.raises(SerializationError, match="not a strands-dedup result") as bad:
        outcome_from_bytes(b"\x80\x04pickle", Role.REPLAY, KEYS, None, Any, json)
    assert bad.value.token == KEYS.token
    with pytest.raises(FingerprintMismatch):
        outcome_from_bytes(_stored(), Role.REPLAY, KEYS, "fp-2", Any, json)
    with pytest.raises(PrimaryFailed, match="ValueError: boom") as failed:
        outcome_from_bytes(
            _stored(b"", ok=False, error_type="ValueError", error_message="boom"),
            Role.WAITER,
            KEYS,
            "fp-1",
            Any,
            json,
        )
    assert failed.value.fence == 7
    with pytest.raises(NotStored):
        outcome_from_bytes(
            _stored(b"x", ok=False, error_message="shared", shared_only=True),
            Role.WAITER,
            KEYS,
            "fp-1",
            Any,
            json,
        )
    with pytest.raises(SerializationError, match="serializer 'json'"):
        outcome_from_bytes(
            _stored(), Role.REPLAY, KEYS, None, Any, SignedPickleSerializer(b"k" * 16)
        )
    with pytest.raises(SerializationError, match="does not validate") as invalid:
        outcome_from_bytes(_stored(), Role.REPLAY, KEYS, None, int, json)
    assert invalid.value.token == KEYS.token


# -- the eviction policy, read once -----------------------------------------------------------


class _PolicyStore:
    """A store whose ``eviction_policy`` answers from a list (an exception is raised)."""

    where = "redis://policy"

    def __init__(self, *answers: str | Exception) -> None:
        self.answers = list(answers)
        self.reads = 0

    async def eviction_policy(self) -> str:
        self.reads += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _policy(store: _PolicyStore, **config: Any) -> StorePolicy:
    return StorePolicy(store, DedupConfig(**config))  # type: ignore[arg-type]


def test_the_policy_is_read_once_and_again_only_while_redis_does_not_answer() -> None:
    async def main() -> None:
        store = _PolicyStore(StoreUnavailable("down"), "noeviction", "allkeys-lru")
        policy = _policy(store)
        await policy.read_once()
        assert not policy.accepted and store.reads == 1  # unreachable: read at the next call
        await asyncio.gather(policy.read_once(), policy.read_once())
        assert policy.accepted and store.reads == 2  # concurrent callers share one read
        await policy.read_once()
        assert store.reads == 2

    asyncio.run(main())


def test_require_noeviction_refuses_an_evicting_redis_every_time_it_is_asked() -> None:
    async def main() -> None:
        store = _PolicyStore("allkeys-lru")
        policy = _policy(store, require_noeviction=True)
        for _ in range(2):
            with pytest.raises(StoreRefused, match="require_noeviction"):
                await policy.read_once()
        assert not policy.accepted and store.reads == 1

    asyncio.run(main())


# -- sessions held or waited for --------------------------------------------------------------


def test_session_activity_counts_holds_and_waits_and_forgets_an_idle_session() -> None:
    schema = KeySchema("parts")
    a, b = schema.for_session("a"), schema.for_session("b")
    activity = SessionActivity()
    activity.change(a, held=1)
    activity.change(a, waiting=1)
    activity.change(b, held=1)
    assert (len(activity), activity.held, activity.waiting) == (2, 2, 1)
    assert activity.local(1) == [(a, 1, 1)]
    activity.change(a, held=-1)
    activity.change(a, waiting=-1)
    assert (len(activity), activity.local(10)) == (1, [(b, 1, 0)])


# -- the stats publisher ----------------------------------------------------------------------


class _StatsStore:
    def __init__(self) -> None:
        self.published: list[dict[str, int] | None] = []
        self.first = asyncio.Event()

    async def publish_stats(self, key: bytes, counts: dict[str, int] | None, ttl_ms: int) -> None:
        assert key == b"parts:stats:me" and ttl_ms == 4000
        self.published.append(counts)
        self.first.set()


def test_the_publisher_starts_once_sends_changed_counters_and_never_after_it_closed() -> None:
    async def main() -> None:
        observer = Observer("parts", None)
        observer.count("claims")
        store = _StatsStore()
        publisher = StatsPublisher(observer, store, b"parts:stats:me", 1.0, 1.0)  # type: ignore[arg-type]
        assert not publisher.started
        publisher.start()
        publisher.start()
        await asyncio.wait_for(store.first.wait(), 5)
        assert publisher.started and store.published[0] is not None
        assert store.published[0]["claims"] == 1
        await publisher.aclose()
        closed = StatsPublisher(observer, store, b"parts:stats:me", 1.0, 1.0)  # type: ignore[arg-type]
        await closed.aclose()
        closed.start()  # closed before its first call: nothing starts
        assert not closed.started

    asyncio.run(main())


# -- what a primary's call knows about itself -------------------------------------------------


def test_a_call_sees_its_own_context_and_a_loss_reported_before_it_first_asked() -> None:
    from strands_dedup._engine.call import current_call, is_running, primary_context
    from strands_dedup._engine.renewer import HeldLease

    outer = HeldLease(KEYS, "own-1", 4, b"v", Role.PRIMARY, None)
    inner_keys = KeySchema("parts").for_token("req-2")
    inner = HeldLease(inner_keys, "own-2", 9, b"v", Role.TAKEOVER, None)
    assert current_call() is None
    with primary_context(outer, "redis"):
        first = current_call()
        assert first is not None and current_call() is first  # one context per call
        assert (first.token, first.scope, first.fence, first.role) == (
            "req-1",
            "tenant-1",
            4,
            Role.PRIMARY,
        )
        assert first.identity == b"parts:{tenant-1:req-1}" and not first.lost.is_set()
        inner.lost = True  # the renewer found it lost before the call asked for its context
        with primary_context(inner, "redis"):
            context = current_call()
            assert context is not None and context.fence == 9 and context.lost.is_set()
            assert is_running("redis", KEYS.lease) and is_running("redis", inner_keys.lease)
            assert not is_running("elsewhere", KEYS.lease)
        assert current_call() is first and not is_running("redis", inner_keys.lease)
    assert current_call() is None and not is_running("redis", KEYS.lease)
