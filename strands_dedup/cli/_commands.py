"""The ``strands-dedup`` command line: a demo, and the operator's view of what is in flight.

The operator commands (``ls``, ``show``, ``watch``, ``release``, ``forget``, ``stats``) read, or on
request repair, one namespace of one Redis through `strands_dedup.admin.Inspector`. Read commands
take ``--json`` and then print one JSON document whose field names are the views' ``to_json()``
keys. ``doctor`` checks that a Redis gives what the guarantees need. Exit codes: 0 ok; 1 not
found (or a declined confirmation; for ``doctor``, a warning); 2 usage or invalid input; 3 Redis
unreachable, refused the credentials or failed the command. Errors are one line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import click
import redis.exceptions
from click.core import ParameterSource
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .._config import DedupConfig
from .._engine.observe import EVENTS
from .._errors import DedupError, StoreUnavailable
from .._keys import validate_namespace
from .._store.connect import describe_url
from .._store.redis import describe_error
from .._version import __version__
from ._admin import Inspector, LeaseView, ResultView, SessionView, StatsView, dumps

__all__ = ["main"]

REDIS_URL_ENV = "STRANDS_DEDUP_REDIS_URL"
IDENTITY_SECRET_ENV = "STRANDS_DEDUP_IDENTITY_SECRET"  # noqa: S105 - a variable name
IDENTITY_SECRET_FILE_ENV = "STRANDS_DEDUP_IDENTITY_SECRET_FILE"  # noqa: S105 - a variable name
NAMESPACE_ENV = "STRANDS_DEDUP_NAMESPACE"
HOST_ENV = "STRANDS_DEDUP_HOST"
PORT_ENV = "STRANDS_DEDUP_PORT"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "strands-dedup"

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

RATE_EVENTS = ("claims", "replays", "takeovers")
"""Counters whose rates `watch` puts first."""
KNOWN_EVENTS = (*RATE_EVENTS, *(event for event in EVENTS if event not in RATE_EVENTS))
"""Counters shown (as 0 while no process has published them) by `watch` and `stats`."""

PIPE_WIDTH = 1000
"""Line width for tables written to a pipe or file: wide enough that no token is cut."""

_URL_KEY = "strands_dedup.redis_url"
_NAMESPACE_KEY = "strands_dedup.namespace"

T = TypeVar("T")
FC = TypeVar("FC", bound=Callable[..., Any])


# -- errors: handled here, for every command -------------------------------------------------


class Failure(click.ClickException):
    """Invalid input: shown as one line on stderr (``Error: ...``), exit 2."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()) or "unknown error")


class NotFound(Failure):
    """Nothing to show, release or forget: exit 1."""

    exit_code = EXIT_NOT_FOUND


