"""How results cross process boundaries.

The default, `JsonSerializer`, writes JSON and reads it back into the callable's return type with
pydantic: pydantic models, dataclasses, TypedDicts and builtin types round-trip to their type.
`SignedPickleSerializer` is the only way pickle is ever used, and only with a key: every payload
carries an HMAC-SHA256 that is checked before anything is unpickled. `outcome_from_bytes` and
`outcome_from_envelope` read a stored (or shared) result envelope back into a caller's `Outcome`.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from ._errors import FingerprintMismatch, NotStored, PrimaryFailed, SerializationError
from ._protocol import Envelope, Outcome, Role, decode_envelope, fingerprints_conflict

if TYPE_CHECKING:
    from ._keys import TokenKeys

__all__ = [
    "JsonSerializer",
    "Serializer",
    "SignedPickleSerializer",
    "outcome_from_bytes",
    "outcome_from_envelope",
]


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


def outcome_from_bytes(
    data: bytes,
    role: Role,
    keys: TokenKeys,
    fingerprint: str | None,
    rtype: Any,
    serializer: Serializer,
) -> Outcome[Any]:
    """The `Outcome` a stored (or shared) envelope gives a caller of ``keys`` (see
    `outcome_from_envelope`); `SerializationError` when ``data`` is no result envelope."""
    try:
        envelope = decode_envelope(data)
    except (ValueError, KeyError) as exc:
        raise SerializationError(
            f"the value stored for token {keys.token!r} is not a strands-dedup result",
            token=keys.token,
        ) from exc
    return outcome_from_envelope(envelope, role, keys, fingerprint, rtype, serializer)


def outcome_from_envelope(
    envelope: Envelope,
    role: Role,
    keys: TokenKeys,
    fingerprint: str | None,
    rtype: Any,
    serializer: Serializer,
) -> Outcome[Any]:
    """The `Outcome` a decoded envelope gives a caller (one decode serves every waiter):
    the value read as ``rtype``, or the error it stands for (`FingerprintMismatch` for another
    request, `NotStored` for a value only shared, `PrimaryFailed`, `SerializationError`)."""
    if fingerprints_conflict(fingerprint, envelope.fingerprint):
        raise FingerprintMismatch(
            f"token {keys.token!r} was used for a different request (fingerprint differs)",
            token=keys.token,
        )
    if not envelope.stored:
        raise NotStored(
            f"the primary for token {keys.token!r} handed its value to the duplicates "
            f"waiting then, without storing it: {envelope.error_message}",
            token=keys.token,
            reason=envelope.error_message,
            shared=envelope.payload,
            fence=envelope.fence,
        )
    if not envelope.ok:
        raise PrimaryFailed(
            f"the primary for token {keys.token!r} failed: "
            f"{envelope.error_type}: {envelope.error_message}",
            token=keys.token,
            error_type=envelope.error_type,
            error_message=envelope.error_message,
            fence=envelope.fence,
        )
    if envelope.serializer != serializer.name:
        raise SerializationError(
            f"the result for token {keys.token!r} was written with serializer "
            f"{envelope.serializer!r}; this deduplicator reads {serializer.name!r}",
            token=keys.token,
        )
    try:
        value = serializer.loads(envelope.payload, rtype)
    except SerializationError as exc:
        exc.token = keys.token
        raise
    except Exception as exc:
        raise SerializationError(
            f"the result for token {keys.token!r} could not be read: {exc}", token=keys.token
        ) from exc
    return Outcome(value, role, envelope.fence)
