"""Agent surfaces: idempotent tools and message tokens (no extra needed here);
`strands_dedup.agents.strands` holds `DedupAgent` (needs the ``strands`` extra)."""

from ._tokens import message_token
from ._tools import idempotent_tool, tool_token

__all__ = ["idempotent_tool", "message_token", "tool_token"]
