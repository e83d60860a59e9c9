"""Conversations under `DedupAgent`: a turn commits once.

A Strands session manager writes as the agent goes: the user's message when the turn starts, each
assistant and tool message, the agent's state. An attempt that crashes mid-turn leaves those
writes behind, and a stale holder (paused past its lease) keeps writing after another replica
took the session over. Here a turn's writes are staged in memory and reach the conversation only
when the turn commits, once, under the session's hold:

- **The commit point is in Redis, beside the session's fence**: one script (conversation.lua)
  checks that the holder still holds the session with its fence, and that no other turn committed
  since this one loaded, then records the turn. A refused commit raises `LeaseLost`: nothing of
  the turn was written.
- **`RedisSessionManager`** keeps the whole conversation in that hash: the commit writes the
  turn's messages and agent state in the same script that checks the fence.
- **Any `RepositorySessionManager`** (``FileSessionManager``, ``S3SessionManager``, ...) wrapped
  with `committed_session` in the agent factory: the commit stores a record (each agent's state
  and message count, and the turn's messages) in Redis, then writes the turn to the files or
  objects. Reads see the committed record: messages past the committed count are not read, the
  agent's state comes from the record, and what the files miss (a writer that died mid-way) is
  read from the record and written again by the next turn. Writes after the hold's lease may have
  lapsed are refused before they are made (the lease left is known from the commit).

::

    guarded = DedupAgent(
        dedup,
        agent_factory=lambda sid: Agent(
            model=...,
            session_manager=committed_session(FileSessionManager(sid, storage_dir="/data")),
        ),
        session_guard=SessionGuard(dedup, mode="queue"),
    )
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from strands.session.repository_session_manager import RepositorySessionManager
from strands.session.session_repository import SessionRepository
from strands.types.exceptions import SessionException
from strands.types.session import (
    Session,
    SessionAgent,
    SessionMessage,
    decode_bytes_values,
)

from .._engine.session import admitted_conversation, holder_ticket
from .._engine.sync import Bridge
from .._errors import ConversationError, LeaseLost
from .._keys import SessionKeys
from .._store.commands import CommitLost, TooFull, TurnMoved

if TYPE_CHECKING:
    from .._engine.deduplicator import Deduplicator
    from .._engine.session import SessionHold
    from .._engine.sync import SyncDeduplicator

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGES",
    "RedisSessionManager",
    "RedisSessionRepository",
    "committed_session",
]

log = logging.getLogger("strands_dedup.conversation")

DEFAULT_MAX_MESSAGES = 10_000
"""Most messages one session keeps (every agent of it together)."""
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""Most bytes of JSON one session keeps in Redis (a record of another store: its turn)."""
_FLUSH_SHARE = 0.8
"""The share of the lease left at the commit that a flush to another store may use."""

_TURN: contextvars.ContextVar[Turn | None] = contextvars.ContextVar(
    "strands_dedup_turn", default=None
)
_CONTROL = frozenset({b"turn", b"fence", b"by", b"n", b"bytes", b"rec"})
_Dict = dict[str, Any]


def _agent_field(agent_id: str) -> str:
    return "a:" + json.dumps(agent_id)


def _message_field(agent_id: str, message_id: int) -> str:
    return f"m:{json.dumps(agent_id)}:{message_id}"


def _multi_field(multi_id: str) -> str:
    return "x:" + json.dumps(multi_id)


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _same_message(a: _Dict, b: _Dict) -> bool:
    return bool(
        a.get("message") == b.get("message") and a.get("redact_message") == b.get("redact_message")
    )


def _same_agent(a: _Dict | None, b: _Dict | None) -> bool:
    if a is None or b is None:
        return a is b
    parts = ("state", "conversation_manager_state", "_internal_state")
    return all(a.get(part) == b.get(part) for part in parts)


