"""An offline Strands model: streams canned Bedrock-style events, optionally asking for tools."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from strands.models.model import Model


class FakeModel(Model):
    """Replies ``reply`` after ``delay`` seconds.

    With ``tool_calls`` (a list of ``(tool name, input dict)``), a turn whose last message is
    the user's asks for those tools first; the turn after the tool results replies with text.
    ``calls`` counts model invocations, ``chunks`` text chunks sent, ``most_inside`` the most
    invocations streaming at once.
    """

    def __init__(
        self,
        reply: str = "hello from the fake model",
        *,
        delay: float = 0.0,
        chunk_delay: float = 0.0,
        tool_calls: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> None:
        self.config: dict[str, Any] = {"model_id": "fake"}
        self.reply = reply
        self.delay = delay
        self.chunk_delay = chunk_delay
        self.chunks = 0
        self.inside = 0
        self.most_inside = 0
        self.tool_calls = tool_calls or []
        self.calls = 0

    def update_config(self, **model_config: Any) -> None:
        self.config.update(model_config)

    def get_config(self) -> Any:
        return self.config

    async def structured_output(  # type: ignore[override]
        self, output_model: Any, prompt: Any, system_prompt: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def stream(  # type: ignore[override]
        self, messages: Any, tool_specs: Any = None, system_prompt: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        self.calls += 1
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            async for event in self._events(messages):
                yield event
        finally:
            self.inside -= 1

    async def _events(self, messages: Any) -> AsyncIterator[Any]:
        if self.delay:
            await asyncio.sleep(self.delay)
        answered = any("toolResult" in block for block in messages[-1].get("content", []))
        yield {"messageStart": {"role": "assistant"}}
        if self.tool_calls and not answered:
            for i, (name, tool_input) in enumerate(self.tool_calls):
                yield {
                    "contentBlockStart": {
                        "start": {"toolUse": {"toolUseId": f"t{self.calls}-{i}", "name": name}}
                    }
                }
                yield {
                    "contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps(tool_input)}}}
                }
                yield {"contentBlockStop": {}}
            yield {"messageStop": {"stopReason": "tool_use"}}
        else:
            yield {"contentBlockStart": {"start": {}}}
            for word in self.reply.split(" "):
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                self.chunks += 1
                yield {"contentBlockDelta": {"delta": {"text": word + " "}}}
            yield {"contentBlockStop": {}}
            yield {"messageStop": {"stopReason": "end_turn"}}
        yield {
            "metadata": {
                "usage": {"inputTokens": 3, "outputTokens": 4, "totalTokens": 7},
                "metrics": {"latencyMs": 1},
            }
        }


class _PidModel(FakeModel):
    async def _events(self, messages: Any) -> AsyncIterator[Any]:
        self.reply = f"answered by pid {os.getpid()} call {self.calls}"
        async for event in super()._events(messages):
            yield event


def pid_model() -> FakeModel:
    """A model whose reply names the process and call that produced it (slow enough to race)."""
    return _PidModel(delay=0.5)
