"""examples/compose-agent: its compose file follows the Compose specification and wires two
agent replicas to one Redis and one session store; its service runs as two real processes on a
real Redis (one model run per key, a session's turns one at a time over the shared history);
with Docker and its compose plugin, the compose file itself is brought up."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import compose_spec
import dockerfile
import httpx
import pytest
import yaml
from recipes import EXAMPLES, Server, served_together

pytestmark = pytest.mark.timeout(60)
HERE = EXAMPLES / "compose-agent"
COMPOSE = HERE / "compose.yaml"
AGENTS = ("agent-1", "agent-2")


def _services() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(COMPOSE.read_text())  # resolves the file's anchors and merge keys
    spec = compose_spec.PyCompose.from_json(json.dumps(data))
    spec.validate()  # refuses anything the Compose specification does not allow
    services: dict[str, dict[str, Any]] = spec.to_dict()["services"]
    return services


def test_the_compose_file_runs_two_replicas_on_one_redis_and_one_session_store() -> None:
    services = _services()
    assert set(services) == {"redis", *AGENTS}
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no health check"
    for name in AGENTS:
        agent = services[name]
        assert agent["build"] == {
            "context": "../..",
            "dockerfile": "examples/compose-agent/Dockerfile",
        }
        assert agent["pull_policy"] == "build"
        assert agent["environment"]["STRANDS_DEDUP_REDIS_URL"] == "redis://redis:6379/0"
        assert agent["depends_on"]["redis"]["condition"] == "service_healthy"
        assert agent["volumes"] == [f"sessions:{agent['environment']['AGENT_SESSIONS']}"]
        assert "/healthz" in " ".join(agent["healthcheck"]["test"])
    assert len({services[name]["ports"][0] for name in AGENTS}) == 2
    options = services["redis"]["command"]
    assert options[options.index("--maxmemory-policy") + 1] == "noeviction"
    assert options[options.index("--appendonly") + 1] == "yes"
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", services["redis"]["image"])


def test_the_image_holds_the_service_and_runs_it_unprivileged() -> None:
    commands = list(dockerfile.parse_file(str(HERE / "Dockerfile")))
    copies = [c.value for c in commands if c.cmd == "COPY"]
    assert ("examples/compose-agent/service.py", "/app/service.py") in copies
    installs = " ".join(c.value[0] for c in commands if c.cmd == "RUN")
    assert '".[strands,http]"' in installs and "fastapi" in installs
    users = [c.value[0] for c in commands if c.cmd == "USER"]
    assert users == ["10001:10001"]
    (cmd,) = [c for c in commands if c.cmd == "CMD"]
    assert cmd.value == ("python", "service.py")
    # the build context is the repository: its own ignore file keeps the rest out
    ignored = (HERE / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignored and "!examples/compose-agent/service.py" in ignored


@pytest.fixture
def replicas(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[list[str]]:
    env = {
        "STRANDS_DEDUP_REDIS_URL": redis_url,
        "STRANDS_DEDUP_NAMESPACE": namespace,
        "AGENT_SESSIONS": str(tmp_path / "sessions"),
        "MODEL_DELAY": "0.3",
    }
    command = [sys.executable, str(HERE / "service.py")]
    servers = [Server(command, "/healthz", {**env, "REPLICA": f"r{n}"}) for n in (1, 2)]
    for server in servers:
        server.env["PORT"] = str(server.port)
    with served_together(*servers) as urls:
        yield urls


@pytest.mark.redis
async def test_two_replicas_run_a_turn_once_and_share_the_history(replicas: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:

        async def say(url: str, text: str, key: str | None = None) -> str:
            headers = {"Idempotency-Key": key} if key else {}
            response = await client.post(
                f"{url}/sessions/s-1/messages", json={"text": text}, headers=headers
            )
            assert response.status_code == 200, response.text
            reply: str = response.json()["reply"]
            return reply

        first, duplicate = await asyncio.gather(
            say(replicas[0], "hello", "m-1"), say(replicas[1], "hello", "m-1")
        )
        assert first == duplicate and first.startswith("1 messages so far; you said 'hello'")
        # two different turns of the session at once, one on each replica: one after the other
        turns = await asyncio.gather(say(replicas[0], "one", "m-2"), say(replicas[1], "two", "m-3"))
        assert sorted(int(t.split()[0]) for t in turns) == [3, 5]
        last = await say(replicas[1], "three", "m-4")
        assert last.startswith("7 messages so far")


def _compose_missing() -> str | None:
    """None when a Docker engine and its compose plugin answer, else why the test skips."""
    if shutil.which("docker") is None:
        return "no docker command here"
    for check, missing in (
        (["docker", "info"], "no Docker engine answers here"),
        (["docker", "compose", "version"], "the docker compose plugin is not installed"),
    ):
        if subprocess.run(check, capture_output=True, timeout=20).returncode != 0:
            return missing
    return None


@pytest.mark.timeout(900)
def test_docker_compose_brings_the_replicas_up() -> None:
    missing = _compose_missing()
    if missing is not None:
        pytest.skip(f"{missing}; the compose file and the service were checked above")
    compose = ["docker", "compose", "-f", str(COMPOSE), "-p", "strands-dedup-recipe"]
    subprocess.run([*compose, "up", "-d", "--wait", "--build"], check=True)
    try:
        body = {"text": "hello"}
        headers = {"Idempotency-Key": "m-1"}
        replies = [
            httpx.post(
                f"http://127.0.0.1:{port}/sessions/s-1/messages",
                json=body,
                headers=headers,
                timeout=30,
            ).json()
            for port in (8001, 8002)
        ]
        assert replies[0]["reply"] == replies[1]["reply"]
        assert {r["answered_by"].split(":")[0] for r in replies} == set(AGENTS)
    finally:
        subprocess.run([*compose, "down", "-v"], check=False)
