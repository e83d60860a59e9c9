"""`strands-dedup healthcheck`, the image's health check: it follows the port a gateway was
started with, fails when that gateway is not ready, and passes for any other command."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from servers import free_port, gateway_command, process

from strands_dedup.cli import main

pytestmark = pytest.mark.timeout(60)
CLI = [sys.executable, "-m", "strands_dedup.cli", "healthcheck", "--"]


def probe_url(argv: list[str]) -> str | None:
    """The URL `healthcheck` probes for the command line ``argv`` (None: nothing to probe): it
    names it whether the probe passes, or fails as nothing listens there."""
    result = CliRunner().invoke(main, ["healthcheck", "--timeout", "0.2", "--", *argv])
    if "nothing to check" in result.stdout:
        assert result.exit_code == 0
        return None
    lines = [line for line in result.output.splitlines() if line.startswith("http")]
    assert len(lines) == 1, result.output
    return lines[0].split(": ", 1)[0]


def test_the_probe_follows_the_gateway_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRANDS_DEDUP_PORT", raising=False)
    monkeypatch.delenv("STRANDS_DEDUP_HOST", raising=False)
    base = ["/opt/strands-dedup/bin/python", "/opt/strands-dedup/bin/strands-dedup", "gateway"]
    assert probe_url([*base, "--upstream", "http://a"]) == "http://127.0.0.1:8787/readyz"
    assert probe_url([*base, "--port", "9000", "--host", "0.0.0.0"]) == (
        "http://127.0.0.1:9000/readyz"
    )
    assert probe_url([*base, "--port=9001", "--host=::"]) == "http://[::1]:9001/readyz"
    assert probe_url([*base, "--host", "10.1.2.3"]) == "http://10.1.2.3:8787/readyz"
    monkeypatch.setenv("STRANDS_DEDUP_PORT", "9100")
    assert probe_url(base) == "http://127.0.0.1:9100/readyz"
    assert probe_url([*base, "--port", "9200"]) == "http://127.0.0.1:9200/readyz"  # flag wins
    for other in (["strands-dedup", "doctor"], ["strands-dedup", "fake-agent"], ["sh"], []):
        assert probe_url(other) is None


@pytest.fixture
def gateway_port(redis_url: str, namespace: str) -> Iterator[int]:
    port = free_port()
    args = gateway_command("http://127.0.0.1:9", redis_url, namespace, port)
    with process(args, f"http://127.0.0.1:{port}/healthz"):
        yield port


@pytest.mark.redis
def test_a_ready_gateway_on_any_port_is_healthy(gateway_port: int) -> None:
    argv = ["strands-dedup", "gateway", "--upstream", "http://x", "--port", str(gateway_port)]
    ready = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=30)
    assert ready.returncode == 0, ready.stderr
    assert f":{gateway_port}/readyz: 200" in ready.stdout
    # the same command line with the default port (nothing listens there for this test)
    other = free_port()
    argv = ["strands-dedup", "gateway", "--upstream", "http://x", "--port", str(other)]
    down = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1
    assert f":{other}/readyz" in down.stderr


def test_other_commands_have_nothing_to_probe() -> None:
    done = subprocess.run(
        [*CLI, "strands-dedup", "doctor", "--redis-url", "redis://x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    assert "nothing to check" in done.stdout