class Unreachable(Failure):
    """Redis could not be reached, refused the credentials or failed the command: exit 3."""

    exit_code = EXIT_UNREACHABLE


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "option"
        parts.append(f"invalid {field}: {str(error['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


class _Cli(click.Group):
    """The command group: turns the library's errors into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreUnavailable as exc:
            raise Unreachable(str(exc)) from None
        except redis.exceptions.RedisError as exc:
            raise Unreachable(f"Redis failed the command: {describe_error(exc)}") from None
        except ValidationError as exc:
            raise Failure(_validation_message(exc)) from None
        except (DedupError, ValueError) as exc:
            raise Failure(describe_error(exc)) from None


# -- where to connect: options accepted before the command and on each command ----------------


def _remember(key: str) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            ctx.meta[key] = value  # meta is shared by the group's and the command's contexts
        return value

    return callback


def _target_options(*, on_group: bool) -> Callable[[FC], FC]:
    """``--redis-url`` and ``--namespace``; the group's also read the environment.

    A value given on the command overrides one given before it, which overrides the variable.
    """

    def decorate(func: FC) -> FC:
        func = click.option(
            "--namespace",
            envvar=NAMESPACE_ENV if on_group else None,
            callback=_remember(_NAMESPACE_KEY),
            expose_value=False,
            metavar="NAME",
            help=f"Namespace (key prefix) of the deduplicators to inspect "
            f"[env {NAMESPACE_ENV}; default {DEFAULT_NAMESPACE}].",
        )(func)
        func = click.option(
            "--redis-url",
            envvar=REDIS_URL_ENV if on_group else None,
            callback=_remember(_URL_KEY),
            expose_value=False,
            metavar="URL",
            help=f"Redis the deduplicators share [env {REDIS_URL_ENV}; "
            f"default {DEFAULT_REDIS_URL}].",
        )(func)
        return func

    return decorate


def _target() -> tuple[str, str]:
    """The Redis URL and namespace the current command works on (validated)."""
    meta = click.get_current_context().meta
    url: str = meta.get(_URL_KEY, DEFAULT_REDIS_URL)
    namespace: str = meta.get(_NAMESPACE_KEY, DEFAULT_NAMESPACE)
    if url.split("://", 1)[0].lower() == "memory":
        raise Failure(
            "memory:// is private to the process that opens it; give --redis-url the Redis your "
            "deduplicators share"
        )
    return url, validate_namespace(namespace)


def _run(work: Callable[[Inspector], Awaitable[T]]) -> T:
    """Run one command's work on an `Inspector` of the target, in a fresh event loop."""
    url, namespace = _target()

    async def session() -> T:
        async with Inspector.from_url(url, namespace=namespace) as inspector:
            await inspector.check_connection()  # a dead or foreign endpoint fails fast
            return await work(inspector)

    return asyncio.run(session())


# -- rendering -------------------------------------------------------------------------------


def _console() -> Console:
    console = Console(highlight=False, markup=False, emoji=False)
    if console.is_terminal:
        return console
    return Console(highlight=False, markup=False, emoji=False, width=PIPE_WIDTH)


def _echo_json(payload: Any) -> None:
    click.echo(dumps(payload))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def _owner(view: LeaseView) -> str:
    if view.host or view.pid is not None:
        return f"{view.host or '?'}:{view.pid if view.pid is not None else '?'}"
    return view.owner or "-"


def _token_label(token: str, scope: str | None) -> str:
    return f"token {token!r}" + (f" (scope {scope!r})" if scope else "")


def _leases_table(views: list[LeaseView], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("token", overflow="fold")
    table.add_column("scope", overflow="fold")
    table.add_column("owner (host:pid)")
    table.add_column("fence", justify="right")
    table.add_column("age", justify="right")
    table.add_column("lease left", justify="right")
    table.add_column("waiting procs", justify="right")
    for view in views:
        table.add_row(
            Text(view.token),
            Text(view.scope or "-"),
            Text(_owner(view)),
            str(view.fence),
            _duration(view.age_s),
            _duration(view.ttl_s),
            str(view.listeners),
        )
    return table


def _sessions_table(views: list[SessionView], namespace: str) -> Table:
    table = Table(
        title=f"{len(views)} guarded session(s) in use in namespace {namespace}",
        title_justify="left",
    )
    table.add_column("session", overflow="fold")
    table.add_column("holders (host:pid, held for, lease left)", overflow="fold")
    table.add_column("waiting", justify="right")
    table.add_column("fence", justify="right")
    table.add_column("next seq", justify="right")
    for view in views:
        holders = ", ".join(
            f"{h.host}:{h.pid if h.pid is not None else '?'} ({_duration(h.age_s)}, "
            f"{_duration(h.ttl_s)})"
            for h in view.holders
        )
        next_seq = "-" if view.next_seq is None else str(view.next_seq)
        if view.gap_s is not None:
            next_seq += f" (missing for {_duration(view.gap_s)})"
        table.add_row(
            Text(view.session),
            Text(holders or "-"),
            str(len(view.waiting)),
            str(view.fence),
            next_seq,
        )
    return table


def _in_flight_title(views: list[LeaseView], namespace: str) -> str:
    return f"{len(views)} in flight in namespace {namespace} (oldest first)"


def _fields_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def _lease_rows(view: LeaseView) -> list[tuple[str, str]]:
    return [
        ("token", view.token),
        ("scope", view.scope or "-"),
        ("owner (host:pid)", _owner(view)),
        ("owner id", view.owner or "-"),
        ("fence", str(view.fence)),
        ("age", _duration(view.age_s)),
        ("lease left", _duration(view.ttl_s)),
        ("waiting procs", str(view.listeners)),
        ("fingerprint", view.fingerprint or "-"),
        ("key", view.key),
    ]


def _result_rows(view: ResultView) -> list[tuple[str, str]]:
    rows = [
        ("token", view.token),
        ("scope", view.scope or "-"),
        ("status", view.status),
        ("fence", str(view.fence)),
        ("size", f"{_size(view.size)} ({view.size} bytes)"),
        ("age", _duration(view.age_s)),
        ("expires in", _duration(view.ttl_s) if view.ttl_s is not None else "never"),
        ("serializer", view.serializer or "-"),
    ]
    if view.error_type or view.error_message:
        rows.append(("error", f"{view.error_type or 'error'}: {view.error_message or ''}"))
    rows.append(("key", view.key))
    return rows


def _counters_table(
    counters: dict[str, int], rates: dict[str, float] | None, *, title: str
) -> Table:
    """Totals of every known counter (0 while unpublished) and, given ``rates``, per second."""
    table = Table(title=title, title_justify="left")
    table.add_column("event")
    table.add_column("total", justify="right")
    if rates is not None:
        table.add_column("per second", justify="right")
    extra = sorted(set(counters) - set(KNOWN_EVENTS))
    for name in (*KNOWN_EVENTS, *extra):
        cells: list[RenderableType] = [Text(name), str(counters.get(name, 0))]
        if rates is not None:
            cells.append(f"{rates.get(name, 0.0):.1f}")
        table.add_row(*cells)
    return table


def event_rates(
    before: tuple[float, dict[str, int]], after: tuple[float, dict[str, int]]
) -> dict[str, float]:
    """Events per second between two counter snapshots.

    Counters are summed over live processes, so a total falls when a process exits; that reads
    as 0, not as a negative rate.
    """
    (t0, c0), (t1, c1) = before, after
    elapsed = max(t1 - t0, 1e-9)
    return {name: max(0, c1.get(name, 0) - c0.get(name, 0)) / elapsed for name in {*c0, *c1}}


# -- commands --------------------------------------------------------------------------------

scope_option = click.option(
    "--scope",
    default=None,
    metavar="SCOPE",
    help="The tenant or session scope of the token(s); '' means no scope.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document instead of a table."
)
yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="strands-dedup")
@_target_options(on_group=True)
def main() -> None:
    """Distributed idempotency and dedup for AI-agent calls, backed by Redis.

    Exit codes: 0 ok, 1 not found (doctor: a warning), 2 usage or invalid input, 3 Redis
    unreachable.
    """


@main.command()
@click.option(
    "--redis-url",
    envvar=REDIS_URL_ENV,
    default="memory://",
    show_default=True,
    help=f"Redis to use (env {REDIS_URL_ENV}); memory:// runs embedded, no server.",
)
@click.option(
    "--requests",
    default=150,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="POSTs to fire, retries included.",
)
@click.option(
    "--keys",
    default=10,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Distinct idempotency keys among the requests.",
)
@click.option(
    "--concurrency",
    default=50,
    show_default=True,
    type=click.IntRange(1, 2_000),
    help="Requests in flight at once.",
)
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Gateway processes to spread the storm over (needs a real --redis-url above 1).",
)
@click.option(
    "--work",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 60),
    help="Seconds the fake agent takes per execution.",
)
@click.option("--seed", default=None, type=int, help="Seed for the order of the requests.")
@click.pass_context
def demo(
    ctx: click.Context,
    redis_url: str,
    requests: int,
    keys: int,
    concurrency: int,
    replicas: int,
    work: float,
    seed: int | None,
) -> None:
    """Fire a retry storm through the gateway at a slow fake agent; show each key ran once."""
    parent = ctx.parent
    if (
        ctx.get_parameter_source("redis_url") is not ParameterSource.COMMANDLINE
        and parent is not None
        and parent.get_parameter_source("redis_url") is ParameterSource.COMMANDLINE
    ):
        redis_url = ctx.meta[_URL_KEY]  # given before the command: `strands-dedup --redis-url`
    try:
        from ..http._demo import run_demo
    except ImportError as exc:
        raise Failure(
            f"the demo needs the http extra ({exc}): pip install 'strands-dedup[http]'"
        ) from None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = _console()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("retry storm", total=requests)
        report = asyncio.run(
            run_demo(
                redis_url=redis_url,
                requests=requests,
                keys=keys,
                concurrency=concurrency,
                replicas=replicas,
                work=work,
                seed=seed,
                progress=lambda done, total: bar.update(task, completed=done),
            )
        )
    table = Table(
        title=f"retry storm through {replicas} gateway(s) on {describe_url(redis_url)}",
        show_header=False,
    )
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    executions = (
        f"{report.executions} ({'one per key' if report.executions == keys else 'NOT one per key'})"
    )
    rows = [
        ("requests sent", str(report.requests)),
        ("distinct keys", str(keys)),
        ("upstream executions", executions),
        ("responses replayed or waited", str(report.requests - report.executions)),
        ("  of which marked Idempotent-Replayed", str(report.replayed)),
        ("HTTP statuses", ", ".join(f"{k}: {v}" for k, v in sorted(report.statuses.items()))),
        (
            "latency p50 / p90 / p99",
            " / ".join(f"{report.percentile(q):.0f} ms" for q in (0.5, 0.9, 0.99)),
        ),
        ("wall time", f"{report.elapsed_s:.2f} s (the agent takes {work:g} s per execution)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if not report.ok:
        raise NotFound("a key ran more than once, or a request failed")


@main.command("fake-agent")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--work", default=1.0, show_default=True, type=click.FloatRange(0, 600))
def fake_agent(host: str, port: int, work: float) -> None:
    """Serve the demo's slow fake agent: POST answers after WORK s; GET /executions counts."""
    try:
        import uvicorn

        from ..http._demo import FakeAgent
    except ImportError as exc:
        raise Failure(
            f"this needs the http extra ({exc}): pip install 'strands-dedup[http]'"
        ) from None
    uvicorn.run(FakeAgent(work), host=host, port=port, log_level="warning")


@main.command("ls")
@scope_option
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Only tokens in flight for at least this long.",
)
@click.option(
    "--sessions",
    "sessions",
    is_flag=True,
    help="List guarded sessions (SessionGuard): holders and queue depth.",
)
@json_option
@_target_options(on_group=False)
def ls_command(scope: str | None, older_than: float | None, sessions: bool, as_json: bool) -> None:
    """List the tokens in flight, oldest first (or, with --sessions, the guarded sessions).

    Columns: the token and its scope; the owner (host:pid of the process running the call);
    the fence (how many times the token was claimed); how long it has been in flight; how long
    its lease lives unless renewed; and "waiting procs": how many processes listen for its
    result, each hosting one or more waiting duplicate calls (processes, not calls).

    With --sessions: each session with holders or waiters, the longest queue first: its
    holders (host:pid, for how long), how many callers wait, the fence (admissions so far) and,
    when callers pass sequence numbers, the next number due and how long a missing one has been
    waited for.
    """
    if sessions:
        if scope is not None or older_than is not None:
            raise click.UsageError("--sessions cannot be combined with --scope or --older-than")
        found = _run(lambda inspector: inspector.sessions())
        if as_json:
            _echo_json([view.to_json() for view in found])
        elif not found:
            click.echo(f"no guarded session is held or waited for in namespace {_target()[1]}")
        else:
            _console().print(_sessions_table(found, _target()[1]))
        return
    views = _run(lambda inspector: inspector.leases(scope, older_than))
    if as_json:
        _echo_json([view.to_json() for view in views])
    elif not views:
        where = f" in scope {scope!r}" if scope is not None else ""
        click.echo(f"nothing in flight in namespace {_target()[1]}{where}")
    else:
        _console().print(_leases_table(views, _in_flight_title(views, _target()[1])))


@main.command()
@click.argument("token")
@scope_option
@click.option("--show-value", is_flag=True, help="Also print the stored value (it may be large).")
@json_option
@_target_options(on_group=False)
def show(token: str, scope: str | None, show_value: bool, as_json: bool) -> None:
    """Show TOKEN's lease (if in flight) and its stored result's metadata.

    The stored value is printed only with --show-value. Exits 1 when the token has neither.
    """

    async def read(inspector: Inspector) -> tuple[LeaseView | None, ResultView | None]:
        lease = await inspector.lease(token, scope)
        return lease, await inspector.result(token, scope, with_value=show_value)

    lease, result = _run(read)
    if as_json:
        _echo_json(
            {
                "lease": lease.to_json() if lease is not None else None,
                "result": result.to_json() if result is not None else None,
            }
        )
    else:
        console = _console()
        if lease is not None:
            console.print(_fields_table("lease (in flight)", _lease_rows(lease)))
        if result is not None:
            console.print(_fields_table("stored result", _result_rows(result)))
            if result.value is not None:
                click.echo("value:")
                click.echo(result.value)
    if lease is None and result is None:
        raise NotFound(f"nothing is in flight or stored for {_token_label(token, scope)}")


@main.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between refreshes.",
)
@scope_option
@click.option("--iterations", type=click.IntRange(min=1), default=None, hidden=True)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document a line per refresh (the tokens in flight, the counters, "
    "their rates and the seconds they are over) instead of the live view.",
)
@_target_options(on_group=False)
def watch(interval: float, scope: str | None, iterations: int | None, as_json: bool) -> None:
    """Live view of the tokens in flight (as `ls`) and of event rates; Ctrl-C quits.

    Rates per second (claims, replays, takeovers, ...) are computed from the counters the
    deduplicators of the namespace publish; they show 0 while none are published.
    """
    url, namespace = _target()
    where = describe_url(url)

    async def lines(inspector: Inspector) -> None:
        previous: tuple[float, dict[str, int]] | None = None
        done = 0
        while True:
            sample = (time.monotonic(), await inspector.counters())
            views = await inspector.leases(scope)
            line = {
                "in_flight": [view.to_json() for view in views],
                "counters": {**dict.fromkeys(KNOWN_EVENTS, 0), **sample[1]},
                "rates": event_rates(previous, sample) if previous is not None else None,
                "elapsed_s": sample[0] - previous[0] if previous is not None else None,
            }
            previous = sample
            _echo_json(line)  # click.echo flushes: a reader gets each line as it is made
            done += 1
            if iterations is not None and done >= iterations:
                return
            await asyncio.sleep(interval)

    async def refresh(inspector: Inspector) -> None:
        if as_json:
            await lines(inspector)
            return
        previous: tuple[float, dict[str, int]] | None = None
        done = 0
        console = _console()
        try:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    sample = (time.monotonic(), await inspector.counters())
                    views = await inspector.leases(scope)
                    rates = event_rates(previous, sample) if previous is not None else None
                    previous = sample
                    header = (
                        f"{where} · namespace {namespace} · every {interval:g}s · "
                        f"{datetime.now():%H:%M:%S} · Ctrl-C quits"
                    )
                    frame = Group(
                        Text(header),
                        _leases_table(views, _in_flight_title(views, namespace)),
                        _counters_table(sample[1], rates, title="events (all live processes)"),
                    )
                    live.update(frame, refresh=True)
                    done += 1
                    if iterations is not None and done >= iterations:
                        return
                    await asyncio.sleep(interval)
        finally:
            if not console.is_terminal:
                console.line()  # off a terminal, the last frame ends without a newline

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        _run(refresh)


