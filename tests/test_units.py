"""Pure parts: key schema, config validation, wire formats, decisions, serializers. No Redis."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strands_dedup import (
    DedupConfig,
    InvalidToken,
    JsonSerializer,
    SerializationError,
    SignedPickleSerializer,
)
from strands_dedup._keys import MAX_TOKEN_BYTES, KeySchema, display_form, validate_namespace
from strands_dedup._protocol import (
    WakeUp,
    decode_envelope,
    decode_message,
    encode_envelope,
    encode_released_message,
    encode_stored_message,
    encode_value_message,
    fingerprints_conflict,
    wait_budget,
)

pytestmark = pytest.mark.timeout(10)


# -- keys -------------------------------------------------------------------------------------


def test_plain_token_keys_share_one_hash_tag() -> None:
    keys = KeySchema("billing").for_token("req-8f3a", scope="tenant-1")
    assert keys.lease == b"billing:{tenant-1:req-8f3a}:lease"
    assert keys.result == b"billing:{tenant-1:req-8f3a}:result"
    assert keys.channel == b"billing:{tenant-1:req-8f3a}:chan"
    assert keys.token == "req-8f3a" and keys.scope == "tenant-1"


def test_str_and_bytes_tokens_are_the_same_token() -> None:
    schema = KeySchema("ns")
    assert schema.for_token("abc") == schema.for_token(b"abc")


@given(
    st.text(
        st.sampled_from(
            ["a", "~", "\x00", "\x7f", "\xad", "é", "\ud800", "😀", "\u2028", "\u0378"]
        ),
        min_size=1,
        max_size=260,
    )
)
def test_a_str_token_is_displayed_as_its_bytes_are(token: str) -> None:
    raw = token.encode("utf-8", "surrogatepass")
    keys = KeySchema("ns").for_token(token, scope=token)
    assert keys.token == keys.scope == display_form(raw) == KeySchema("ns").for_token(raw).token


@pytest.mark.parametrize(
    "token",
    ["a{b}c", "a*b", "a?b", "a[b]", "with space", "new\nline", b"\xff\xfe\x00", "x" * 10_000, "é"],
)
def test_unsafe_tokens_become_digests_that_keep_the_hash_tag_intact(token: str | bytes) -> None:
    keys = KeySchema("ns").for_token(token)
    inner = keys.lease[len(b"ns:{") : -len(b"}:lease")]
    assert inner.startswith(b":#") and len(inner) == 2 + 32
    for ch in b"{}*?[] \n":
        assert bytes([ch]) not in inner
    assert len(keys.token) <= 200  # display form is bounded
    assert keys.token.isprintable()


def test_scope_and_token_cannot_collide() -> None:
    schema = KeySchema("ns")
    assert schema.for_token("b:c", scope="a").lease != schema.for_token("c", scope="a:b").lease
    assert schema.for_token("t", scope="s").lease != schema.for_token("s:t").lease
    assert schema.for_token("x", scope="").lease == schema.for_token("x").lease


def test_digest_differs_from_a_plain_token_that_looks_like_one() -> None:
    schema = KeySchema("ns")
    digested = schema.for_token("needs digest!").lease
    assert schema.for_token(digested.split(b":")[2][:-1]).lease != digested


@pytest.mark.parametrize("bad", ["", b""])
def test_empty_token_is_refused(bad: str | bytes) -> None:
    with pytest.raises(InvalidToken, match="must not be empty"):
        KeySchema("ns").for_token(bad)


def test_oversized_and_mistyped_tokens_are_refused() -> None:
    with pytest.raises(InvalidToken, match="limit"):
        KeySchema("ns").for_token("x" * (MAX_TOKEN_BYTES + 1))
    with pytest.raises(TypeError, match="token must be str or bytes"):
        KeySchema("ns").for_token(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scope must be str or bytes"):
        KeySchema("ns").for_token("t", scope=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "a b", "a{b}", "x*", ":a", "a:", "a::b", "x" * 65])
def test_namespace_is_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        validate_namespace(bad)


def test_namespace_may_have_colon_separated_parts() -> None:
    assert validate_namespace("app:billing-v2") == "app:billing-v2"


# -- config -----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    cfg = DedupConfig()
    assert cfg.lease_ttl == 30 and cfg.effective_renew_interval == 10
    assert cfg.result_ttl == 86400 and cfg.wait_timeout == 300
    assert (cfg.on_duplicate, cfg.on_primary_error, cfg.cache_errors) == ("wait", "share", False)
    assert cfg.max_result_bytes == 16 * 1024 * 1024 and cfg.namespace == "strands-dedup"
    assert cfg.max_connections <= 32


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lease_ttl": 10, "renew_interval": 6}, "at most half of lease_ttl"),
        ({"cache_errors": True, "on_primary_error": "retry"}, "contradicts"),
        ({"lease_ttl": 0}, "greater than or equal"),
        ({"on_duplicate": "queue"}, "'wait' or 'raise'"),
        ({"namespace": "bad space"}, "namespace"),
        ({"max_result_bytes": 1024, "inline_result_bytes": 4096}, "inline_result_bytes"),
        ({"lease_tll": 3}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_config_fails_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        DedupConfig(**options)


# -- wire formats and decisions ------------------------------------------------------------------


def test_envelope_round_trip() -> None:
    header = {"st": "ok", "f": 7, "fp": "abc", "ser": "json", "t": 1, "tok": "t", "sc": ""}
    data = encode_envelope("a1b2", header, b'{"x":"\n|"}')
    env = decode_envelope(data)
    assert (env.owner, env.fence, env.ok, env.fingerprint) == ("a1b2", 7, True, "abc")
    assert env.payload == b'{"x":"\n|"}'
    assert decode_message(encode_value_message(data)) == env


def test_messages_decode_to_wakeups() -> None:
    assert decode_message(encode_stored_message(3)) is WakeUp.STORED
    assert decode_message(encode_released_message(3)) is WakeUp.RELEASED
    assert decode_message(b"junk") is WakeUp.MALFORMED
    assert decode_message(b"Vnot an envelope") is WakeUp.MALFORMED
    with pytest.raises(ValueError):
        decode_envelope(b"SD2|x|{}\n")


def test_fingerprint_conflict_needs_both_sides() -> None:
    assert fingerprints_conflict("a", "b")
    assert not fingerprints_conflict("a", "a")
    assert not fingerprints_conflict(None, "b") and not fingerprints_conflict("a", None)


def test_wait_budget_reads_again_after_the_lease_and_never_past_the_deadline() -> None:
    assert wait_budget(2000, 0.1, 100) == pytest.approx(2.1)
    assert wait_budget(2000, 0.1, 0.5) == 0.5
    assert wait_budget(-1, 0.1, 100) == pytest.approx(0.1)
    assert wait_budget(10, 0.0, -3) == 0.0


# -- serializers -----------------------------------------------------------------------------------


class Receipt(pydantic.BaseModel):
    order_id: str
    amount: int


@dataclasses.dataclass
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (Receipt(order_id="o1", amount=3), Receipt),
        (Point(1, 2), Point),
        ({"a": [1, 2.5, None, "s"]}, dict[str, Any]),
        ((1, "x"), tuple[int, str]),
        (None, type(None)),
    ],
)
def test_json_round_trips_to_the_annotated_type(value: Any, hint: Any) -> None:
    ser = JsonSerializer()
    assert ser.loads(ser.dumps(value, hint), hint) == value


def test_json_without_annotation_gives_plain_data() -> None:
    ser = JsonSerializer()
    assert ser.loads(ser.dumps(Point(1, 2), Any), Any) == {"x": 1, "y": 2}


def test_json_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(SerializationError, match="cannot be serialized"):
        JsonSerializer().dumps(object(), Any)
    with pytest.raises(SerializationError, match="does not validate"):
        JsonSerializer().loads(b'{"order_id": 1}', Receipt)


def test_signed_pickle_checks_the_signature_before_unpickling() -> None:
    ser = SignedPickleSerializer(b"k" * 32)
    data = ser.dumps({1, 2}, Any)
    assert ser.loads(data, Any) == {1, 2}
    with pytest.raises(SerializationError, match="signature"):
        SignedPickleSerializer(b"z" * 32).loads(data, Any)
    with pytest.raises(SerializationError, match="signature"):
        ser.loads(data[:-1] + b"X", Any)
    with pytest.raises(ValueError, match="16 bytes"):
        SignedPickleSerializer(b"short")


# -- the shared subscriber ----------------------------------------------------------------------


async def test_a_cancel_that_arrives_with_the_subscription_confirmation_is_not_lost() -> None:
    # The confirmation and the caller's cancellation land in the same loop iteration: the
    # waiter must end cancelled (on Python 3.11 asyncio.wait_for returned normally here, and a
    # cancelled session waiter went on waiting in the queue).
    import asyncio

    from subscribers import HandDriven

    sub = HandDriven(lambda: None, decode=decode_message, connect_timeout=1, give_up_after=1)
    watch = sub.register(b"chan")
    waiting = asyncio.ensure_future(watch.ready(10))
    await asyncio.sleep(0)  # the waiter now awaits the confirmation
    sub.confirm(b"chan")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    watch.close()


def test_a_deduplicator_without_a_url_says_once_that_it_is_in_process_only() -> None:
    """In a fresh process: two bare deduplicators, a blocking one and a from_url("memory://")
    log the warning once."""
    script = textwrap.dedent(
        """
        import asyncio, logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from strands_dedup import Deduplicator, SyncDeduplicator

        async def main():
            async with Deduplicator() as first, Deduplicator() as second:
                await first.execute("t", lambda: 1)
                await second.execute("t", lambda: 1)
            async with Deduplicator.from_url("memory://meant"):
                pass

        asyncio.run(main())
        with SyncDeduplicator():
            pass
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    said = [line for line in done.stderr.splitlines() if "in this process only" in line]
    assert len(said) == 1 and said[0].startswith("WARNING"), done.stderr
    assert "from_url" in said[0]
