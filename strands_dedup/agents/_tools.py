"""Tool-call idempotency: a retried or re-planned agent turn does not repeat a side effect.

::

    @tool                                   # Strands' decorator goes outside
    @idempotent_tool(dedup)
    def refund(order_id: str, amount_cents: int) -> str:
        call = current_call()               # the token: one idempotency key for every attempt
        return payments.refund(order_id, amount_cents, idempotency_key=call.token)

The call is keyed by the tool's name and its normalized arguments (JSON with sorted keys), and
scoped by the session it runs in (`current_session`, set by `SessionGuard` and `DedupAgent`)
unless ``per_session=False``. The same tool with the same arguments in the same session runs once
while its result lives (``result_ttl``); concurrent duplicates wait for it. Works on any function,
sync or async, with or without Strands.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Collection
from typing import Any, TypeVar, cast

import pydantic_core

from .._engine.deduplicator import Deduplicator, return_type_of
from .._engine.session import current_session
from .._engine.sync import Bridge, SyncDeduplicator
from .._errors import SerializationError

__all__ = ["idempotent_tool", "tool_token"]

F = TypeVar("F", bound=Callable[..., Any])

#: Parameters Strands injects into tools: they are not part of the call's identity.
INJECTED = frozenset({"agent", "tool_context"})


def tool_token(
    name: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ignore: Collection[str],
) -> str:
    """The token of one tool call: its name and a digest of its normalized arguments."""
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"tool {name}: {exc}") from None
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k not in ignore}
    try:
        plain = json.loads(pydantic_core.to_json(arguments, bytes_mode="base64"))
    except (pydantic_core.PydanticSerializationError, ValueError) as exc:
        raise SerializationError(
            f"arguments of tool {name} cannot be normalized as JSON ({exc}); list the "
            "parameters that are not part of the call's identity in ignore="
        ) from exc
    canonical = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"tool:{name}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def idempotent_tool(
    dedup: Deduplicator | SyncDeduplicator,
    *,
    name: str | None = None,
    per_session: bool = True,
    ignore: Collection[str] = INJECTED,
) -> Callable[[F], F]:
    """Make a tool (or any function) run once per distinct arguments (and session).

    ``dedup``: a `Deduplicator` or a `SyncDeduplicator`. A blocking function wrapped over an
    asyncio `Deduplicator` must be called from a thread other than the deduplicator's loop (as
    Strands runs blocking tools); it then runs in a worker thread of that loop.
    ``name``: the tool's name in tokens (default: the function's name).
    ``ignore``: parameters left out of the identity (default: what Strands injects).
    """
    if not isinstance(dedup, (Deduplicator, SyncDeduplicator)):
        raise TypeError(
            f"idempotent_tool needs a Deduplicator or SyncDeduplicator, not {type(dedup).__name__}"
        )
    skip = frozenset(ignore)

    bridge = Bridge(dedup, "idempotent_tool")

    def decorate(func: F) -> F:
        tool_name = name or func.__name__
        returns = return_type_of(func)

        def identity(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str | None]:
            hold = current_session() if per_session else None
            token = tool_token(tool_name, func, args, kwargs, skip)
            return token, (hold.session if hold is not None else None)

        if inspect.iscoroutinefunction(inspect.unwrap(func)):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                token, scope = identity(args, kwargs)

                def call() -> Any:
                    return func(*args, **kwargs)

                core = bridge.core  # over a SyncDeduplicator: on its background loop
                return await bridge.run(core.run(token, call, scope=scope, returns=returns))

            return cast(F, run_async)

        @functools.wraps(func)
        def run_blocking(*args: Any, **kwargs: Any) -> Any:
            token, scope = identity(args, kwargs)
            if isinstance(dedup, SyncDeduplicator):
                return dedup.run(token, lambda: func(*args, **kwargs), scope=scope, returns=returns)
            loop = dedup.loop
            if loop is None or not loop.is_running() or _in_loop_thread(loop):
                raise RuntimeError(
                    f"tool {tool_name} is blocking and wraps an asyncio Deduplicator: call it "
                    "from a worker thread while the deduplicator's loop runs (as Strands does), "
                    "make it async, or use a SyncDeduplicator"
                )

            async def in_thread() -> Any:
                return await asyncio.to_thread(func, *args, **kwargs)

            future = asyncio.run_coroutine_threadsafe(
                dedup.run(token, in_thread, scope=scope, returns=returns), loop
            )
            return future.result()

        return cast(F, run_blocking)

    return decorate


def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop runs in this thread
        return False
