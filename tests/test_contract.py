"""The protocol's contract, run on every backend: embedded memory:// and a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import pydantic
import pytest
from side import side_of

from strands_dedup import (
    DedupError,
    Deduplicator,
    DuplicateInFlight,
    FingerprintMismatch,
    LeaseLost,
    NotStored,
    PrimaryFailed,
    ReentrantCall,
    ResultTooLarge,
    Role,
    SerializationError,
    SignedPickleSerializer,
    WaitTimeout,
    current_call,
)
from strands_dedup._engine.deduplicator import engine_of
from strands_dedup._protocol import Busy, Claimed, ShareOnly

pytestmark = pytest.mark.timeout(30)


class Gate:
    """A call that signals when it starts and finishes only when released."""

    def __init__(self, value: Any = "done") -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.runs = 0
        self.value = value
        self.fence = 0

    async def __call__(self) -> Any:
        self.runs += 1
        context = current_call()
        self.fence = context.fence if context is not None else 0
        self.started.set()
        await self.release.wait()
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.005)


async def waiting(dedup: Deduplicator, n: int) -> None:
    await until(lambda: dedup.activity().listening >= n)


async def test_primary_then_replay(dedup: Deduplicator) -> None:
    runs = 0

    async def call() -> dict[str, int]:
        nonlocal runs
        runs += 1
        return {"n": runs}

    first = await dedup.execute("t1", call)
    again = await dedup.execute("t1", call)
    assert (first.role, first.value) == (Role.PRIMARY, {"n": 1})
    assert (again.role, again.value, again.fence) == (Role.REPLAY, {"n": 1}, first.fence)
    assert runs == 1
    assert await dedup.run(b"t1", call) == {"n": 1}  # bytes and str tokens are one token


async def test_concurrent_duplicates_wait_and_share_one_execution(dedup: Deduplicator) -> None:
    gate = Gate({"answer": 42})
    primary = asyncio.create_task(dedup.execute("t", gate))
    await gate.started.wait()
    dups = [asyncio.create_task(dedup.execute("t", gate)) for _ in range(20)]
    await waiting(dedup, 20)
    gate.release.set()
    outcomes = await asyncio.gather(primary, *dups)
    assert gate.runs == 1
    assert outcomes[0].role is Role.PRIMARY
    assert {o.role for o in outcomes[1:]} == {Role.WAITER}
    assert all(o.value == {"answer": 42} and o.fence == gate.fence for o in outcomes)
    assert dedup.activity().waiters == 0


async def test_scopes_isolate_tenants(dedup: Deduplicator) -> None:
    a = await dedup.execute("same", lambda: "tenant-a", scope="a")
    b = await dedup.execute("same", lambda: "tenant-b", scope="b")
    assert (a.value, b.value) == ("tenant-a", "tenant-b")
    assert (await dedup.execute("same", lambda: "x", scope="a")).value == "tenant-a"


async def test_fingerprint_mismatch_in_flight_and_completed(dedup: Deduplicator) -> None:
    gate = Gate()
    primary = asyncio.create_task(dedup.execute("t", gate, fingerprint="body-1"))
    await gate.started.wait()
    with pytest.raises(FingerprintMismatch, match="in flight"):
        await dedup.execute("t", gate, fingerprint="body-2")
    gate.release.set()
    await primary
    with pytest.raises(FingerprintMismatch, match="different request"):
        await dedup.execute("t", gate, fingerprint="body-2")
    assert (await dedup.execute("t", gate, fingerprint="body-1")).role is Role.REPLAY
    assert gate.runs == 1


async def test_on_duplicate_raise_fails_fast(make: Callable[..., Any]) -> None:
    async with make(on_duplicate="raise") as dedup:
        gate = Gate()
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        with pytest.raises(DuplicateInFlight) as info:
            await dedup.execute("t", gate)
        assert info.value.fence == gate.fence and 0 < info.value.retry_after <= 2
        assert info.value.token == "t"
        gate.release.set()
        await primary
        assert (await dedup.execute("t", gate)).role is Role.REPLAY


async def test_a_claim_after_a_failure_holds_the_counters_next_fence(
    make: Callable[..., Any],
) -> None:
    # The failure left the token's fence counter: the next claim's fence is the counter's next
    # value, and the lease it wrote (what a duplicate and a settle see) holds that fence too.
    async with make(on_duplicate="raise") as dedup:
        first = Gate(ValueError("model refused"))
        first.release.set()
        with pytest.raises(ValueError):
            await dedup.execute("t", first)
        second = Gate()
        primary = asyncio.create_task(dedup.execute("t", second))
        await second.started.wait()
        assert second.fence > first.fence
        with pytest.raises(DuplicateInFlight) as info:
            await dedup.execute("t", second)
        assert info.value.fence == second.fence
        second.release.set()
        outcome = await primary
        assert (outcome.role, outcome.fence) == (Role.PRIMARY, second.fence)
        again = await dedup.execute("t", second)
        assert (again.role, again.value, again.fence) == (Role.REPLAY, "done", second.fence)


async def test_wait_timeout_bounds_a_waiter(dedup: Deduplicator) -> None:
    gate = Gate()
    primary = asyncio.create_task(dedup.execute("t", gate))
    await gate.started.wait()
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as info:
        await dedup.execute("t", gate, wait_timeout=0.3)
    elapsed = time.monotonic() - started
    # the primary never ends on its own: any bound short of the lease's renewals shows the cap
    assert 0.3 <= elapsed < 5 and info.value.waited >= 0.3
    gate.release.set()
    await primary


async def test_failure_is_shared_with_waiters_but_not_stored(dedup: Deduplicator) -> None:
    gate = Gate(ValueError("model refused"))
    primary = asyncio.create_task(dedup.execute("t", gate))
    await gate.started.wait()
    dup = asyncio.create_task(dedup.execute("t", gate))
    await waiting(dedup, 1)
    gate.release.set()
    with pytest.raises(ValueError, match="model refused"):
        await primary
    with pytest.raises(PrimaryFailed) as info:
        await dup
    assert info.value.error_type == "builtins.ValueError"
    assert info.value.error_message == "model refused"
    assert (await dedup.execute("t", lambda: "second try")).role is Role.PRIMARY


async def test_a_share_only_value_reaches_the_waiters_of_the_moment_and_nothing_more(
    make: Callable[..., Any],
) -> None:
    async with make(cache_errors=True) as dedup:
        gate = Gate(ShareOnly("status 503 is not retained", b"the response"))
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        dup = asyncio.create_task(dedup.execute("t", gate))
        await waiting(dedup, 1)
        gate.release.set()
        with pytest.raises(ShareOnly):
            await primary
        with pytest.raises(NotStored) as info:
            await dup
        assert info.value.shared == b"the response"
        assert info.value.reason == "status 503 is not retained"
        assert isinstance(info.value, PrimaryFailed)  # callers catching failures still do
        assert dedup.counters["failures"] == 0
        # Never stored (not even with cache_errors), and the token is free again.
        again = await dedup.execute("t", lambda: "second try")
        assert again.role is Role.PRIMARY and again.fence > gate.fence


async def test_more_waiters_than_one_wake_up_chunk_all_get_the_value(dedup: Deduplicator) -> None:
    # Past 256 watches on one channel, waiters wake a chunk per loop turn (the subscriber):
    # every one of them still gets the one execution's value.
    gate = Gate({"answer": 42})
    primary = asyncio.create_task(dedup.execute("many", gate))
    await gate.started.wait()
    dups = [asyncio.create_task(dedup.execute("many", gate)) for _ in range(700)]
    await waiting(dedup, 700)
    gate.release.set()
    outcome = await primary
    outcomes = await asyncio.gather(*dups)
    assert gate.runs == 1 and {o.fence for o in outcomes} == {outcome.fence}
    assert all(o.value == {"answer": 42} and o.role is Role.WAITER for o in outcomes)


async def test_retry_mode_hands_the_call_to_one_waiter(make: Callable[..., Any]) -> None:
    async with make(on_primary_error="retry") as dedup:
        gate = Gate(RuntimeError("boom"))
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        runs = 0

        async def retry_call() -> str:
            nonlocal runs
            runs += 1
            return "recovered"

        dups = [asyncio.create_task(dedup.execute("t", retry_call)) for _ in range(5)]
        await waiting(dedup, 5)
        gate.release.set()
        with pytest.raises(RuntimeError):
            await primary
        outcomes = await asyncio.gather(*dups)
        assert runs == 1
        assert sorted(o.role.value for o in outcomes) == ["takeover"] + ["waiter"] * 4
        assert {o.value for o in outcomes} == {"recovered"}
        assert len({o.fence for o in outcomes}) == 1 and outcomes[0].fence > gate.fence


async def test_cache_errors_replays_the_failure(make: Callable[..., Any]) -> None:
    async with make(cache_errors=True) as dedup:

        async def fail() -> None:
            raise KeyError("nope")

        with pytest.raises(KeyError):
            await dedup.execute("t", fail)
        with pytest.raises(PrimaryFailed, match="KeyError"):
            await dedup.execute("t", lambda: "never runs")


async def test_cancelled_primary_releases_and_a_waiter_takes_over(dedup: Deduplicator) -> None:
    gate = Gate()
    primary = asyncio.create_task(dedup.execute("t", gate))
    await gate.started.wait()
    dup = asyncio.create_task(dedup.execute("t", lambda: "mine"))
    await waiting(dedup, 1)
    primary.cancel()
    outcome = await asyncio.wait_for(dup, 1.5)  # well before the 2 s lease would expire
    assert (outcome.role, outcome.value) == (Role.TAKEOVER, "mine")
    assert outcome.fence > gate.fence


async def test_unserializable_result_releases_and_tells_waiters(
    dedup: Deduplicator, backend_url: str
) -> None:
    gate = Gate(object())
    primary = asyncio.create_task(dedup.execute("t", gate))
    await gate.started.wait()
    dup = asyncio.create_task(dedup.execute("t", gate))
    await waiting(dedup, 1)
    gate.release.set()
    with pytest.raises(SerializationError, match="cannot be serialized"):
        await primary
    with pytest.raises(PrimaryFailed, match="SerializationError"):
        await dup
    keys = dedup.token_keys("t")
    async with side_of(backend_url) as side:
        assert await side.exists(keys.lease, keys.result) == 0
    assert (await dedup.execute("t", lambda: "fine")).role is Role.PRIMARY


async def test_oversized_result_is_refused_without_storing(
    make: Callable[..., Any], backend_url: str
) -> None:
    async with (
        make(max_result_bytes=1000, inline_result_bytes=100) as dedup,
        side_of(backend_url) as side,
    ):
        with pytest.raises(ResultTooLarge) as info:
            await dedup.execute("t", lambda: "x" * 5000)
        assert info.value.size > 1000 and info.value.limit == 1000
        keys = dedup.token_keys("t")
        assert await side.exists(keys.lease, keys.result) == 0


async def test_large_result_is_read_once_and_shared(make: Callable[..., Any]) -> None:
    async with make(inline_result_bytes=64) as dedup:
        big = {"text": "y" * 10_000}
        gate = Gate(big)
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        dups = [asyncio.create_task(dedup.execute("t", gate)) for _ in range(10)]
        await waiting(dedup, 10)
        reads = 0
        original = engine_of(dedup).store.get_result

        async def counting(keys: Any) -> bytes | None:
            nonlocal reads
            reads += 1
            return await original(keys)

        engine_of(dedup).store.get_result = counting  # type: ignore[method-assign]
        gate.release.set()
        outcomes = await asyncio.gather(primary, *dups)
        assert all(o.value == big for o in outcomes)
        assert reads == 1


class Receipt(pydantic.BaseModel):
    order_id: str
    amount: int


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def test_idempotent_decorator_round_trips_the_return_type(dedup: Deduplicator) -> None:
    runs = 0

    @dedup.idempotent(key=lambda order_id, amount: order_id)
    async def refund(order_id: str, amount: int) -> Receipt:
        nonlocal runs
        runs += 1
        return Receipt(order_id=order_id, amount=amount)

    @dedup.idempotent()
    async def where(x: int, y: int) -> Point:
        return Point(x, y)

    assert await refund("o-1", 5) == Receipt(order_id="o-1", amount=5)
    replayed = await refund("o-1", 5)
    assert isinstance(replayed, Receipt) and replayed.amount == 5 and runs == 1
    with pytest.raises(FingerprintMismatch):
        await refund("o-1", 6)
    assert await where(1, 2) == Point(1, 2)
    again = await where(1, 2)
    assert isinstance(again, Point)
    with pytest.raises(TypeError, match="not async"):
        dedup.idempotent()(lambda: 1)


async def test_lease_is_renewed_while_a_slow_primary_runs(
    make: Callable[..., Any], backend_url: str
) -> None:
    async with make(lease_ttl=0.3) as dedup, side_of(backend_url) as side:
        gate = Gate("slow")
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        keys = dedup.token_keys("t")
        renewed_past = time.monotonic() + 0.9  # three lease lifetimes
        await until(lambda: time.monotonic() > renewed_past)
        assert await side.pttl(keys.lease) > 0
        with pytest.raises(DuplicateInFlight):
            await dedup.execute("t", gate, on_duplicate="raise")
        gate.release.set()
        assert (await primary).role is Role.PRIMARY and gate.runs == 1


async def _steal(url: str, dedup: Deduplicator, token: str) -> None:
    """Make the token look claimed by someone else (fence moved on, lease theirs)."""
    keys = dedup.token_keys(token)
    async with side_of(url) as client:
        await client.incr(keys.fence)
        await client.set(keys.lease, b"ffff|99|{}", px=60_000)


async def test_lost_lease_cancels_the_primary_when_asked(
    make: Callable[..., Any], backend_url: str
) -> None:
    async with make(lease_ttl=0.3, on_lease_lost="cancel") as dedup:
        gate = Gate()
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        await _steal(backend_url, dedup, "t")
        with pytest.raises(LeaseLost) as info:
            await asyncio.wait_for(primary, 2)
        assert info.value.fence == gate.fence


async def test_lost_lease_refuses_the_completion(
    make: Callable[..., Any], backend_url: str
) -> None:
    async with make(lease_ttl=2) as dedup:
        gate = Gate("late")
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        await _steal(backend_url, dedup, "t")
        gate.release.set()
        with pytest.raises(LeaseLost, match="refused"):
            await primary
        async with side_of(backend_url) as side:
            assert await side.get(dedup.token_keys("t").result) is None


@pytest.mark.parametrize(
    "token", ["{a}", "a*b?[c]", "has space", "line\nbreak", b"\xff\x00bytes", "x" * 10_240]
)
async def test_awkward_tokens_work_end_to_end(dedup: Deduplicator, token: str | bytes) -> None:
    assert (await dedup.execute(token, lambda: 1)).role is Role.PRIMARY
    assert (await dedup.execute(token, lambda: 2)).value == 1


async def test_bad_input_is_refused_before_touching_redis(dedup: Deduplicator) -> None:
    with pytest.raises(ValueError, match="empty"):
        await dedup.execute("", lambda: 1)
    with pytest.raises(TypeError, match="callable"):
        await dedup.execute("t", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fingerprint"):
        await dedup.execute("t", lambda: 1, fingerprint=3)  # type: ignore[arg-type]


async def test_signed_pickle_serializer_round_trips(backend_url: str, namespace: str) -> None:
    ser = SignedPickleSerializer(b"0123456789abcdef")
    async with Deduplicator.from_url(backend_url, namespace=namespace, serializer=ser) as d:
        assert (await d.execute("t", lambda: {1, 2})).value == {1, 2}
        assert (await d.execute("t", lambda: None)).value == {1, 2}
    async with Deduplicator.from_url(backend_url, namespace=namespace) as plain:
        with pytest.raises(SerializationError, match="serializer"):
            await plain.execute("t", lambda: None)


async def test_closed_deduplicator_refuses_calls(make: Callable[..., Any]) -> None:
    async with make() as dedup:
        pass
    with pytest.raises(DedupError, match="closed"):
        await dedup.execute("t", lambda: 1)


async def test_a_call_outliving_the_fence_ttl_still_completes(make: Callable[..., Any]) -> None:
    # fence TTL = result_ttl + 2 * lease_ttl = 0.5 s; the call runs for twice that.
    async with make(lease_ttl=0.2, result_ttl=0.1) as dedup:
        gate = Gate("long")
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        past = time.monotonic() + 1.0
        await until(lambda: time.monotonic() > past)
        gate.release.set()
        assert (await primary).role is Role.PRIMARY


async def test_an_expired_lease_nobody_claimed_is_taken_back(
    make: Callable[..., Any], backend_url: str
) -> None:
    async with make(lease_ttl=0.3) as dedup, side_of(backend_url) as client:
        gate = Gate("kept")
        primary = asyncio.create_task(dedup.execute("t", gate))
        await gate.started.wait()
        keys = dedup.token_keys("t")
        await client.delete(keys.lease)  # as if it had expired during a pause
        deadline = time.monotonic() + 2
        while not await client.exists(keys.lease):
            assert time.monotonic() < deadline, "the renewer did not take the lease back"
            await asyncio.sleep(0.01)
        gate.release.set()
        outcome = await primary
        assert (outcome.role, outcome.fence) == (Role.PRIMARY, gate.fence)


async def test_no_watch_outlives_its_call(dedup: Deduplicator) -> None:
    # A bystander keeps the token's channel subscribed, so calls attach before they read.
    keys = engine_of(dedup).keys.for_token("t")
    bystander = engine_of(dedup).subscriber.register(keys.channel)
    await bystander.ready(5)
    try:
        assert (await dedup.execute("t", lambda: "v")).role is Role.PRIMARY
        assert dedup.activity().waiters == 1
        assert (await dedup.execute("t", lambda: "w")).role is Role.REPLAY
        assert dedup.activity().waiters == 1
    finally:
        bystander.close()
    assert dedup.activity().waiters == 0


async def test_idle_subscriber_is_not_taken_for_dead(dedup: Deduplicator) -> None:
    engine_of(dedup).subscriber.health_interval = 0.05  # PING often; each PING must be answered
    gate = Gate("v")
    primary = asyncio.create_task(dedup.execute("t", gate))
    await gate.started.wait()
    dup = asyncio.create_task(dedup.execute("t", gate))
    await waiting(dedup, 1)
    gate.release.set()
    await asyncio.gather(primary, dup)  # the channel is unsubscribed again: plain PONG replies
    later = time.monotonic() + 0.5
    await until(lambda: time.monotonic() > later)
    assert dedup.activity().subscriber_connected and dedup.activity().subscriber_connects == 1


async def test_a_retried_claim_recognises_its_own_lease(dedup: Deduplicator) -> None:
    keys = engine_of(dedup).keys.for_token("t")
    meta = engine_of(dedup).lease_meta(keys, None)
    first = await engine_of(dedup).store.claim(keys, "abc1", meta)
    again = await engine_of(dedup).store.claim(keys, "abc1", meta)  # as if the reply had been lost
    other = await engine_of(dedup).store.claim(keys, "abc2", meta)
    assert first == again and isinstance(first, Claimed)
    assert isinstance(other, Busy)
    assert (other.lease.owner, other.lease.fence) == ("abc1", first.fence)


@pytest.mark.parametrize(
    ("on_primary_error", "outcome"),
    [("retry", RuntimeError), ("share", RuntimeError), ("share", asyncio.CancelledError)],
)
async def test_a_renewal_after_the_owners_release_is_refused(
    make: Callable[..., Any], on_primary_error: str, outcome: type[BaseException]
) -> None:
    from strands_dedup._store import HeldLeaseRef

    async with make(on_primary_error=on_primary_error) as dedup:
        refs: list[HeldLeaseRef] = []

        async def call() -> None:
            lease = engine_of(dedup).renewer.leases[0]
            refs.append(HeldLeaseRef(lease.keys, lease.value))
            raise outcome("gone")

        with pytest.raises(outcome):
            await dedup.execute("t", call)
        # a renewal sent before the release that reaches Redis after it
        assert await engine_of(dedup).store.renew(refs) == [False]
        assert not await engine_of(dedup).store.client.exists(refs[0].keys.lease)
        assert (await dedup.execute("t", lambda: "next")).role is Role.PRIMARY


async def test_a_call_on_its_own_token_fails_at_once(dedup: Deduplicator) -> None:
    async def inner() -> str:
        return await dedup.run("outer", lambda: "never", scope="s")

    async def outer() -> str:
        return await dedup.run("inner", inner, scope="s")  # outer -> inner -> outer

    started = time.monotonic()
    with pytest.raises(ReentrantCall, match="'outer'") as info:
        await dedup.run("outer", outer, scope="s")
    # waiting for itself would last the wait timeout (300 s)
    assert time.monotonic() - started < 5 and info.value.token == "outer"
    # the same token in another scope is another call
    assert await dedup.run("t", lambda: dedup.run("t", lambda: "in", scope="x")) == "in"


async def test_a_deduplicator_used_from_another_loop_says_what_to_do(
    dedup: Deduplicator,
) -> None:
    assert await dedup.run("t", lambda: 1) == 1
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            asyncio.run(dedup.run("u", lambda: 2))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    await asyncio.to_thread(thread.join, 10)
    assert len(errors) == 1 and isinstance(errors[0], DedupError), errors
    assert "belongs to the event loop" in str(errors[0]) and "SyncDeduplicator" in str(errors[0])
    assert await dedup.run("u", lambda: 3) == 3  # its own loop still works
