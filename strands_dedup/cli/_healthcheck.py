"""``strands-dedup healthcheck``: the container image's health check.

It follows whatever the container runs. When its first process is a gateway, the check asks that
gateway's ``/readyz`` on the address and port the gateway was started with (its command line and
``STRANDS_DEDUP_HOST``/``STRANDS_DEDUP_PORT``, parsed by the gateway command's own options); when
it runs any other command (``doctor``, ``fake-agent``, ...), there is nothing to probe and the
check passes. Exit codes: 0 healthy (or nothing to check), 1 unhealthy.
"""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import click

from ._commands import gateway

__all__ = ["healthcheck", "probe_url"]

_WILDCARDS = {"", "0.0.0.0", "::"}  # noqa: S104 - the addresses a gateway may listen on


def probe_url(argv: Sequence[str]) -> str | None:
    """The readiness URL of the gateway started with ``argv``, or None when it is no gateway.

    ``argv`` is a process's command line (``/proc/1/cmdline``): the arguments after ``gateway``
    are parsed as the gateway would parse them, environment variables included.
    """
    if "gateway" not in argv:
        return None
    args = list(argv[argv.index("gateway") + 1 :])
    with gateway.make_context("gateway", args, resilient_parsing=True) as ctx:
        host = str(ctx.params.get("host") or "127.0.0.1")
        port = int(ctx.params.get("port") or 8787)
    if host in _WILDCARDS:
        host = "::1" if host == "::" else "127.0.0.1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"http://{host}:{port}/readyz"


def _first_process() -> list[str]:
    try:
        raw = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


@click.command()
@click.option(
    "--timeout", default=2.0, show_default=True, type=click.FloatRange(0.1), help="Seconds."
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def healthcheck(timeout: float, argv: tuple[str, ...]) -> None:
    """Probe the gateway this container runs (its /readyz); pass when it runs anything else.

    ARGV, when given, stands for the command line to follow (default: the container's first
    process, /proc/1/cmdline).
    """
    url = probe_url(list(argv) if argv else _first_process())
    if url is None:
        click.echo("no gateway runs here: nothing to check")
        return
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http only
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        click.echo(f"{url}: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(f"{url}: {status}")
    if status != 200:
        raise SystemExit(1)
