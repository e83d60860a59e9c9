"""The protocol's wire formats (both ways) and the waiter's decisions, without Redis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strands_dedup._keys import KeySchema
from strands_dedup._protocol import (
    MSG_APPENDED,
    Grant,
    Wake,
    WakeUp,
    after_wake,
    decode_envelope,
    decode_lease,
    decode_message,
    decode_meta,
    encode_envelope,
    encode_lease,
    encode_lease_meta,
    encode_released_message,
    encode_session_meta,
    encode_stored_message,
    encode_value_message,
    envelope_header,
    fence_of,
)

pytestmark = pytest.mark.timeout(10)


def _envelope(ok: bool = True) -> bytes:
    header = envelope_header(
        ok=ok,
        fence=7,
        fingerprint="fp",
        serializer="json",
        created_ms=1,
        token="t",
        scope="s",
        error_type="" if ok else "builtins.ValueError",
        error_message="" if ok else "boom",
    )
    return encode_envelope("abc", header, b'"v"' if ok else b"")


def test_an_envelope_round_trips() -> None:
    env = decode_envelope(_envelope())
    assert (env.owner, env.fence, env.ok, env.fingerprint, env.payload) == (
        "abc",
        7,
        True,
        "fp",
        b'"v"',
    )
    failed = decode_envelope(_envelope(ok=False))
    assert (failed.ok, failed.error_type, failed.error_message) == (
        False,
        "builtins.ValueError",
        "boom",
    )
    assert fence_of(_envelope()) == 7 and fence_of(b"not ours") is None


def test_a_share_only_envelope_is_a_value_that_was_not_stored() -> None:
    header = envelope_header(
        ok=False,
        fence=3,
        fingerprint=None,
        serializer="json",
        created_ms=1,
        token="t",
        scope="",
        error_type="strands_dedup._protocol.ShareOnly",
        error_message="status 503 is not retained",
        shared_only=True,
    )
    shared = decode_envelope(encode_envelope("o", header, b"the response"))
    assert (shared.stored, shared.ok, shared.payload) == (False, False, b"the response")
    assert shared.error_message == "status 503 is not retained"
    assert decode_envelope(_envelope()).stored and decode_envelope(_envelope(ok=False)).stored


_TEXT = st.text(
    st.sampled_from(
        ["a", "Z", '"', "\\", "\x00", "\x1f", "\x7f", "é", "☃", "\ud800", "😀", " ", "\u2028"]
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(
    token=_TEXT.filter(bool),
    scope=st.none() | _TEXT,
    fingerprint=st.none() | _TEXT,
    serializer=_TEXT,
    ok=st.booleans(),
    shared_only=st.booleans(),
    error_type=_TEXT,
    error_message=_TEXT,
    fence=st.integers(0, 2**53),
)
def test_a_result_envelope_round_trips_whatever_its_fields_hold(
    token: str,
    scope: str | None,
    fingerprint: str | None,
    serializer: str,
    ok: bool,
    shared_only: bool,
    error_type: str,
    error_message: str,
    fence: int,
) -> None:
    keys = KeySchema("ns").for_token(token, scope)
    common = {
        "ok": ok,
        "fence": fence,
        "fingerprint": fingerprint,
        "serializer": serializer,
        "created_ms": 1_700_000_000_123,
        "error_type": error_type,
        "error_message": error_message,
        "shared_only": shared_only,
    }
    header = envelope_header(token=keys.token, scope=keys.scope, **common)  # type: ignore[arg-type]
    decoded = decode_envelope(encode_envelope("0a1b", header, b"pay|load\n"))
    assert (decoded.owner, decoded.fence, decoded.payload) == ("0a1b", fence, b"pay|load\n")
    assert (decoded.token, decoded.scope) == (keys.token, keys.scope)
    assert (decoded.fingerprint, decoded.serializer) == (fingerprint, serializer)
    assert decoded.ok == (ok and not shared_only) and decoded.stored == (not shared_only)
    if not ok:
        assert (decoded.error_type, decoded.error_message) == (error_type, error_message)


def test_lease_and_session_metadata_round_trip() -> None:
    meta = encode_lease_meta('"tok":"t","sc":""', "fp", 123)
    lease = decode_lease(encode_lease("abc", 9, meta), 500)
    assert (lease.owner, lease.fence, lease.fingerprint, lease.pttl_ms) == ("abc", 9, "fp", 500)
    assert lease.meta["tok"] == "t" and lease.meta["t"] == 123 and isinstance(lease.meta["p"], int)
    session = decode_meta(encode_session_meta("s-1", 4, 5))
    assert (session["s"], session["q"], session["t"]) == ("s-1", 4, 5)
    assert decode_meta(b"[1]") == {} and decode_meta(b"{") == {} and decode_meta(None) == {}


def test_every_message_decodes_to_what_a_waiter_acts_on() -> None:
    assert decode_envelope(_envelope()) == decode_message(encode_value_message(_envelope()))
    assert decode_message(encode_stored_message(3)) is WakeUp.STORED
    assert decode_message(encode_released_message(3)) is WakeUp.RELEASED
    assert decode_message(MSG_APPENDED + b"3") is WakeUp.APPENDED
    assert decode_message(b"G1.a|5|-1|-1|0") == Grant("1.a", 5, None, False)
    assert decode_message(b"Vjunk") is WakeUp.MALFORMED and decode_message(b"?") is WakeUp.MALFORMED


@pytest.mark.parametrize(
    ("event", "action"),
    [
        (None, Wake.REREAD),  # the lease may have run out: read again
        (WakeUp.RELEASED, Wake.REREAD),
        (WakeUp.MALFORMED, Wake.REREAD),
        (WakeUp.RECONNECTED, Wake.RESUBSCRIBE),  # messages may be lost: confirm, then read
        (WakeUp.STORED, Wake.HEAR),
        (WakeUp.APPENDED, Wake.HEAR),
        (Grant("t", 1, None, False), Wake.HEAR),
    ],
)
def test_what_a_waiter_does_after_each_wake_up(event: object, action: Wake) -> None:
    assert after_wake(event) is action


def test_the_envelope_holds_each_field_once() -> None:
    env = _envelope()
    assert env == b'SD2|abc|7|o|json|1|fp|{"tok":"t","sc":"s"}\n"v"'
    plain = envelope_header(
        ok=True, fence=7, fingerprint=None, serializer="json", created_ms=1, token="", scope=""
    )
    assert encode_envelope("abc", plain, b"1") == b"SD2|abc|7|o|json|1||\n1"
    odd = envelope_header(
        ok=True, fence=7, fingerprint="a|b\nc", serializer="x|y", created_ms=1, token="", scope=""
    )
    decoded = decode_envelope(encode_envelope("abc", odd, b"1"))
    assert (decoded.fingerprint, decoded.serializer, decoded.token) == ("a|b\nc", "x|y", "")


def test_an_envelope_of_the_previous_format_is_still_read() -> None:
    old = b'SD1|abc|{"st":"ok","f":7,"fp":"fp","ser":"json","t":1,"tok":"t","sc":"s"}\n"v"'
    env = decode_envelope(old)
    assert (env.owner, env.fence, env.ok, env.fingerprint, env.serializer) == (
        "abc",
        7,
        True,
        "fp",
        "json",
    )
    assert (env.created_ms, env.token, env.scope, env.payload, env.stored) == (
        1,
        "t",
        "s",
        b'"v"',
        True,
    )
    assert fence_of(old) == 7
    assert decode_envelope(old) == decode_message(encode_value_message(old))
