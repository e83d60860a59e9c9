"""Outgoing requests keyed by their call (strands_dedup.http._outgoing), in one process.

The transports send to an ``httpx.MockTransport`` that records what arrives; calls run on the
embedded memory:// store. The end-to-end run (a primary SIGKILLed after its POST reached a
service behind the gateway, and its taker) is in test_effects.py.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pydantic
import pytest
import requests
import requests.adapters
from hypothesis import assume, given
from hypothesis import strategies as st

from strands_dedup import Deduplicator, SyncDeduplicator, UnkeyedRequest, current_call
from strands_dedup.http import (
    FENCE_HEADER,
    IdempotentAsyncTransport,
    IdempotentTransport,
    OutgoingConfig,
    effect_key,
)
from strands_dedup.http.outgoing_requests import IdempotentAdapter

pytestmark = pytest.mark.timeout(30)
URL = "https://payments.example/v1/refunds"


class Recorder:
    """What the downstream service saw: each request's method, URL, headers and body."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return httpx.Response(201, json={"ok": True})

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.seen]

    @property
    def fences(self) -> list[str | None]:
        return [r.headers.get(FENCE_HEADER) for r in self.seen]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def dedup() -> AsyncIterator[Deduplicator]:
    async with Deduplicator.from_url(f"memory://{uuid.uuid4().hex[:8]}", namespace="out") as d:
        yield d


def async_client(recorder: Recorder, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=IdempotentAsyncTransport(httpx.MockTransport(recorder), **options)
    )


def sync_client(recorder: Recorder, **options: Any) -> httpx.Client:
    return httpx.Client(transport=IdempotentTransport(httpx.MockTransport(recorder), **options))


async def test_the_same_request_gets_the_same_key_on_every_attempt(
    dedup: Deduplicator, recorder: Recorder
) -> None:
    attempts = 0

    async def call() -> str:
        nonlocal attempts
        attempts += 1
        async with async_client(recorder) as client:
            await client.post(URL, json={"order": 7, "cents": 500})
        if attempts == 1:
            raise RuntimeError("the first attempt dies after its POST")
        return "done"

    with pytest.raises(RuntimeError):
        await dedup.run("refund-7", call, scope="tenant-a")
    assert await dedup.run("refund-7", call, scope="tenant-a") == "done"
    first, second = recorder.seen
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert first.headers["idempotency-key"].startswith("sd1-")
    assert len(first.headers["idempotency-key"]) == 4 + 64
    # the fence grows with the attempt; the key does not follow it
    assert int(second.headers[FENCE_HEADER]) > int(first.headers[FENCE_HEADER]) > 0


async def test_a_different_request_or_call_gets_a_different_key(
    dedup: Deduplicator, recorder: Recorder
) -> None:
    async def requests(client: httpx.AsyncClient) -> None:
        await client.post(URL, json={"order": 7})
        await client.put(URL, json={"order": 7})
        await client.post(URL + "/7", json={"order": 7})
        await client.post(URL + "?dry=1", json={"order": 7})
        await client.post(URL, json={"order": 8})
        await client.patch(URL, json={"order": 7})
        await client.delete(URL)

    async def call() -> None:
        async with async_client(recorder) as client:
            await requests(client)

    await dedup.run("t1", call, scope="tenant-a")
    await dedup.run("t2", call, scope="tenant-a")  # another token
    await dedup.run("t1", call, scope="tenant-b")  # another scope
    await dedup.run("t1", call)  # no scope
    async with Deduplicator.from_url(
        f"memory://{uuid.uuid4().hex[:8]}", namespace="other"
    ) as other:
        await other.run("t1", call, scope="tenant-a")  # another namespace
    keys = recorder.keys
    assert len(keys) == 5 * 7 and None not in keys
    assert len(set(keys)) == len(keys)


async def test_replicas_and_both_shells_derive_the_same_key(recorder: Recorder) -> None:
    async def call() -> None:
        async with async_client(recorder) as client:
            await client.post(URL, content=b"refund 7")

    for _ in range(2):  # two replicas: two deduplicators on their own stores
        async with Deduplicator.from_url(
            f"memory://{uuid.uuid4().hex[:8]}", namespace="out"
        ) as replica:
            await replica.run("t1", call, scope="s")

    def blocking_call() -> None:
        with sync_client(recorder) as client:
            client.post(URL, content=b"refund 7")

    def in_thread() -> None:
        with SyncDeduplicator.from_url(
            f"memory://{uuid.uuid4().hex[:8]}", namespace="out"
        ) as sync_dedup:
            sync_dedup.run("t1", blocking_call, scope="s")

    await asyncio.to_thread(in_thread)
    assert len(recorder.keys) == 3 and len(set(recorder.keys)) == 1