class _Snapshot:
    """A conversation hash as read (`Turn.load`, or a `RedisSessionRepository` outside turns)."""

    def __init__(self) -> None:
        self.turn = 0
        self.n = 0
        self.bytes = 0
        self.record: _Dict | None = None
        self.session: _Dict | None = None
        self.agents: dict[str, _Dict] = {}
        self.messages: dict[str, dict[int, _Dict]] = {}
        self.multi: dict[str, _Dict] = {}

    @property
    def holds_items(self) -> bool:
        return bool(self.session or self.agents or self.messages or self.multi)

    @classmethod
    def parse(cls, raw: dict[bytes, bytes], name: str) -> _Snapshot:
        """Parse HGETALL's reply; `ConversationError` naming the session and the field for
        anything that is not what this module writes."""
        snap = cls()
        decoder = json.JSONDecoder()
        for key, value in raw.items():
            field = key.decode("utf-8", "backslashreplace")
            try:
                if key in _CONTROL:
                    if key == b"rec":
                        snap.record = _record(json.loads(value))
                    elif key in (b"turn", b"n", b"bytes"):
                        setattr(snap, field, int(value))
                    continue
                kind, rest = field[:2], field[2:]
                if kind == "m:":
                    agent_id, end = decoder.raw_decode(rest)
                    if not isinstance(agent_id, str) or rest[end] != ":":
                        raise ValueError("not m:<agent>:<id>")
                    message = _object(json.loads(value))
                    snap.messages.setdefault(agent_id, {})[int(rest[end + 1 :])] = message
                elif kind == "a:":
                    snap.agents[str(json.loads(rest))] = _object(json.loads(value))
                elif kind == "x:":
                    snap.multi[str(json.loads(rest))] = _object(json.loads(value))
                elif field == "s":
                    snap.session = _object(json.loads(value))
                # other fields: written by a later version; left as they are
            except (ValueError, TypeError, IndexError, KeyError) as exc:
                raise ConversationError(
                    f"the stored conversation of session {name!r} does not parse (field "
                    f"{field[:80]!r}: {exc}); nothing was read or written",
                    session=name,
                ) from exc
        return snap


def _message(data: _Dict) -> SessionMessage:
    """``SessionMessage.from_dict`` without its per-key signature look-ups (what dominates the
    load of a long history)."""
    redact = data.get("redact_message")
    message = SessionMessage(
        message=decode_bytes_values(data["message"]),
        message_id=data["message_id"],
        redact_message=None if redact is None else decode_bytes_values(redact),
    )
    for stamp in ("created_at", "updated_at"):
        if stamp in data:
            setattr(message, stamp, data[stamp])
    return message


def _object(value: Any) -> _Dict:
    if not isinstance(value, dict):
        raise ValueError(f"a JSON object was expected, not {type(value).__name__}")
    return value


def _record(value: Any) -> _Dict:
    rec = _object(value)
    agents, redo = _object(rec.get("agents", {})), _object(rec.get("redo", {}))
    for entry in agents.values():
        _object(entry.get("agent"))
        int(entry["count"])
    for messages in redo.values():
        for message in _object(messages).values():
            _object(message)
    return rec


