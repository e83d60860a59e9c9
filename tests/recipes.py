"""Start the recipes in examples/ as real processes, from the repository's root."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from servers import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the repository first on the path, plus ``extra``."""
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **extra}


@contextlib.contextmanager
def served(
    args: list[str], ready_path: str, *, port: int | None = None, **env: str
) -> Iterator[str]:
    """Run ``args`` (``{port}`` in them is replaced by a free port) from the repository's root
    until the block ends; yield its base URL once ``ready_path`` answers (20 s at most).

    Its stderr goes to a file, shown when it does not come up.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [arg.replace("{port}", str(port)) for arg in args]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=child_env(**env), stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            try:
                wait_http(url + ready_path, time.monotonic() + 20)
            except AssertionError:
                log.seek(0)
                raise AssertionError(
                    f"{command} did not come up: {log.read().decode(errors='replace')[-2000:]}"
                ) from None
            yield url
        finally:
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
