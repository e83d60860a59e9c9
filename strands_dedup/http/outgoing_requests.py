"""The ``requests`` form of the outgoing transports (`strands_dedup.http._outgoing`).

Needs ``requests``, which strands-dedup itself does not install::

    session = requests.Session()
    session.mount("https://", IdempotentAdapter())
    session.mount("http://", IdempotentAdapter())

Same rules, options and keys as `IdempotentTransport`: inside a primary call, an unsafe request
without an ``Idempotency-Key`` gets one derived from the call and the request, and the fence
goes along; a body given as a file or an iterator is read into memory up to
``max_body_bytes`` (then sent from memory), a larger one is refused with `UnkeyedRequest`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

try:
    from requests import PreparedRequest, Response
    from requests.adapters import BaseAdapter, HTTPAdapter
except ImportError as exc:  # pragma: no cover - exercised only without requests
    raise ImportError(
        "strands_dedup.http.outgoing_requests needs requests: pip install requests"
    ) from exc

from ._outgoing import OutgoingConfig, OutgoingRules

__all__ = ["IdempotentAdapter"]


def _as_bytes(chunk: bytes | str) -> bytes:
    return chunk.encode("utf-8") if isinstance(chunk, str) else chunk  # as urllib3 sends it


def _chunks(body: Any) -> Iterator[bytes | str]:
    if hasattr(body, "read"):
        return iter(functools.partial(body.read, 64 * 1024), body.read(0))
    if isinstance(body, Iterable):
        return iter(body)
    raise TypeError(f"a request body of type {type(body).__name__} cannot be read")


class IdempotentAdapter(BaseAdapter):
    """A ``requests`` adapter that stamps a primary call's unsafe requests.

    ``adapter``: the one that sends (default: a new ``HTTPAdapter()``); options are those of
    `OutgoingConfig` (or ``config=``).
    """

    def __init__(
        self,
        adapter: BaseAdapter | None = None,
        *,
        config: OutgoingConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if config is not None and options:
            raise TypeError("give config= or keyword options, not both")
        self.rules = OutgoingRules(config if config is not None else OutgoingConfig(**options))
        self.adapter = adapter if adapter is not None else HTTPAdapter()

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        """Stamp ``request`` (see the class), then send it with the wrapped adapter."""
        method, url, headers = request.method or "GET", request.url or "", request.headers
        call = self.rules.call_for(method, url, headers)
        if call is not None:
            body = self._body(request, method, url) if self.rules.needs_body(headers) else None
            self.rules.stamp(method, url, headers, call, body)
        return self.adapter.send(request, *args, **kwargs)

    def _body(self, request: PreparedRequest, method: str, url: str) -> bytes:
        body: Any = request.body
        if body is None:
            return b""
        if isinstance(body, (bytes, str)):
            return _as_bytes(body)
        limit, parts, size = self.rules.config.max_body_bytes, [], 0
        for chunk in _chunks(body):
            part = _as_bytes(chunk)
            size += len(part)
            if size > limit:
                raise self.rules.too_large(method, url, size)
            parts.append(part)
        request.body = b"".join(parts)  # what was read is sent from memory
        return request.body

    def close(self) -> None:
        self.adapter.close()