class Turn:
    """One hold's view of a session's conversation: what the last committed turn left (loaded
    once, when the turn starts) and what this turn staged. Made by `DedupAgent` inside the
    session's hold; a session manager built by the agent factory binds to it."""

    def __init__(
        self,
        dedup: Deduplicator,
        keys: SessionKeys,
        hold: SessionHold,
        session_id: str,
        idle_ttl: float,
    ) -> None:
        self.dedup, self.keys, self.hold, self.session_id = dedup, keys, hold, session_id
        self.name = keys.name
        self.idle_ttl_ms = int(idle_ttl * 1000)
        self.snapshot = _Snapshot()
        self.repository: _StagingRepository | None = None
        self.manager: RepositorySessionManager | None = None
        self.loaded = False

    async def load(self) -> None:
        """The conversation hash: as the admission read it (no round trip), else one HGETALL
        (after a wait in the session's queue, where the grant came as a message)."""
        raw = admitted_conversation(self.hold)
        if raw is None:
            raw = await self.dedup.load_conversation(self.keys)
        self.snapshot = _Snapshot.parse(raw, self.name)
        self.loaded = True

    def bind(self, repository: _StagingRepository, session_id: str) -> None:
        if not self.loaded:
            raise NotLoaded
        if session_id != self.session_id:
            raise ValueError(
                f"the agent factory was called for session {self.session_id!r} but built a "
                f"session manager for session {session_id!r}"
            )
        if self.repository is not None:
            raise ValueError(
                f"the agent factory built two committed session managers for session "
                f"{self.name!r}: one turn commits one"
            )
        self.repository = repository

    async def commit(self) -> None:
        """Commit the staged writes (one round trip), then write them to the other store, if
        any. `LeaseLost` when the hold was lost or another turn committed first: nothing of
        this turn is written; `ConversationError` past the bounds."""
        repo = self.repository
        if repo is None or not repo.staged:
            return
        fence = self.hold.fence
        if self.hold.lost.is_set():
            raise self._lost("its lease was lost before the turn committed")
        items, max_messages, max_bytes = repo.commit_items()
        started = time.monotonic()
        reply = await self.dedup.write_conversation(
            self.keys,
            items,
            ticket=holder_ticket(self.hold),
            fence=fence,
            turn=self.snapshot.turn,
            idle_ttl_ms=repo.idle_ttl_ms or self.idle_ttl_ms,
            max_messages=max_messages,
            max_bytes=max_bytes,
        )
        if isinstance(reply, CommitLost):
            raise self._lost("it no longer held the session when the turn was to commit")
        if isinstance(reply, TurnMoved):
            raise self._lost(
                f"another holder committed turn {reply.turn} since this one loaded turn "
                f"{self.snapshot.turn} (more than one holder at once: max_concurrent > 1?)"
            )
        if isinstance(reply, TooFull):
            raise _full(self.name, reply.messages, reply.bytes, max_messages, max_bytes)
        lease = reply.lease_ms / 1000
        if isinstance(repo, _CommittedRepository):
            deadline = started + lease * _FLUSH_SHARE
            await asyncio.to_thread(repo.flush, deadline, self.hold)

    def _lost(self, why: str) -> LeaseLost:
        return LeaseLost(
            f"the turn on session {self.name!r} (fence {self.hold.fence}) did not commit: {why}; "
            "nothing of it was written",
            token=None,
            fence=self.hold.fence,
        )


def current_turn() -> Turn | None:
    """The turn a `DedupAgent` is building an agent for (inside its agent factory), or None."""
    return _TURN.get()


@contextlib.contextmanager
def building_for(turn: Turn | None) -> Iterator[None]:
    """Within the block, session managers built by the agent factory bind to ``turn``."""
    reset = _TURN.set(turn)
    try:
        yield
    finally:
        _TURN.reset(reset)


def _full(name: str, n: int, size: int, max_messages: int, max_bytes: int) -> ConversationError:
    return ConversationError(
        f"session {name!r} would hold {n} messages and {size} bytes, past its bounds "
        f"({max_messages} messages, {max_bytes} bytes): nothing was written",
        session=name,
    )


class NotLoaded(Exception):
    """A session manager was built in a turn that did not load its conversation (the agent
    factory built none last time): `DedupAgent` loads it and calls the factory again."""


