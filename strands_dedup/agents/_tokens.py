"""Idempotency tokens derived from what a caller already has.

Webhooks and chat platforms redeliver a message with the same id (Telegram's ``update_id`` or
``(chat id, message_id)``, Slack's ``event_id``, a Stripe event id). A token built from those ids
makes a redelivery a duplicate of the first delivery, on whichever replica it lands::

    token = message_token("telegram", update.message.chat.id, update.message.message_id)
    result = await guarded.invoke_async(text, session_id=f"tg:{chat_id}", idempotency_token=token)
"""

from __future__ import annotations

from urllib.parse import quote

__all__ = ["message_token"]


def message_token(source: str, *ids: str | int) -> str:
    """A token for the message ``ids`` (outermost first) from ``source``.

    Different inputs always give different tokens (each part is percent-encoded, so a ``:``
    inside an id cannot shift the boundary between parts); the same inputs always give the
    same token. Raises ``ValueError`` for an empty source or id, ``TypeError`` for other types.
    """
    parts: list[str] = []
    for what, part in (("source", source), *(("id", x) for x in ids)):
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise TypeError(f"message_token: {what} must be str or int, not {type(part).__name__}")
        text = str(part)
        if not text:
            raise ValueError(f"message_token: {what} must not be empty")
        parts.append(quote(text, safe=""))
    if not ids:
        raise ValueError("message_token: give at least one message id")
    return "msg:" + ":".join(parts)