@main.command()
@click.argument("token")
@scope_option
@yes_option
@_target_options(on_group=False)
def release(token: str, scope: str | None, yes: bool) -> None:
    """Force-release TOKEN's lease, so that one of its waiting duplicates takes over.

    For a token whose primary is stuck or gone. The taking-over call runs with a higher fence,
    so a released primary that is still alive cannot store its result; if no duplicate claims
    the token before that primary renews its lease, the primary keeps it. Exits 1 when no lease
    was held.
    """
    url, namespace = _target()
    if not yes:
        click.confirm(
            f"Release the lease on {_token_label(token, scope)} in namespace {namespace} at "
            f"{describe_url(url)}? A waiting duplicate, if any, takes over and runs the call",
            abort=True,
        )
    view = _run(lambda inspector: inspector.release(token, scope))
    if view is None:
        raise NotFound(f"no lease is held on {_token_label(token, scope)}")
    click.echo(
        f"released {_token_label(token, scope)}: held by {_owner(view)}, fence {view.fence}, "
        f"in flight {_duration(view.age_s)}; {view.listeners} waiting procs notified"
    )


@main.command()
@click.argument("token")
@scope_option
@yes_option
@_target_options(on_group=False)
def forget(token: str, scope: str | None, yes: bool) -> None:
    """Delete TOKEN's stored result, so that its next call runs again.

    Exits 1 when no result was stored.
    """
    url, namespace = _target()
    if not yes:
        click.confirm(
            f"Delete the stored result of {_token_label(token, scope)} in namespace {namespace} "
            f"at {describe_url(url)}? Its next call will run again",
            abort=True,
        )
    if not _run(lambda inspector: inspector.forget(token, scope)):
        raise NotFound(f"no result is stored for {_token_label(token, scope)}")
    click.echo(f"forgot the stored result of {_token_label(token, scope)}")