class _StagingRepository(SessionRepository):
    """The reads and writes of a Strands repository, over a committed base: writes made in a
    turn are staged (and read back) until `Turn.commit`."""

    def __init__(self, session_id: str, name: str, max_messages: int, max_bytes: int) -> None:
        self.session_id = session_id
        self.name = name
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.idle_ttl_ms = 0
        self.agents: dict[str, _Dict] = {}
        self.messages: dict[str, dict[int, _Dict]] = {}
        self.multi: dict[str, _Dict] = {}
        self.session: _Dict | None = None

    # -- what subclasses give -------------------------------------------------------------------

    def base_agent(self, agent_id: str) -> _Dict | None:
        raise NotImplementedError

    def base_messages(self, agent_id: str, offset: int) -> dict[int, _Dict]:
        raise NotImplementedError

    def base_message(self, agent_id: str, message_id: int) -> _Dict | None:
        raise NotImplementedError

    def commit_items(self) -> tuple[list[tuple[str, bytes]], int, int]:
        raise NotImplementedError

    def stage_done(self) -> None:
        """A write was staged (outside a turn: write it now)."""

    # -- checks ---------------------------------------------------------------------------------

    @property
    def staged(self) -> bool:
        return bool(self.agents or self.messages or self.multi or self.session)

    def _check(self, session_id: str) -> None:
        if session_id != self.session_id:
            raise ValueError(
                f"this repository holds session {self.session_id!r}, not {session_id!r}"
            )

    def _check_size(self, what: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            raise ConversationError(
                f"{what} of session {self.name!r} is {len(data)} bytes, past the session's "
                f"bound of {self.max_bytes} bytes: nothing was written",
                session=self.name,
            )

    # -- SessionRepository ----------------------------------------------------------------------

    def create_agent(self, session_id: str, session_agent: SessionAgent, **kwargs: Any) -> None:
        self._check(session_id)
        data = session_agent.to_dict()
        self._check_size(f"agent {session_agent.agent_id!r}", _dump(data))
        self.agents[session_agent.agent_id] = data
        self.stage_done()

    def update_agent(self, session_id: str, session_agent: SessionAgent, **kwargs: Any) -> None:
        self._check(session_id)
        previous = self.read_agent(session_id, session_agent.agent_id)
        if previous is None:
            raise SessionException(
                f"Agent {session_agent.agent_id} in session {session_id} does not exist"
            )
        session_agent.created_at = previous.created_at
        self.create_agent(session_id, session_agent)

    def read_agent(self, session_id: str, agent_id: str, **kwargs: Any) -> SessionAgent | None:
        self._check(session_id)
        data = self.agents.get(agent_id) or self.base_agent(agent_id)
        return None if data is None else SessionAgent.from_dict(data)

    def create_message(
        self, session_id: str, agent_id: str, session_message: SessionMessage, **kwargs: Any
    ) -> None:
        self._check(session_id)
        message_id = session_message.message_id
        if isinstance(message_id, bool) or not isinstance(message_id, int) or message_id < 0:
            raise ValueError(f"message_id must be a non-negative int, not {message_id!r}")
        data = session_message.to_dict()
        self._check_size(f"message {message_id} of agent {agent_id!r}", _dump(data))
        self.messages.setdefault(agent_id, {})[message_id] = data
        self.stage_done()

    def read_message(
        self, session_id: str, agent_id: str, message_id: int, **kwargs: Any
    ) -> SessionMessage | None:
        self._check(session_id)
        data = self.messages.get(agent_id, {}).get(message_id) or self.base_message(
            agent_id, message_id
        )
        return None if data is None else _message(data)

    def update_message(
        self, session_id: str, agent_id: str, session_message: SessionMessage, **kwargs: Any
    ) -> None:
        previous = self.read_message(session_id, agent_id, session_message.message_id)
        if previous is None:
            raise SessionException(f"Message {session_message.message_id} does not exist")
        session_message.created_at = previous.created_at
        self.create_message(session_id, agent_id, session_message)

    def list_messages(
        self,
        session_id: str,
        agent_id: str,
        limit: int | None = None,
        offset: int = 0,
        **kwargs: Any,
    ) -> list[SessionMessage]:
        self._check(session_id)
        merged = self.base_messages(agent_id, offset)
        merged.update((i, m) for i, m in self.messages.get(agent_id, {}).items() if i >= offset)
        ids = sorted(merged)
        if limit is not None:
            ids = ids[:limit]
        return [_message(merged[i]) for i in ids]


class _CommittedRepository(_StagingRepository):
    """Another Strands repository (files, S3, ...) read through the commit record in Redis: a
    turn's writes reach it after the turn committed (`flush`)."""

    def __init__(self, inner: SessionRepository, session_id: str, turn: Turn) -> None:
        super().__init__(session_id, turn.name, DEFAULT_MAX_MESSAGES, DEFAULT_MAX_BYTES)
        self.inner = inner
        self.turn = turn
        record = turn.snapshot.record or {}
        self.record_agents: dict[str, _Dict] = record.get("agents", {})
        self.redo: dict[str, dict[int, _Dict]] = {
            agent_id: {int(i): m for i, m in messages.items()}
            for agent_id, messages in record.get("redo", {}).items()
        }
        self.seen_agents: dict[str, _Dict | None] = {}
        self.seen_messages: dict[str, dict[int, _Dict]] = {}

    def read_session(self, session_id: str, **kwargs: Any) -> Session | None:
        return self.inner.read_session(session_id, **kwargs)

    def create_session(self, session: Session, **kwargs: Any) -> Session:
        return self.inner.create_session(session, **kwargs)

    def create_multi_agent(self, session_id: str, multi_agent: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "committed_session() commits an Agent's turns; multi-agent state is not kept"
        )

    read_multi_agent = create_multi_agent  # type: ignore[assignment]
    update_multi_agent = create_multi_agent

    def _count(self, agent_id: str) -> int | None:
        entry = self.record_agents.get(agent_id)
        return None if entry is None else int(entry["count"])

    def base_agent(self, agent_id: str) -> _Dict | None:
        if agent_id not in self.seen_agents:
            found = self.inner.read_agent(self.session_id, agent_id)
            self.seen_agents[agent_id] = None if found is None else found.to_dict()
        entry = self.record_agents.get(agent_id)
        if entry is not None:  # the committed state, whatever a stale writer left in the store
            return cast(_Dict, entry["agent"])
        return self.seen_agents[agent_id]

    def base_messages(self, agent_id: str, offset: int) -> dict[int, _Dict]:
        count = self._count(agent_id)
        try:
            stored = self.inner.list_messages(self.session_id, agent_id, offset=offset)
        except SessionException:
            if count is None and agent_id not in self.agents:
                raise
            stored = []  # committed, but not in the store yet: the record has it
        seen = self.seen_messages.setdefault(agent_id, {})
        found: dict[int, _Dict] = {}
        for message in stored:
            data = message.to_dict()
            seen[message.message_id] = data
            if count is None or message.message_id < count:
                found[message.message_id] = data
        found.update((i, m) for i, m in self.redo.get(agent_id, {}).items() if i >= offset)
        return found

    def base_message(self, agent_id: str, message_id: int) -> _Dict | None:
        redone = self.redo.get(agent_id, {}).get(message_id)
        if redone is not None:
            return redone
        count = self._count(agent_id)
        if count is not None and message_id >= count:
            return None
        found = self.inner.read_message(self.session_id, agent_id, message_id)
        return None if found is None else found.to_dict()

    def _pending(self) -> dict[str, dict[int, _Dict]]:
        """What the store must still be given: the record's messages not seen in it, and this
        turn's."""
        pending: dict[str, dict[int, _Dict]] = {}
        for agent_id, messages in self.redo.items():
            seen = self.seen_messages.get(agent_id, {})
            for i, message in messages.items():
                if i not in seen or not _same_message(seen[i], message):
                    pending.setdefault(agent_id, {})[i] = message
        for agent_id, messages in self.messages.items():
            pending.setdefault(agent_id, {}).update(messages)
        return pending

    def commit_items(self) -> tuple[list[tuple[str, bytes]], int, int]:
        agents = dict(self.record_agents)
        pending = self._pending()
        for agent_id in set(self.agents) | set(pending):
            latest = self.agents.get(agent_id) or self.base_agent(agent_id)
            if latest is None:
                raise SessionException(
                    f"messages of agent {agent_id!r} in session {self.session_id!r} were "
                    "written before the agent"
                )
            ids = [*pending.get(agent_id, {}), *self.seen_messages.get(agent_id, {})]
            count = max([self._count(agent_id) or 0, *(i + 1 for i in ids)])
            agents[agent_id] = {"agent": latest, "count": count}
        self.pending = pending
        self.record = {
            "agents": agents,
            "redo": {a: {str(i): m for i, m in ms.items()} for a, ms in pending.items()},
        }
        data = _dump(self.record)
        self._check_size("the commit record of a turn", data)
        return [("rec", data)], self.max_messages, self.max_bytes

    def flush(self, deadline: float, hold: SessionHold) -> None:
        """Write the committed turn to the store (runs in a worker thread). Every write is
        refused once ``deadline`` (a share of the lease left at the commit) has passed or the
        hold was lost: the next turn writes the rest from the record."""
        inner, sid = self.inner, self.session_id

        def check() -> None:
            if time.monotonic() >= deadline or hold.lost.is_set():
                raise _Cut

        try:
            for agent_id, entry in self.record["agents"].items():
                agent, messages = entry["agent"], self.pending.get(agent_id, {})
                if agent_id not in self.seen_agents:
                    if not messages and agent_id not in self.agents:
                        continue  # not read in this turn, not written: left as it is
                    found = inner.read_agent(sid, agent_id)
                    self.seen_agents[agent_id] = None if found is None else found.to_dict()
                stored = self.seen_agents[agent_id]
                if stored is None:
                    check()
                    inner.create_agent(sid, SessionAgent.from_dict(agent))
                seen = self.seen_messages.get(agent_id, {})
                for i, message in sorted(messages.items()):
                    check()
                    if i in seen:
                        inner.update_message(sid, agent_id, _message(message))
                    else:
                        inner.create_message(sid, agent_id, _message(message))
                if stored is not None and not _same_agent(stored, agent):
                    check()
                    inner.update_agent(sid, SessionAgent.from_dict(agent))
        except _Cut:
            log.warning(
                "session %r: the committed turn was not all written to %s before the hold's "
                "lease could lapse; the next turn writes the rest from the commit record",
                self.name,
                type(inner).__name__,
            )
        except Exception as exc:  # the turn is committed: the next one writes it again
            log.warning(
                "session %r: writing the committed turn to %s failed (%s); the next turn "
                "writes it from the commit record",
                self.name,
                type(inner).__name__,
                exc,
            )


class _Cut(Exception):
    """A flush stopped before a write it may no longer make."""


def committed_session(manager: RepositorySessionManager) -> RepositorySessionManager:
    """Make a Strands ``RepositorySessionManager`` commit each `DedupAgent` turn once.

    Call it in the agent factory, around the manager::

        Agent(model=..., session_manager=committed_session(FileSessionManager(sid, ...)))

    Inside a `DedupAgent` call (with a ``session_guard``), the manager's repository is read
    through the turn's commit record and its writes are staged until the turn commits (see the
    module docstring). Outside one it returns ``manager`` unchanged. `DedupAgent` refuses an
    agent whose session manager is not committed this way (or a `RedisSessionManager`).
    """
    if not isinstance(manager, RepositorySessionManager):
        raise TypeError(
            "committed_session() takes a Strands RepositorySessionManager (FileSessionManager, "
            f"S3SessionManager, ...), not {type(manager).__name__}"
        )
    turn = _TURN.get()
    if turn is None:
        return manager
    if isinstance(manager.session_repository, _StagingRepository):
        return manager  # a RedisSessionManager, or wrapped already
    repository = _CommittedRepository(manager.session_repository, manager.session_id, turn)
    turn.bind(repository, manager.session_id)
    turn.manager = manager
    manager.session_repository = repository
    return manager


class RedisSessionRepository(_StagingRepository):
    """A Strands ``SessionRepository`` in the deduplicator's Redis: one hash per session (one
    hash slot on a cluster, beside the session guard's keys), read in one round trip.

    Inside a `DedupAgent` turn, writes are staged and committed with the turn, fenced, in one
    script. Outside one, each write is one script round trip, blocking (over an asyncio
    `Deduplicator` from another thread than its loop's, or over a `SyncDeduplicator`).
    """

    def __init__(
        self,
        session_id: str,
        dedup: Deduplicator | SyncDeduplicator,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        idle_ttl: float = 86400.0,
    ) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty str, not {session_id!r}")
        for label, value in (("max_messages", max_messages), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, not {value!r}")
        if not idle_ttl > 0:
            raise ValueError(f"idle_ttl must be positive, not {idle_ttl!r}")
        self._bridge = Bridge(dedup, "RedisSessionRepository")
        self.dedup = self._bridge.core
        self.keys = self.dedup.session_keys(session_id)
        super().__init__(session_id, self.keys.name, max_messages, max_bytes)
        self.idle_ttl_ms = int(idle_ttl * 1000)
        self.turn = _TURN.get()
        if self.turn is not None:
            if self.turn.dedup is not self.dedup:
                raise ValueError(
                    "RedisSessionManager must be built over the DedupAgent's deduplicator"
                )
            self.turn.bind(self, session_id)
            self._snapshot: _Snapshot | None = self.turn.snapshot
        else:
            self._snapshot = None

    # -- the committed base ---------------------------------------------------------------------

    def _block(self, coro: Any) -> Any:
        return self._bridge.block(
            coro,
            "a RedisSessionManager over an asyncio Deduplicator reads and writes from the "
            "deduplicator's loop only inside DedupAgent turns: build it over a "
            "SyncDeduplicator, or use it from another thread",
        )

    @property
    def snapshot(self) -> _Snapshot:
        if self._snapshot is None:
            raw = self._block(self.dedup.load_conversation(self.keys))
            self._snapshot = _Snapshot.parse(raw, self.name)
        return self._snapshot

    def base_agent(self, agent_id: str) -> _Dict | None:
        return self.snapshot.agents.get(agent_id)

    def base_messages(self, agent_id: str, offset: int) -> dict[int, _Dict]:
        stored = self.snapshot.messages.get(agent_id, {})
        return {i: m for i, m in stored.items() if i >= offset}

    def base_message(self, agent_id: str, message_id: int) -> _Dict | None:
        return self.snapshot.messages.get(agent_id, {}).get(message_id)

    def commit_items(self) -> tuple[list[tuple[str, bytes]], int, int]:
        items: list[tuple[str, bytes]] = []
        if self.session is not None:
            items.append(("s", _dump(self.session)))
        items += ((_agent_field(a), _dump(d)) for a, d in self.agents.items())
        for agent_id, messages in self.messages.items():
            items += ((_message_field(agent_id, i), _dump(m)) for i, m in messages.items())
        items += ((_multi_field(x), _dump(d)) for x, d in self.multi.items())
        self._check_totals(items)
        return items, self.max_messages, self.max_bytes

    def _check_totals(self, items: Iterable[tuple[str, bytes]]) -> None:
        snap = self.snapshot
        new = sum(1 for field, _ in items if field.startswith("m:") and not self._stored(field))
        size = sum(len(value) for _, value in items)
        if snap.n + new > self.max_messages or snap.bytes + size > self.max_bytes:
            raise _full(
                self.name, snap.n + new, snap.bytes + size, self.max_messages, self.max_bytes
            )

    def _stored(self, field: str) -> bool:
        rest = field[2:]
        agent_id, end = json.JSONDecoder().raw_decode(rest)
        return int(rest[end + 1 :]) in self.snapshot.messages.get(agent_id, {})

    def stage_done(self) -> None:
        if self.turn is not None:
            self.repository_check()
            return
        items, max_messages, max_bytes = self.commit_items()
        reply = self._block(
            self.dedup.write_conversation(
                self.keys,
                items,
                ticket="",
                fence=0,
                turn=0,
                idle_ttl_ms=self.idle_ttl_ms,
                max_messages=max_messages,
                max_bytes=max_bytes,
            )
        )
        if isinstance(reply, TooFull):
            self._clear()
            raise _full(self.name, reply.messages, reply.bytes, max_messages, max_bytes)
        snap = self.snapshot
        for field, value in items:
            if field.startswith("m:") and not self._stored(field):
                snap.n += 1
            snap.bytes += len(value)
        if self.session is not None:
            snap.session = self.session
        snap.agents.update(self.agents)
        for agent_id, messages in self.messages.items():
            snap.messages.setdefault(agent_id, {}).update(messages)
        snap.multi.update(self.multi)
        self._clear()

    def repository_check(self) -> None:
        """A staged write keeps the turn within the session's bounds."""
        items, _, _ = self.commit_items()
        del items

    def _clear(self) -> None:
        self.agents, self.messages, self.multi, self.session = {}, {}, {}, None

    # -- sessions and multi-agent state ---------------------------------------------------------

    def create_session(self, session: Session, **kwargs: Any) -> Session:
        self._check(session.session_id)
        if self.snapshot.session is not None or self.session is not None:
            raise SessionException(f"Session {session.session_id} already exists")
        self.session = session.to_dict()
        self.stage_done()
        return session

    def read_session(self, session_id: str, **kwargs: Any) -> Session | None:
        self._check(session_id)
        data = self.session or self.snapshot.session
        return None if data is None else Session.from_dict(data)

    def create_multi_agent(self, session_id: str, multi_agent: Any, **kwargs: Any) -> None:
        self._check(session_id)
        data = multi_agent.serialize_state()
        self._check_size(f"multi-agent state {multi_agent.id!r}", _dump(data))
        self.multi[multi_agent.id] = data
        self.stage_done()

    def read_multi_agent(
        self, session_id: str, multi_agent_id: str, **kwargs: Any
    ) -> dict[str, Any] | None:
        self._check(session_id)
        return self.multi.get(multi_agent_id) or self.snapshot.multi.get(multi_agent_id)

    def update_multi_agent(self, session_id: str, multi_agent: Any, **kwargs: Any) -> None:
        if self.read_multi_agent(session_id, multi_agent.id) is None:
            raise SessionException(
                f"MultiAgent state {multi_agent.id} in session {session_id} does not exist"
            )
        self.create_multi_agent(session_id, multi_agent)


class RedisSessionManager(RepositorySessionManager):
    """A Strands session manager on the deduplicator's Redis (`RedisSessionRepository`).

    Pass it in the agent factory: ``Agent(..., session_manager=RedisSessionManager(sid,
    dedup=dedup))``. Under `DedupAgent` each turn commits once, fenced, in one round trip; the
    history loads in one. A session keeps at most ``max_messages`` messages and ``max_bytes``
    bytes (`ConversationError` past them, nothing written) and expires ``idle_ttl`` seconds after
    its last write.
    """

    def __init__(
        self,
        session_id: str,
        *,
        dedup: Deduplicator | SyncDeduplicator,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        idle_ttl: float = 86400.0,
        **kwargs: Any,
    ) -> None:
        repository = RedisSessionRepository(
            session_id, dedup, max_messages=max_messages, max_bytes=max_bytes, idle_ttl=idle_ttl
        )
        super().__init__(session_id=session_id, session_repository=repository, **kwargs)
        if repository.turn is not None:
            repository.turn.manager = self