async def test_a_key_of_the_callers_own_is_kept_and_safe_methods_are_untouched(
    dedup: Deduplicator, recorder: Recorder
) -> None:
    async def call() -> int:
        async with async_client(recorder) as client:
            await client.post(URL, json={}, headers={"Idempotency-Key": "mine"})
            await client.post(URL, json={}, headers={FENCE_HEADER: "99"})
            for method in ("GET", "HEAD", "OPTIONS"):
                await client.request(method, URL)
        context = current_call()
        assert context is not None
        return context.fence

    fence = await dedup.run("t1", call)
    own, fenced, *safe = recorder.seen
    assert own.headers["idempotency-key"] == "mine"
    assert own.headers[FENCE_HEADER] == str(fence)
    assert fenced.headers["idempotency-key"].startswith("sd1-")
    assert fenced.headers[FENCE_HEADER] == "99"
    for request in safe:
        assert "idempotency-key" not in request.headers
        assert FENCE_HEADER not in request.headers


async def test_the_methods_and_headers_are_configurable(
    dedup: Deduplicator, recorder: Recorder
) -> None:
    options = {"methods": ("post",), "header": "X-Request-Key", "fence_header": "X-Fence"}

    async def call() -> None:
        async with async_client(recorder, **options) as client:
            await client.post(URL, json={})
            await client.put(URL, json={})

    await dedup.run("t1", call)
    posted, put = recorder.seen
    assert posted.headers["x-request-key"].startswith("sd1-")
    assert int(posted.headers["x-fence"]) > 0
    assert "idempotency-key" not in posted.headers
    assert "x-request-key" not in put.headers and "x-fence" not in put.headers


async def test_outside_a_call_nothing_is_added_unless_strict(recorder: Recorder) -> None:
    async with async_client(recorder) as client:
        await client.post(URL, json={})
    assert recorder.keys == [None] and recorder.fences == [None]
    async with async_client(recorder, strict=True) as client:
        await client.get(URL)  # a safe method is never refused
        with pytest.raises(UnkeyedRequest) as caught:
            await client.post("https://user:secret@payments.example/v1/refunds?token=abc", json={})
        await client.post(URL, json={}, headers={"Idempotency-Key": "mine"})
    assert len(recorder.seen) == 3  # the refused request was never sent
    assert caught.value.method == "POST"
    assert caught.value.url == "https://payments.example/v1/refunds"
    assert "secret" not in str(caught.value) and "abc" not in str(caught.value)
    assert "strict=True" in str(caught.value)
    with sync_client(recorder, strict=True) as sync, pytest.raises(UnkeyedRequest):
        sync.post(URL, json={})


