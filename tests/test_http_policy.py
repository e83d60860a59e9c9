"""The HTTP rules as plain functions: request targets, keys, identities and headers, fuzzed."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strands_dedup.http._policy import (
    ANONYMOUS,
    GatewayConfig,
    HttpConfig,
    Rejected,
    identity_of,
    parse_key,
    relay_headers,
    replay_headers,
    retry_after,
    split_upstream,
    upstream_target,
)

pytestmark = pytest.mark.timeout(60)

PIECES = st.sampled_from(
    ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", ";", "..;", "@", ":", "?",
     "%", "%25", "%00", "a", "b", "~", "http://x", "*", "%252e", "\x00", "é"]
)  # fmt: skip
TARGETS = st.one_of(
    st.lists(PIECES, max_size=12).map(lambda parts: "".join(parts).encode("utf-8")),
    st.binary(max_size=64),
)


def resolves_under(path: str, base: str) -> bool:
    """Decode once and remove dot-segments, as an upstream would: still under ``base``?"""
    stack: list[bytes] = []
    for segment in unquote_to_bytes(path).split(b"/")[1:]:
        if segment in (b"..",):
            if not stack:
                return False
            stack.pop()
        elif segment != b".":
            stack.append(segment)
    base_parts = [p.encode() for p in base.split("/")[1:]] if base else []
    return stack[: len(base_parts)] == base_parts and b"\\" not in b"/".join(stack)


@settings(max_examples=2000, deadline=None)
@given(raw=TARGETS, query=st.binary(max_size=16), base=st.sampled_from(["", "/api", "/a/b"]))
def test_a_target_stays_under_the_base_or_is_refused(raw: bytes, query: bytes, base: str) -> None:
    try:
        target = upstream_target(raw, query, base)
    except Rejected as rejected:
        assert rejected.status == 400 and rejected.kind == "bad-target"
        return
    assert raw.startswith(b"/") and not raw.startswith(b"//")
    target.encode("ascii")  # always plain ASCII: nothing for a client library to re-interpret
    path = target.split("?", 1)[0]
    assert path.startswith(base + "/")
    assert resolves_under(path, base)
    # The upstream URL built from it keeps the configured origin.
    url = urlsplit("http://svc:8080" + target)
    assert (url.scheme, url.hostname, url.port, url.username) == ("http", "svc", 8080, None)
    # Normalizing again changes nothing: no dot-segment survives the first pass.
    assert upstream_target(path[len(base) :].encode(), b"", base) == path


def test_targets_by_example() -> None:
    assert upstream_target(b"/x/../y", b"q=1", "/api") == "/api/y?q=1"
    assert upstream_target(b"/x/%2e%2e/y/.", b"", "") == "/y/"
    assert upstream_target(b"/a%20b/%25", b"a b#c", "/api") == "/api/a%20b/%25?a%20b%23c"
    for bad in [b"*", b"http://evil/", b"//evil/x", b"/..", b"/%2e%2e/x", b"/..;/x", b"/a\\b"]:
        with pytest.raises(Rejected):
            upstream_target(bad, b"", "/api")


@pytest.mark.parametrize(
    "url",
    ["ftp://svc", "http://", "http://u:p@svc", "http://svc/?q=1", "http://svc/#f", "svc:80",
     "http://svc/a/../b", "http://svc:99999"],
)  # fmt: skip
def test_an_unsafe_upstream_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        split_upstream(url)
    with pytest.raises(ValueError):
        GatewayConfig(upstream=url)


def test_an_upstream_is_split_into_fixed_parts() -> None:
    assert split_upstream("http://svc:8080/api/") == ("http", "svc", 8080, "/api")
    assert split_upstream("https://[::1]") == ("https", "::1", None, "")


@settings(max_examples=1000, deadline=None)
@given(values=st.lists(st.binary(max_size=40), max_size=3))
def test_a_key_is_one_value_or_refused(values: list[bytes]) -> None:
    try:
        key = parse_key(values, 30)
    except Rejected as rejected:
        assert rejected.status == 400 and rejected.kind == "key-invalid"
        return
    assert len(values) == 1 and 1 <= len(key) <= 30
    assert not any(b < 0x20 or b == 0x7F for b in key)


def test_keys_by_example() -> None:
    assert parse_key([b"abc"], 10) == parse_key([b'"abc"'], 10) == b"abc"
    assert parse_key([b'"a\\"b"'], 10) == b'a"b'
    for bad in ([b"a", b"b"], [b"a, b"], [b'"a", "b"'], [b'"a'], [b""], [b"x" * 11], []):
        with pytest.raises(Rejected):
            parse_key(bad, 10)


def test_an_identity_is_a_keyed_digest_of_the_credentials() -> None:
    names = frozenset({b"authorization", b"x-api-key"})
    alice = [(b"Authorization", b"Bearer alice")]
    one = identity_of(alice, names, b"k1")
    assert one.startswith("id-") and "alice" not in one
    assert one == identity_of([(b"authorization", b"Bearer alice")], names, b"k1")
    assert one != identity_of(alice, names, b"k2")  # the secret keys the digest
    assert one != identity_of([(b"Authorization", b"Bearer bob")], names, b"k1")
    assert one != identity_of([(b"X-Api-Key", b"Bearer alice")], names, b"k1")
    assert identity_of([(b"Cookie", b"sid=1")], names, b"k1") == ANONYMOUS


def test_configuration_refuses_a_credential_as_tenant_and_unknown_options() -> None:
    with pytest.raises(ValueError, match="credential header"):
        HttpConfig(scope_header="X-Api-Key")
    with pytest.raises(ValueError):
        HttpConfig(max_request_body=0)
    with pytest.raises(ValueError):
        HttpConfig(no_such_option=1)  # type: ignore[call-arg]
    assert HttpConfig(methods=("post",)).methods == ("POST",)


def test_stored_and_relayed_headers() -> None:
    upstream = [
        (b"Content-Type", b"text/plain"),
        (b"Content-Length", b"5"),
        (b"Date", b"Mon, 01 Jan 2001 00:00:00 GMT"),
        (b"Set-Cookie", b"sid=1"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"no"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    assert replay_headers(upstream, False) == [(b"Content-Type", b"text/plain")]
    assert (b"Set-Cookie", b"sid=1") in replay_headers(upstream, True)
    relayed = relay_headers(upstream)
    assert (b"Content-Length", b"5") in relayed and (b"Set-Cookie", b"sid=1") in relayed
    assert not [n for n, _ in relayed if n.lower() in (b"date", b"x-private", b"keep-alive")]
    chunked = relay_headers([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")])
    assert chunked == []


def test_retry_after_is_whole_seconds_within_bounds() -> None:
    assert retry_after(0.2, 30) == b"1"
    assert retry_after(12.1, 30) == b"13"
    assert retry_after(1e9, 30) == b"30"
    assert retry_after(float("inf"), 30) == b"30"
