"""Start the recipes in examples/ as real processes, from the repository's root."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the repository first on the path, plus ``extra``."""
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **extra}


@dataclass
class Server:
    """One server to start: its command line (``{port}`` in it is replaced by its port), the
    path that answers once it is ready, and its environment over this one."""

    args: list[str]
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def served_together(*servers: Server) -> Iterator[list[str]]:
    """Start every server from the repository's root at once; yield their base URLs once each
    answers its ready path (20 s at most); stop them all after.

    Their stderr goes to files, shown when one does not come up.
    """
    with contextlib.ExitStack() as stack:
        started = []
        for server in servers:
            log = stack.enter_context(tempfile.TemporaryFile())
            command = [arg.replace("{port}", str(server.port)) for arg in server.args]
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=child_env(**server.env),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            stack.callback(_stop, proc)
            started.append((server, command, log))
        deadline = time.monotonic() + 20
        for server, command, log in started:
            try:
                wait_http(server.url + server.ready_path, deadline)
            except AssertionError:
                log.seek(0)
                raise AssertionError(
                    f"{command} did not come up: {log.read().decode(errors='replace')[-2000:]}"
                ) from None
        yield [server.url for server, _, _ in started]


@contextlib.contextmanager
def served(args: list[str], ready_path: str, **env: str) -> Iterator[str]:
    """One server (see `served_together`); yields its base URL."""
    with served_together(Server(args, ready_path, env)) as (url,):
        yield url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def uvicorn(app: str, *options: str) -> list[str]:
    """The command line serving the ASGI ``app`` (``module:attribute``) on ``{port}``."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--log-level",
        "warning",
        *options,
    ]