def _chunks(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


async def _achunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


async def test_a_streamed_body_is_read_up_to_the_bound_then_refused(
    dedup: Deduplicator, recorder: Recorder
) -> None:
    body = bytes(range(256)) * 40  # 10,240 bytes

    async def call() -> None:
        async with async_client(recorder, max_body_bytes=len(body)) as client:
            await client.post(URL, content=body)
            await client.post(URL, content=_achunks(body))
            with pytest.raises(UnkeyedRequest) as caught:
                await client.post(URL, content=_achunks(body + b"!"))
            assert "max_body_bytes" in str(caught.value)
            # a key of the caller's own needs no digest: the stream goes as it is
            await client.post(URL, content=_achunks(body * 2), headers={"Idempotency-Key": "k"})

    await dedup.run("t1", call)
    plain, streamed, own = recorder.seen
    assert streamed.headers["idempotency-key"] == plain.headers["idempotency-key"]
    assert streamed.content == body and own.content == body * 2

    def blocking_call() -> None:
        with sync_client(recorder, max_body_bytes=len(body)) as client:
            client.post(URL, content=_chunks(body))
            with pytest.raises(UnkeyedRequest):
                client.post(URL, content=_chunks(body + b"!"))

    def in_thread() -> None:
        with SyncDeduplicator.from_url(
            f"memory://{uuid.uuid4().hex[:8]}", namespace="out"
        ) as sync_dedup:
            sync_dedup.run("t1", blocking_call)

    await asyncio.to_thread(in_thread)
    assert len(recorder.seen) == 4
    assert recorder.seen[3].headers["idempotency-key"] == plain.headers["idempotency-key"]
    assert recorder.seen[3].content == body


async def test_a_multipart_upload_gets_one_key_whatever_its_boundary(
    dedup: Deduplicator, recorder: Recorder
) -> None:
    async def call() -> None:
        async with async_client(recorder) as client:
            for content in (b"invoice 7", b"invoice 7", b"invoice 8"):
                await client.post(URL, data={"order": "7"}, files={"pdf": ("a.pdf", content)})

    await dedup.run("t1", call)
    first, second, other = recorder.seen
    assert first.headers["content-type"] != second.headers["content-type"]  # two boundaries
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert other.headers["idempotency-key"] != first.headers["idempotency-key"]


async def test_inside_a_nested_call_the_innermost_call_names_the_request(
    dedup: Deduplicator, recorder: Recorder
) -> None:
    async def inner() -> None:
        async with async_client(recorder) as client:
            await client.post(URL, json={})

    async def outer() -> None:
        await inner()
        await dedup.run("inner", inner)

    await dedup.run("outer", outer)
    assert recorder.keys[0] != recorder.keys[1]


async def test_current_call_names_the_call_by_namespace_scope_and_token(
    dedup: Deduplicator,
) -> None:
    async def call() -> bytes:
        context = current_call()
        assert context is not None
        return context.identity

    assert await dedup.run("t1", call, scope="s") == b"out:{s:t1}"
    long = "x" * 300  # a digest names it: the display form of such a token is cut
    identity = await dedup.run(long, call, scope="s")
    assert identity.startswith(b"out:{s:#") and long.encode() not in identity


def test_options_are_validated() -> None:
    with pytest.raises(TypeError, match="not both"):
        IdempotentTransport(config=OutgoingConfig(), strict=True)
    with pytest.raises(pydantic.ValidationError):
        IdempotentAsyncTransport(max_body_bytes=-1)
    with pytest.raises(pydantic.ValidationError):
        IdempotentTransport(methods=("POST", " "))
    with pytest.raises(pydantic.ValidationError):
        IdempotentTransport(retries=3)


identities = st.binary(min_size=1, max_size=40)
methods = st.sampled_from(["POST", "PUT", "PATCH", "DELETE"])
urls = st.text(alphabet="abc/:?=&.", min_size=1, max_size=30)
bodies = st.binary(max_size=100)


@given(st.tuples(identities, methods, urls, bodies), st.tuples(identities, methods, urls, bodies))
def test_a_key_is_a_function_of_the_call_and_the_request_alone(
    first: tuple[bytes, str, str, bytes], second: tuple[bytes, str, str, bytes]
) -> None:
    assert effect_key(*first) == effect_key(*first)
    assert (effect_key(*first) == effect_key(*second)) == (first == second)


@given(st.lists(st.binary(max_size=30), min_size=1, max_size=5), st.binary(max_size=40))
def test_a_multipart_body_is_digested_without_its_boundary(
    parts: list[bytes], identity: bytes
) -> None:
    one, two = "1" * 32, "2" * 32
    body_one = b"--" + one.encode() + (b"--" + one.encode()).join(parts)
    body_two = b"--" + two.encode() + (b"--" + two.encode()).join(parts)
    assume(one.encode() not in b"".join(parts) and two.encode() not in b"".join(parts))
    key_one = effect_key(identity, "POST", "u", body_one, f"multipart/form-data; boundary={one}")
    key_two = effect_key(identity, "POST", "u", body_two, f'multipart/mixed; boundary="{two}"')
    assert key_one == key_two
    # a body that is not multipart is digested as it is
    assert effect_key(identity, "POST", "u", body_one) != effect_key(
        identity, "POST", "u", body_two
    )


# -- requests ----------------------------------------------------------------------------------


class RecordingAdapter(requests.adapters.BaseAdapter):
    """A requests adapter that records what it is given and answers 201."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(request)
        response = requests.Response()
        response.status_code, response.raw, response.request = 201, io.BytesIO(b"{}"), request
        return response

    def close(self) -> None:
        pass


def test_the_requests_adapter_keys_like_the_httpx_transports(recorder: Recorder) -> None:
    sent = RecordingAdapter()
    session = requests.Session()
    session.mount("https://", IdempotentAdapter(sent, max_body_bytes=10))
    attempts = 0

    def call() -> None:
        nonlocal attempts
        attempts += 1
        session.post(URL, data=b"refund 7")
        session.post(URL, data=iter([b"refund", " 7"]))  # streamed: read, then sent from memory
        session.post(URL, data=io.BytesIO(b"refund 7"))
        with pytest.raises(UnkeyedRequest):
            session.post(URL, data=iter([b"refund 7", b" and 8"]))
        session.get(URL)
        with httpx.Client(transport=IdempotentTransport(httpx.MockTransport(recorder))) as client:
            client.post(URL, content=b"refund 7")
        if attempts == 1:
            raise RuntimeError("the first attempt dies")

    with SyncDeduplicator.from_url(f"memory://{uuid.uuid4().hex[:8]}", namespace="out") as dedup:
        with pytest.raises(RuntimeError):
            dedup.run("t1", call)
        dedup.run("t1", call)
    posts = [r for r in sent.seen if r.method == "POST"]
    assert len(posts) == 6
    assert {r.headers["Idempotency-Key"] for r in posts} == set(recorder.keys)
    assert len(set(recorder.keys)) == 1  # every attempt, both libraries, any body form
    assert [r.body for r in posts] == [b"refund 7"] * 6
    assert int(posts[0].headers[FENCE_HEADER]) < int(posts[3].headers[FENCE_HEADER])
    get = next(r for r in sent.seen if r.method == "GET")
    assert "Idempotency-Key" not in get.headers and FENCE_HEADER not in get.headers
    session.post(URL, data=b"outside")  # outside a call: as it is
    assert "Idempotency-Key" not in sent.seen[-1].headers
    with pytest.raises(TypeError, match="not both"):
        IdempotentAdapter(config=OutgoingConfig(), strict=True)
