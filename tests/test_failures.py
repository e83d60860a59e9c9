"""The one table that maps driver errors to the library's: what is retried, what each becomes.
Error replies are made by redis-py's own parser from the server's text."""

from __future__ import annotations

import pytest
import redis.exceptions as rex
from redis._parsers import _RESP2Parser

from strands_dedup import StoreRefused, StoreUnavailable
from strands_dedup._store.failures import (
    Verdict,
    classify,
    describe_error,
    is_transient,
    store_error,
)

pytestmark = pytest.mark.timeout(10)


def reply(text: str) -> BaseException:
    """The exception redis-py raises for the error reply ``text``."""
    error: BaseException = _RESP2Parser(socket_read_size=1).parse_error(text)
    return error


@pytest.mark.parametrize(
    ("text", "retried", "verdict"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", False, Verdict.REFUSED),
        ("READONLY You can't write against a read only replica.", True, Verdict.REFUSED),
        ("NOPERM this user has no permissions to run the 'evalsha' command", False,
         Verdict.REFUSED),
        ("NOAUTH Authentication required.", False, Verdict.CREDENTIALS),
        ("WRONGPASS invalid username-password pair", False, Verdict.CREDENTIALS),
        ("BUSY Redis is busy running a script.", False, Verdict.REFUSED),
        ("NOSCRIPT No matching script. Please use EVAL.", False, Verdict.REFUSED),
        ("LOADING Redis is loading the dataset in memory", True, Verdict.UNAVAILABLE),
        ("MOVED 3999 127.0.0.1:6381", True, Verdict.UNAVAILABLE),
        ("TRYAGAIN Multiple keys request during rehashing of slot", True, Verdict.UNAVAILABLE),
        ("CLUSTERDOWN The cluster is down", True, Verdict.UNAVAILABLE),
        ("ERR unknown command 'EVALSHA'", False, Verdict.REFUSED),
    ],
)  # fmt: skip
def test_error_replies(text: str, retried: bool, verdict: Verdict) -> None:
    exc = reply(text)
    row = classify(exc)
    assert row is not None
    assert (row.retry, row.verdict, is_transient(exc)) == (retried, verdict, retried)
    error = store_error(exc, "redis://h:1")
    assert error.__cause__ is exc
    if verdict is Verdict.UNAVAILABLE:
        assert type(error) is StoreUnavailable
    else:
        assert isinstance(error, StoreRefused)
        assert error.server_message.startswith(text.split()[0])  # the code is put back
        assert ("refused the credentials" in str(error)) == (verdict is Verdict.CREDENTIALS)


def test_connection_errors_are_retried_then_unavailable() -> None:
    for exc in (
        rex.ConnectionError("Connection refused"),
        rex.TimeoutError("Timeout reading from socket"),
        TimeoutError(),
        ConnectionResetError(104, "reset"),
        rex.RedisClusterException("Redis Cluster cannot be connected"),
    ):
        if isinstance(exc, rex.RedisClusterException):
            exc.__cause__ = rex.ConnectionError("refused")  # no node answered
        assert is_transient(exc), exc
        error = store_error(exc, "redis://h:1")
        assert type(error) is StoreUnavailable
        assert str(error).startswith("Redis at redis://h:1 is unavailable: ")
    assert str(store_error(TimeoutError(), "x")) == "Redis at x is unavailable: TimeoutError"


def test_what_is_not_redis_or_not_the_drivers() -> None:
    garbage = rex.InvalidResponse("Protocol Error: H, HTTP/1.1 400")
    assert not is_transient(garbage)
    assert "what answers there is not Redis" in str(store_error(garbage, "x"))
    assert classify(ValueError("x")) is None and not is_transient(ValueError("x"))
    assert not is_transient(rex.RedisClusterException("no cause: a usage error"))
    assert not is_transient(rex.AuthenticationError("invalid password"))  # a ConnectionError


def test_describe_error_puts_the_code_back() -> None:
    assert describe_error(reply("OOM command not allowed")) == "OOM command not allowed"
    assert describe_error(RuntimeError()) == "RuntimeError"