@main.command()
@json_option
@_target_options(on_group=False)
def stats(as_json: bool) -> None:
    """Counts and memory of the tokens in flight and the stored results.

    Also the event counters (claims, replays, takeovers, ...) of the namespace's live processes.
    """
    view: StatsView = _run(lambda inspector: inspector.stats())
    if as_json:
        _echo_json(view.to_json())
        return
    rows = [
        ("in flight", str(view.in_flight)),
        ("stored results", str(view.results)),
        ("lease memory", _size(view.lease_bytes)),
        ("result memory", _size(view.result_bytes)),
        ("maxmemory-policy", view.eviction_policy),
    ]
    parts: list[RenderableType] = [
        _fields_table(f"namespace {view.namespace}", rows),
        _counters_table(view.counters, None, title="events (all live processes)"),
    ]
    _console().print(Group(*parts))
    for warning in view.warnings:
        click.echo(f"Warning: {warning}", err=True)


@main.command()
@json_option
@_target_options(on_group=False)
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check that a Redis gives what the guarantees need, and how to fix what it does not.

    Checks the server version and the features used, maxmemory-policy (nothing may be
    evicted), persistence, replicas, cluster state, round-trip latency, clock skew and the ACL
    permissions the scripts need; and whether this environment gives a gateway an identity
    secret (STRANDS_DEDUP_IDENTITY_SECRET or _FILE). Exits 0 when all is well, 1 on a warning
    or a failure, 3 when Redis cannot be reached.
    """
    from . import _doctor as checks

    url, namespace = _target()
    try:
        facts = asyncio.run(checks.read_facts(url, namespace))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError) as exc:
        raise Unreachable(
            f"cannot reach Redis at {describe_url(url)}: {describe_error(exc)}"
        ) from None
    findings = [*checks.diagnose(facts), checks.check_identity_secret(os.environ)]
    if as_json:
        _echo_json(checks.to_json(facts, findings))
    else:
        table = Table(title=f"doctor: {facts.target}", title_justify="left")
        table.add_column("level")
        table.add_column("check")
        table.add_column("finding", overflow="fold")
        for finding in findings:
            text = finding.summary + (f"\nfix: {finding.fix}" if finding.fix else "")
            table.add_row(finding.level.value, finding.check, Text(text))
        _console().print(table)
    ctx.exit(checks.exit_status(findings))


@main.command()
@click.option("--upstream", required=True, metavar="URL", help="The agent service to protect.")
@click.option(
    "--redis-url",
    envvar=REDIS_URL_ENV,
    default="memory://",
    show_default=True,
    help=f"Redis shared by the replicas [env {REDIS_URL_ENV}]; memory:// serves one process.",
)
@click.option("--namespace", default=DEFAULT_NAMESPACE, show_default=True, help="Key prefix.")
@click.option(
    "--host",
    envvar=HOST_ENV,
    default="127.0.0.1",
    show_default=True,
    help=f"Address to listen on [env {HOST_ENV}].",
)
@click.option(
    "--port",
    envvar=PORT_ENV,
    default=8787,
    show_default=True,
    type=click.IntRange(0, 65535),
    help=f"[env {PORT_ENV}]",
)
@click.option(
    "--lease-ttl",
    default=DedupConfig.model_fields["lease_ttl"].default,
    show_default=True,
    type=click.FloatRange(0.05),
)
@click.option(
    "--result-ttl",
    default=DedupConfig.model_fields["result_ttl"].default,
    show_default=True,
    type=click.FloatRange(0.001),
)
@click.option("--scope-header", default=None, metavar="NAME", help="Header naming the tenant.")
@click.option(
    "--identity-header",
    "identity_headers",
    multiple=True,
    metavar="NAME",
    help="A header holding callers' credentials (repeat; replaces the default "
    "Authorization, X-Api-Key). Keys are scoped by a digest of these.",
)
@click.option(
    "--identity-secret",
    envvar=IDENTITY_SECRET_ENV,
    default=None,
    metavar="SECRET",
    help=f"HMAC key of the credentials' digest [env {IDENTITY_SECRET_ENV}]; on the command "
    "line it is visible to every local user, prefer the file or the variable.",
)
@click.option(
    "--identity-secret-file",
    envvar=IDENTITY_SECRET_FILE_ENV,
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help=f"A file holding the HMAC key (its surrounding whitespace ignored) "
    f"[env {IDENTITY_SECRET_FILE_ENV}].",
)
@click.option(
    "--share-keys-across-identities",
    is_flag=True,
    help="Unsafe: any caller may replay any other caller's response for the same key.",
)
@click.option("--replay-set-cookie", is_flag=True, help="Store and replay Set-Cookie headers.")
@click.option("--require-key", is_flag=True, help="Refuse POST/PATCH without Idempotency-Key.")
@click.option(
    "--on-duplicate",
    type=click.Choice(["wait", "reject"]),
    default=None,
    help="A concurrent duplicate waits for the response (default), or gets 409 with Retry-After.",
)
@click.option(
    "--max-body",
    default=None,
    help="Largest request body accepted, any request (e.g. 512KiB, 10MB; default 10MiB).",
)
@click.option(
    "--max-stored-body",
    default=None,
    help="Largest response body retained for retries (default 1MiB); larger ones still reach "
    "their client whole.",
)
@click.option("--upstream-timeout", default=None, type=click.FloatRange(0.1), help="Default 60 s.")
@click.option(
    "--trusted-proxies",
    default=None,
    metavar="ADDRS",
    help="Comma-separated addresses or networks of the proxies in front of the gateway: only "
    "their X-Forwarded-For/-Proto are believed (default: none, the connection's own).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="Least level logged to stderr (the library's and the server's).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text, or one JSON object a line.",
)
@click.option(
    "--shutdown-timeout",
    default=None,
    type=click.FloatRange(1),
    help="On SIGTERM, how long requests in flight may finish before their tokens are released "
    "(default 30 s).",
)
@click.option(
    "--max-upstream-connections",
    default=None,
    type=click.IntRange(1),
    help="Pooled connections to the upstream (default 100).",
)
@click.option(
    "--send-timeout",
    default=None,
    type=click.FloatRange(0.1),
    help="Seconds a client may take no response bytes before it is cut off (default 10 s).",
)
@click.option(
    "--body-timeout",
    default=None,
    type=click.FloatRange(0.1),
    help="Seconds a request body may take to arrive; then 408 (default 30 s).",
)
@click.option(
    "--max-new-keys",
    default=None,
    type=click.IntRange(0),
    help="New Idempotency-Keys per identity per --new-keys-window, fleet-wide; then 429 "
    "(default 6000; 0: no limit).",
)
@click.option(
    "--new-keys-window",
    default=None,
    type=click.FloatRange(1),
    help="The window of --max-new-keys, seconds (default 60).",
)
@click.option(
    "--max-stored-bytes",
    default=None,
    help="Bytes of responses one identity may keep stored, fleet-wide; then 429 "
    "(default 64MiB; 0: no limit).",
)
def gateway(
    upstream: str,
    redis_url: str,
    namespace: str,
    host: str,
    port: int,
    lease_ttl: float,
    result_ttl: float,
    **options: Any,
) -> None:
    """Serve a retry-safe reverse proxy in front of an HTTP agent service.

    Requests with an Idempotency-Key run once across every replica sharing the Redis; duplicates
    from the same caller get the first response. GET /healthz, /readyz and /metrics are the
    gateway's own. See the README's Security section for what is scoped and bounded how.
    """
    from ..http._gateway import (
        GatewayConfig,
        configure_logging,
        parse_size,
        parse_trusted_proxies,
        run_gateway,
    )
    from ..http._policy import storable_body

    log_level, log_format = options.pop("log_level"), options.pop("log_format")
    trusted: list[str] = []
    if options["trusted_proxies"] is not None:
        try:
            trusted = parse_trusted_proxies(options["trusted_proxies"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--trusted-proxies") from None
    del options["trusted_proxies"]
    notes = _identity_secret(options)
    for name in ("max_body", "max_stored_body"):
        if options[name] is not None:
            try:
                options[name] = parse_size(options[name])
            except ValueError as exc:
                hint = "--" + name.replace("_", "-")
                raise click.BadParameter(str(exc), param_hint=hint) from None
    if options["max_stored_bytes"] not in (None, "0"):
        try:
            options["max_stored_bytes"] = parse_size(options["max_stored_bytes"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-stored-bytes") from None
    options["max_request_body"] = options.pop("max_body")
    if not options["identity_headers"]:
        del options["identity_headers"]
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    try:
        config = GatewayConfig(upstream=upstream, **given)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(errors) from None
    bound = DedupConfig.model_fields["max_result_bytes"].default
    if config.max_stored_body > storable_body(bound):
        raise click.BadParameter(
            f"{config.max_stored_body} bytes is more than the store can hold: at most "
            f"{storable_body(bound)} (a response is stored as base64 in JSON, with its headers, "
            f"within the {bound}-byte result bound)",
            param_hint="--max-stored-body",
        )
    configure_logging(log_level, log_format)
    for note in notes:
        logging.getLogger("strands_dedup.cli").warning("%s", note)
    try:
        dedup_config = DedupConfig.model_validate(
            {"namespace": namespace, "lease_ttl": lease_ttl, "result_ttl": result_ttl}
        )
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(errors) from None
    run_gateway(
        config,
        dedup_config,
        redis_url=redis_url,
        host=host,
        port=port,
        log_level=log_level,
        log_format=None,
        trusted_proxies=trusted,
    )


def _identity_secret(options: dict[str, Any]) -> list[str]:
    """Read ``--identity-secret-file`` into ``identity_secret``; what to warn the operator of."""
    path = options.pop("identity_secret_file")
    source = click.get_current_context().get_parameter_source("identity_secret")
    if path is not None:
        if options["identity_secret"] is not None:
            raise click.UsageError("give --identity-secret-file or --identity-secret, not both")
        try:
            with open(path, encoding="utf-8") as file:
                secret = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(
                f"cannot read {path}: {exc}", param_hint="--identity-secret-file"
            ) from None
        if not secret:
            raise click.BadParameter(f"{path} is empty", param_hint="--identity-secret-file")
        options["identity_secret"] = secret
    elif options["identity_secret"] == "":
        raise click.BadParameter("the identity secret is empty", param_hint="--identity-secret")
    elif options["identity_secret"] is not None and source == ParameterSource.COMMANDLINE:
        return [
            "the identity secret was given on the command line, where every local user can read "
            f"it (ps); use --identity-secret-file or {IDENTITY_SECRET_ENV}"
        ]
    return []
