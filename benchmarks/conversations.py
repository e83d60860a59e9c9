"""Strands session repositories on Redis, side by side, and what a turn's commit costs.

Run from the repository root::

    python -m benchmarks.conversations                   # throwaway redis-server on a free port
    python -m benchmarks.conversations --redis-url redis://127.0.0.1:6379/0

In one run, on one Redis, blocking calls from one thread (how Strands calls a repository):

write
    ``create_message`` of one ~300-byte message on a session that holds 10 already, by
    strands-dedup's `RedisSessionRepository` (outside a turn, over a `SyncDeduplicator`),
    ``strands-valkey-session-manager`` and ``strands-redis-session-manager`` (each skipped when
    not installed), in interleaved blocks.
load
    What a session manager reads when an Agent is built on a session of 1,000 messages
    (``read_agent`` then ``list_messages``), by a fresh repository each time.
turn
    A `DedupAgent` turn (a fake model that answers at once, queue-mode `SessionGuard`) with no
    session manager, with `RedisSessionManager`, and with ``committed_session`` around
    ``FileSessionManager``; and the Redis commands each turn sends (INFO commandstats).

Writes ``benchmarks/results/conversations-latest.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from strands.types.session import Session, SessionAgent, SessionMessage, SessionType

from benchmarks._common import median_p99, redis_for
from strands_dedup import Deduplicator, SessionGuard, SyncDeduplicator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "conversations-latest.json"
TEXT = "lorem ipsum dolor sit amet " * 10


def summarize(values: list[float]) -> dict[str, float]:
    median, p99 = median_p99(values)
    return {"median_us": median * 1e6, "p99_us": p99 * 1e6, "n": len(values)}


def message(i: int) -> SessionMessage:
    role = "user" if i % 2 == 0 else "assistant"
    return SessionMessage.from_message({"role": role, "content": [{"text": f"{i} {TEXT}"}]}, i)


def repositories(url: str, dedup: SyncDeduplicator) -> dict[str, Callable[[str], Any]]:
    """name -> (session id -> a fresh repository on a session that may exist)."""
    from strands_dedup.agents.strands import RedisSessionRepository

    made: dict[str, Callable[[str], Any]] = {
        "strands-dedup": lambda sid: RedisSessionRepository(sid, dedup),
    }
    try:
        import valkey
        from strands_valkey_session_manager.valkey_session_manager import ValkeySessionManager

        vclient = valkey.Valkey.from_url(url)
        made["strands-valkey-session-manager"] = lambda sid: _bare(
            ValkeySessionManager, sid, client=vclient
        )
    except ImportError:
        pass
    try:
        from redis_session_manager import RedisSessionManager as Other

        rclient = redis.Redis.from_url(url)
        made["strands-redis-session-manager"] = lambda sid: _bare(Other, sid, redis_client=rclient)
    except ImportError:
        pass
    return made


def _bare(cls: Any, sid: str, **kwargs: Any) -> Any:
    """The repository part of a manager that is its own repository (no session read)."""
    repo = cls.__new__(cls)
    for name, value in kwargs.items():
        setattr(repo, {"redis_client": "redis"}.get(name, name), value)
    repo.namespace, repo.ttl_seconds, repo.rolling_ttl, repo.touch_on_read = (
        "strands",
        None,
        True,
        False,
    )
    return repo


def seed(repo: Any, sid: str, messages: int) -> None:
    repo.create_session(Session(session_id=sid, session_type=SessionType.AGENT))
    repo.create_agent(sid, SessionAgent(agent_id="a", state={}, conversation_manager_state={}))
    for i in range(messages):
        repo.create_message(sid, "a", message(i))


def bench_repositories(url: str, samples: int, history: int) -> dict[str, Any]:
    namespace = f"bench-conv-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"write": {}, "load": {}, "unavailable": {}}
    with SyncDeduplicator.from_url(url, namespace=namespace, metrics=False) as dedup:
        made = repositories(url, dedup)
        writers = {}
        for name, make in list(made.items()):
            sid = f"{namespace}-w-{name}"
            writers[name] = (make(sid), sid)
            try:
                seed(writers[name][0], sid, 10)
            except Exception as exc:  # e.g. a Redis without the module it needs
                out["unavailable"][name] = str(exc)[:200]
                del writers[name], made[name]
        times: dict[str, list[float]] = {name: [] for name in made}
        next_id = 10
        for _ in range(samples // 10):
            for name, (repo, sid) in writers.items():
                for k in range(10):
                    m = message(next_id + k)
                    started = time.perf_counter()
                    repo.create_message(sid, "a", m)
                    times[name].append(time.perf_counter() - started)
            next_id += 10
        out["write"] = {name: summarize(values) for name, values in times.items()}

        loads: dict[str, list[float]] = {name: [] for name in made}
        sids = {}
        for name, make in made.items():
            sids[name] = f"{namespace}-l-{name}"
            seed(make(sids[name]), sids[name], history)
        for _ in range(max(3, samples // 50)):
            for name, make in made.items():
                sid = sids[name]
                repo = make(sid)
                started = time.perf_counter()
                repo.read_agent(sid, "a")
                listed = repo.list_messages(sid, "a")
                loads[name].append(time.perf_counter() - started)
                assert len(listed) == history, (name, len(listed))
        out["load"] = {name: summarize(values) for name, values in loads.items()}
    return out


def _commands(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def bench_turns(url: str, turns: int) -> dict[str, Any]:
    from strands import Agent
    from strands.session.file_session_manager import FileSessionManager

    from strands_dedup.agents._conversation import Turn
    from strands_dedup.agents.strands import DedupAgent, RedisSessionManager, committed_session
    from tests.fake_model import FakeModel

    namespace = f"bench-turn-{uuid.uuid4().hex[:8]}"
    side = redis.Redis.from_url(url)
    out: dict[str, Any] = {}
    spent: dict[str, list[float]] = {"load": [], "commit": []}
    for step in spent:  # time the two steps a turn adds, as the turns run
        original = getattr(Turn, step)

        async def timed(self: Any, original: Any = original, step: str = step) -> None:
            started = time.perf_counter()
            await original(self)
            spent[step].append(time.perf_counter() - started)

        setattr(Turn, step, timed)
    with tempfile.TemporaryDirectory() as where:
        async with Deduplicator.from_url(url, namespace=namespace, metrics=False) as dedup:
            model = FakeModel("ok")
            kinds: dict[str, Callable[[str], Any]] = {
                "no session manager": lambda sid: None,
                "RedisSessionManager": lambda sid: RedisSessionManager(sid, dedup=dedup),
                "committed_session(FileSessionManager)": lambda sid: committed_session(
                    FileSessionManager(sid, storage_dir=where)
                ),
            }
            for label, manager in kinds.items():
                agent = DedupAgent(
                    dedup,
                    lambda sid, manager=manager: Agent(  # type: ignore[misc]
                        model=model, callback_handler=None, session_manager=manager(sid)
                    ),
                    session_guard=SessionGuard(dedup),
                )
                sid = f"turn-{uuid.uuid4().hex[:6]}"
                await agent.invoke_async("warm up", session_id=sid)
                before = _commands(side)
                for values in spent.values():
                    values.clear()
                times = []
                for i in range(turns):
                    started = time.perf_counter()
                    await agent.invoke_async(f"turn {i}", session_id=sid)
                    times.append(time.perf_counter() - started)
                after = _commands(side)
                sent = {k: (after.get(k, 0) - before.get(k, 0)) / turns for k in after}
                out[label] = {
                    **summarize(times),
                    **{
                        f"{step}_median_us": median_p99(v)[0] * 1e6
                        for step, v in spent.items()
                        if v
                    },
                    "commands_per_turn": {k: round(v, 2) for k, v in sent.items() if v >= 0.5},
                }
    side.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    with redis_for(args.redis_url, progress=True) as url:
        result = {
            "repositories": bench_repositories(url, args.samples, args.history),
            "turns": asyncio.run(bench_turns(url, args.turns)),
            "history": args.history,
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, why in result["repositories"]["unavailable"].items():
        print(f"{name}: not measured: {why}")
    for part in ("write", "load"):
        print(f"\n{part}:")
        for name, row in result["repositories"][part].items():
            print(f"  {name:34} median {row['median_us']:9.1f} us   p99 {row['p99_us']:9.1f} us")
    print("\nturn:")
    for name, row in result["turns"].items():
        steps = {
            k: round(v) for k, v in row.items() if k.endswith("_median_us") and k != "median_us"
        }
        print(
            f"  {name:40} median {row['median_us']:8.1f} us  p99 {row['p99_us']:8.1f} us  "
            f"{steps} {row['commands_per_turn']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
