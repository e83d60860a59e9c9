"""A turn commits once: a crashed attempt's writes are never read, a stale holder never writes
into the committed history; on FileSessionManager, S3SessionManager (a local S3 server, moto)
and RedisSessionManager. Real processes (tests/conversation_worker.py) on a real Redis,
SIGKILL for a crash, SIGSTOP for a zombie.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from children import Child
from conversation_worker import BUCKET, Model, texts
from servers import free_port, process
from side import side_of
from strands import Agent
from strands.session.file_session_manager import FileSessionManager

from strands_dedup import ConversationError, Deduplicator, SessionGuard
from strands_dedup.agents.strands import (
    DedupAgent,
    RedisSessionManager,
    RedisSessionRepository,
    committed_session,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.redis]
WORKER = str(Path(__file__).with_name("conversation_worker.py"))
LEASE = 2.0  # a live holder keeps its session while a loaded machine stalls it a second


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A local S3-compatible server (moto's server mode) with the workers' bucket."""
    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], url):
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url


@pytest.fixture(autouse=True)
def _aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")


@pytest.fixture(params=["file", "s3", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(store, where) for the workers and `manager`."""
    if request.param == "file":
        return "file", str(tmp_path)
    if request.param == "s3":
        return "s3", request.getfixturevalue("s3_endpoint")
    return "redis", "-"


def manager(store: tuple[str, str], session_id: str, dedup: Deduplicator) -> Any:
    kind, where = store
    if kind == "redis":
        return RedisSessionManager(session_id, dedup=dedup)
    if kind == "file":
        return committed_session(FileSessionManager(session_id, storage_dir=where))
    from strands.session.s3_session_manager import S3SessionManager

    return committed_session(
        S3SessionManager(session_id, bucket=BUCKET, endpoint_url=where, region_name="us-east-1")
    )


@pytest.fixture
def worker(
    children: Callable[..., Awaitable[Child]], redis_url: str, namespace: str
) -> Callable[..., Awaitable[Child]]:
    async def spawn(mode: str, session: str, store: tuple[str, str], *rest: str) -> Child:
        args = (mode, redis_url, namespace, session, *store, *rest, "--lease-ttl", str(LEASE))
        return await children(*args, worker=WORKER)

    return spawn


async def next_turn(
    redis_url: str, namespace: str, store: tuple[str, str], session: str, prompt: str
) -> list[list[str]]:
    """Run one more turn in this process; the history its model saw."""
    model = Model(None, 0.0)
    seen: list[Any] = []
    original = model._events

    def spy(messages: Any) -> Any:
        seen.append(texts(messages))
        return original(messages)

    model._events = spy  # type: ignore[method-assign]
    # nothing waits for this turn's lease to end: a long one keeps a stalled check from losing it
    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=10) as dedup:
        agent = DedupAgent(
            dedup,
            lambda sid: Agent(
                model=model, callback_handler=None, session_manager=manager(store, sid, dedup)
            ),
            session_guard=SessionGuard(dedup),
        )
        await agent.invoke_async(prompt, session_id=session, idempotency_token=uuid.uuid4().hex)
    return seen[0]


async def test_a_crashed_attempt_leaves_nothing_in_the_history(
    store: tuple[str, str], worker: Callable[..., Awaitable[Child]], redis_url: str, namespace: str
) -> None:
    session = "crash"
    a = await worker(
        "turn", session, store, "t1", "hello", "--reply", "answer from A", "--delay", "30"
    )
    await a.expect("model", 30)  # A's user message is in its agent; its model streams
    os.kill(a.pid, signal.SIGKILL)
    b = await worker("turn", session, store, "t1", "hello", "--reply", "answer from B")
    assert (await b.expect("result", 30))["text"] == "answer from B"
    assert b.of("model")[0]["seen"] == [["user", "hello"]]
    seen = await next_turn(redis_url, namespace, store, session, "turn two")
    assert seen == [["user", "hello"], ["assistant", "answer from B"], ["user", "turn two"]]


async def test_a_zombie_never_writes_into_the_committed_history(
    store: tuple[str, str], worker: Callable[..., Awaitable[Child]], redis_url: str, namespace: str
) -> None:
    session = "zombie"
    c = await worker(
        "turn", session, store, "t2", "hello", "--reply", "answer from C", "--delay", "0.5"
    )
    await c.expect("model", 30)
    os.kill(c.pid, signal.SIGSTOP)  # past its lease: D takes the token and the session over
    try:
        d = await worker("turn", session, store, "t2", "hello", "--reply", "answer from D")
        assert (await d.expect("result", 30))["text"] == "answer from D"
    finally:
        os.kill(c.pid, signal.SIGCONT)
    failed = await c.expect("error", 30)
    assert failed["type"] == "LeaseLost", failed
    seen = await next_turn(redis_url, namespace, store, session, "turn two")
    assert seen == [["user", "hello"], ["assistant", "answer from D"], ["user", "turn two"]]


async def test_queued_turns_of_several_tokens_commit_whole_and_in_order(
    store: tuple[str, str], worker: Callable[..., Awaitable[Child]], redis_url: str, namespace: str
) -> None:
    session = "queue"
    doomed = await worker("turn", session, store, "k0", "p0", "--delay", "30")
    await doomed.expect("model", 30)  # holds the session; the others queue behind it
    procs = [
        await worker("turns", session, store, *(f"k{p}{i}:p{p}{i}" for i in range(3)))
        for p in (1, 2)
    ]
    os.kill(doomed.pid, signal.SIGKILL)  # mid-turn: its prompt must not reach the history
    retry = await worker("turn", session, store, "k0", "p0")
    for proc in procs:
        await proc.expect("finished", 45)
    await retry.expect("result", 45)
    final = await next_turn(redis_url, namespace, store, session, "last")
    prompts = [text for role, text in final[:-1] if role == "user"]
    assert sorted(prompts) == sorted(["p0", *(f"p{p}{i}" for p in (1, 2) for i in range(3))])
    for i in range(0, len(final) - 1, 2):  # each turn's messages together, answering it
        assert final[i][0] == "user" and final[i + 1] == ["assistant", f"answer to {final[i][1]}"]
    for proc in [*procs, retry]:  # every turn started from the history committed before it
        for model in proc.of("model"):
            assert final[: len(model["seen"])] == model["seen"]


# -- the Redis repository, in one process ---------------------------------------------------


async def test_redis_sessions_load_in_one_round_trip_and_stay_bounded(
    redis_url: str, namespace: str
) -> None:
    async with (
        Deduplicator.from_url(redis_url, namespace=namespace) as dedup,
        side_of(redis_url) as side,
    ):
        model = Model("fine", 0.0)
        agent = DedupAgent(
            dedup,
            lambda sid: Agent(
                model=model,
                callback_handler=None,
                session_manager=RedisSessionManager(sid, dedup=dedup, max_messages=4),
            ),
            session_guard=SessionGuard(dedup),
        )
        await agent.invoke_async("one", session_id="s")
        await agent.invoke_async("two", session_id="s")
        keys = dedup.session_keys("s")
        before = await side.hgetall(keys.conversation)
        with pytest.raises(ConversationError, match=r"'s'.*5 messages.*4 messages") as caught:
            await agent.invoke_async("three", session_id="s")
        assert caught.value.session == "s"
        assert await side.hgetall(keys.conversation) == before  # nothing written
        assert 0 < await side.pttl(keys.conversation) <= 86_400_000


async def test_a_stored_history_that_does_not_parse_is_refused_and_kept(
    redis_url: str, namespace: str
) -> None:
    weird = "s/../\u00e9{x}:* \n"  # any characters make a session id
    async with (
        Deduplicator.from_url(redis_url, namespace=namespace) as dedup,
        side_of(redis_url) as side,
    ):
        agent = DedupAgent(
            dedup,
            lambda sid: Agent(
                model=Model("ok", 0.0),
                callback_handler=None,
                session_manager=RedisSessionManager(sid, dedup=dedup),
            ),
            session_guard=SessionGuard(dedup),
        )
        await agent.invoke_async("one", session_id=weird)
        keys = dedup.session_keys(weird)
        fields = await side.hkeys(keys.conversation)
        message = next(f for f in fields if f.startswith(b"m:"))
        await side.hset(keys.conversation, message, b"{not json")
        before = await side.hgetall(keys.conversation)
        with pytest.raises(ConversationError, match="does not parse") as caught:
            await agent.invoke_async("two", session_id=weird)
        assert caught.value.session == keys.name and repr(keys.name) in str(caught.value)
        assert await side.hgetall(keys.conversation) == before


async def test_an_unwrapped_session_manager_is_refused(tmp_path: Path, namespace: str) -> None:
    async with Deduplicator.from_url("memory://", namespace=namespace) as dedup:
        model = Model("ok", 0.0)

        def factory(sid: str) -> Agent:
            return Agent(
                model=model,
                callback_handler=None,
                session_manager=FileSessionManager(sid, storage_dir=str(tmp_path)),
            )

        guarded = DedupAgent(dedup, factory, session_guard=SessionGuard(dedup))
        with pytest.raises(ValueError, match="committed_session"):
            await guarded.invoke_async("q", session_id="s")
        with pytest.raises(ValueError, match="session_guard"):
            await DedupAgent(dedup, factory).invoke_async("q", session_id="s")
        assert model.calls == 0
        with pytest.raises(TypeError, match="RepositorySessionManager"):
            committed_session(object())  # type: ignore[arg-type]


def test_the_redis_repository_outside_turns(redis_url: str, namespace: str) -> None:
    from strands_dedup import SyncDeduplicator

    with SyncDeduplicator.from_url(redis_url, namespace=namespace) as dedup:
        with pytest.raises(ValueError, match="non-empty"):
            RedisSessionRepository("", dedup)
        with pytest.raises(ValueError, match="max_bytes"):
            RedisSessionRepository("s", dedup, max_bytes=0)
        agent = Agent(
            model=Model("plain", 0.0),
            callback_handler=None,
            session_manager=RedisSessionManager("plain", dedup=dedup, max_bytes=20_000),
        )
        agent("hello")
        again = Agent(
            model=Model("plain", 0.0),
            callback_handler=None,
            session_manager=RedisSessionManager("plain", dedup=dedup, max_bytes=20_000),
        )
        assert texts(again.messages) == [["user", "hello"], ["assistant", "plain"]]
        with pytest.raises(ConversationError, match=r"'plain'.*past the session's bound"):
            again("x" * 30_000)
        fresh = Agent(
            model=Model("plain", 0.0),
            callback_handler=None,
            session_manager=RedisSessionManager("plain", dedup=dedup),
        )
        assert texts(fresh.messages) == [["user", "hello"], ["assistant", "plain"]]


async def test_files_a_stale_write_is_never_read_and_a_cut_flush_is_finished(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    store = ("file", str(tmp_path))
    await next_turn(redis_url, namespace, store, "s", "one")
    agent_dir = tmp_path / "session_s" / "agents" / "agent_default"
    stale = agent_dir / "agent.json"
    data = json.loads(stale.read_text())
    data["state"] = {"stale": True}  # a stale holder's late write of the agent
    stale.write_text(json.dumps(data))
    (agent_dir / "messages" / "message_1.json").unlink()  # the committer died mid-flush
    seen = await next_turn(redis_url, namespace, store, "s", "two")
    assert seen == [["user", "one"], ["assistant", "answer to one"], ["user", "two"]]
    assert json.loads(stale.read_text())["state"] == {}  # written again from the commit record
    assert sorted(p.name for p in (agent_dir / "messages").iterdir()) == [
        f"message_{i}.json" for i in range(4)
    ]


async def test_a_factory_that_starts_building_a_session_manager(
    redis_url: str, namespace: str
) -> None:
    async with Deduplicator.from_url(redis_url, namespace=namespace) as dedup:
        built: list[Any] = []
        calls = [0]

        def factory(sid: str) -> Agent:
            calls[0] += 1
            manager = RedisSessionManager(sid, dedup=dedup) if built else None
            built.append(manager)
            return Agent(model=Model(None, 0.0), callback_handler=None, session_manager=manager)

        agent = DedupAgent(dedup, factory, session_guard=SessionGuard(dedup))
        await agent.invoke_async("one", session_id="s")  # loads nothing the next time
        await agent.invoke_async("two", session_id="s")  # builds one: loaded, built again
        assert calls[0] == 3 and len(built) == 2
        seen = await next_turn(redis_url, namespace, ("redis", "-"), "s", "three")
        assert seen == [["user", "two"], ["assistant", "answer to two"], ["user", "three"]]


async def test_redis_session_turns_on_every_backend(
    backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory://, Redis and a Redis Cluster (the session's keys in one slot): each turn starts
    from the last committed one, and an uncontended turn's history comes with its admission (no
    read of its own)."""
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as dedup:
        model = Model("fine", 0.0)
        seen: list[Any] = []
        original = model._events

        def spy(messages: Any) -> Any:
            seen.append(texts(messages))
            return original(messages)

        model._events = spy  # type: ignore[method-assign]
        loads: list[Any] = []
        load = dedup.load_conversation

        async def counted(keys: Any) -> Any:
            loads.append(keys)
            return await load(keys)

        monkeypatch.setattr(dedup, "load_conversation", counted)
        agent = DedupAgent(
            dedup,
            lambda sid: Agent(
                model=model,
                callback_handler=None,
                session_manager=RedisSessionManager(sid, dedup=dedup),
            ),
            session_guard=SessionGuard(dedup),
        )
        await agent.invoke_async("one", session_id="chat/1", idempotency_token="t1")
        await agent.invoke_async("two", session_id="chat/1", idempotency_token="t2")
        again = await agent.invoke_async("two", session_id="chat/1", idempotency_token="t2")
    assert seen == [
        [["user", "one"]],
        [["user", "one"], ["assistant", "fine"], ["user", "two"]],
    ]  # the replayed token ran no third turn
    assert str(again).strip() == "fine"
    assert loads == []
