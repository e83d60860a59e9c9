"""compose.yaml is valid Compose (checked against the Compose specification) and wires the demo
as documented: Redis, the agent service and three gateway replicas, each with a health check."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import compose_spec
import pytest
import yaml

pytestmark = pytest.mark.timeout(30)
COMPOSE = Path(__file__).parents[1] / "compose.yaml"


def _resolved() -> dict[str, object]:
    data = yaml.safe_load(COMPOSE.read_text())  # resolves the file's YAML anchors and merge keys
    # compose_spec refuses anything the Compose specification does not allow
    spec = compose_spec.PyCompose.from_json(json.dumps(data))
    spec.validate()
    resolved: dict[str, object] = spec.to_dict()
    return resolved


def test_compose_file_follows_the_specification() -> None:
    services = _resolved()["services"]
    assert isinstance(services, dict)
    assert set(services) == {"redis", "agent", "gateway-1", "gateway-2", "gateway-3"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    for n in (1, 2, 3):
        gateway = services[f"gateway-{n}"]
        command = " ".join(gateway["command"])
        assert "strands-dedup gateway" in command and "redis://redis:6379/0" in command
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    ports = {p for n in (1, 2, 3) for p in services[f"gateway-{n}"]["ports"]}
    assert len(ports) == 3


def test_a_broken_file_is_refused() -> None:
    with pytest.raises(ValueError, match="condition"):
        compose_spec.PyCompose.from_yaml(
            "services:\n  a:\n    image: x\n    depends_on:\n      b:\n        condition: bogus\n"
        )


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose plugin is not installed here; the specification check above ran",
)
def test_docker_compose_accepts_it() -> None:
    subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], check=True)
