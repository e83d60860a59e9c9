"""How results cross process boundaries.

The default, `JsonSerializer`, writes JSON and reads it back into the callable's return type with
pydantic: pydantic models, dataclasses, TypedDicts and builtin types round-trip to their type.
`SignedPickleSerializer` is the only way pickle is ever used, and only with a key: every payload
carries an HMAC-SHA256 that is checked before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from .errors import SerializationError

__all__ = ["JsonSerializer", "Serializer", "SignedPickleSerializer"]


@runtime_checkable
class Serializer(Protocol):
    """Turns results into bytes and back. ``type_hint`` is the callable's return type or `Any`."""

    name: str
    """Recorded with each result; a reader with another serializer refuses it."""

    def dumps(self, value: Any, type_hint: Any) -> bytes: ...

    def loads(self, data: bytes, type_hint: Any) -> Any: ...


@lru_cache(maxsize=512)
def _adapter(type_hint: Any) -> TypeAdapter[Any]:
    return TypeAdapter(type_hint)


class JsonSerializer:
    """JSON through pydantic; values come back as ``type_hint`` (plain JSON data for `Any`)."""

    name = "json"

    def dumps(self, value: Any, type_hint: Any) -> bytes:
        try:
            return pydantic_core.to_json(value)
        except pydantic_core.PydanticSerializationError as exc:
            raise SerializationError(
                f"result of type {type(value).__name__} cannot be serialized as JSON: {exc}; "
                "return JSON-compatible data, a pydantic model or a dataclass, or pass a "
                "serializer"
            ) from exc

    def loads(self, data: bytes, type_hint: Any) -> Any:
        try:
            adapter = _adapter(type_hint)
        except TypeError:  # unhashable or unsupported hint: fall back to plain JSON data
            adapter = _adapter(Any)
        try:
            return adapter.validate_json(data)
        except ValidationError as exc:
            raise SerializationError(
                f"stored result does not validate as {type_hint!r}: {exc.error_count()} error(s), "
                f"first: {exc.errors()[0]['msg']}"
            ) from exc


class SignedPickleSerializer:
    """Pickle, opt-in, for results JSON cannot carry; every payload is HMAC-SHA256 signed.

    Only bytes whose signature checks out under ``signing_key`` are unpickled, so a process that
    can write to Redis but does not hold the key cannot make readers run code.
    """

    name = "pickle-hmac-sha256"
    _DIGEST = 32

    def __init__(self, signing_key: bytes | str) -> None:
        key = signing_key.encode() if isinstance(signing_key, str) else signing_key
        if len(key) < 16:
            raise ValueError("signing_key must be at least 16 bytes long")
        self._key = key

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def dumps(self, value: Any, type_hint: Any) -> bytes:
        try:
            body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickle raises many types for unpicklable values
            raise SerializationError(f"result cannot be pickled: {exc}") from exc
        return self._sign(body) + body

    def loads(self, data: bytes, type_hint: Any) -> Any:
        signature, body = data[: self._DIGEST], data[self._DIGEST :]
        if len(signature) != self._DIGEST or not hmac.compare_digest(signature, self._sign(body)):
            raise SerializationError(
                "stored result's signature does not match: refusing to unpickle"
            )
        return pickle.loads(body)  # noqa: S301 - signature checked above
