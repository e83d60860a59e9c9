"""compose.yaml is valid Compose (checked against the Compose specification) and wires the demo
as documented: Redis, the agent service and three gateway replicas, each with a health check, all
built from the Dockerfile. The Dockerfile is read with Docker's own parser (the `dockerfile`
package): multi-stage, a pinned slim base, a non-root user, a health check on /readyz."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import compose_spec
import dockerfile
import pytest
import yaml

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def _docker_missing() -> str | None:
    """None when a Docker engine answers, else why the Docker tests skip."""
    if shutil.which("docker") is None:
        return "no docker command here"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0:
        return "no Docker engine answers here"
    return None


def _compose_missing() -> str | None:
    """None when both the engine and the compose plugin are there, else why the compose tests
    skip."""
    missing = _docker_missing()
    if missing is not None:
        return missing
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20)
    return None if plugin.returncode == 0 else "the docker compose plugin is not installed"


def _resolved() -> dict[str, object]:
    data = yaml.safe_load(COMPOSE.read_text())  # resolves the file's YAML anchors and merge keys
    # compose_spec refuses anything the Compose specification does not allow
    spec = compose_spec.PyCompose.from_json(json.dumps(data))
    spec.validate()
    resolved: dict[str, object] = spec.to_dict()
    return resolved


def _services() -> dict[str, dict[str, object]]:
    services = _resolved()["services"]
    assert isinstance(services, dict)
    return services


def test_compose_file_follows_the_specification() -> None:
    services = _services()
    started = {name for name, service in services.items() if not service.get("profiles")}
    assert started == {"redis", "agent", "gateway-1", "gateway-2", "gateway-3"}
    for name in started:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    for n in (1, 2, 3):
        gateway = services[f"gateway-{n}"]
        command = " ".join(gateway["command"])
        assert command.startswith("gateway") and "redis://redis:6379/0" in command
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    ports = {p for n in (1, 2, 3) for p in services[f"gateway-{n}"]["ports"]}
    assert len(ports) == 3


def test_the_services_run_the_image_built_here() -> None:
    services = _services()
    for name in ("agent", "gateway-1", "gateway-2", "gateway-3", "doctor"):
        service = services[name]
        assert service["build"] in (".", {"context": "."}), name
        assert service["pull_policy"] == "build", name  # never looked for in a registry
        assert "volumes" not in service, f"{name} mounts the source instead of using the image"
        assert "pip install" not in json.dumps(service.get("command")), name


def _seconds(duration: str) -> float:
    """A Compose duration such as ``2s``, ``500ms`` or ``1m30s``, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_a_service_that_fails_after_its_start_is_marked_unhealthy_soon() -> None:
    # the start is covered by start_period, so that retries stay few: with thirty retries a
    # gateway that lost Redis went on reporting healthy for over two minutes
    for name, service in _services().items():
        check = service.get("healthcheck")
        if not check:
            continue
        assert _seconds(check["start_period"]) >= 10, name
        failing = (_seconds(check["interval"]) + _seconds(check["timeout"])) * check["retries"]
        assert failing <= 20, f"{name}: unhealthy only after {failing:.0f} s of failures"


def test_durations_are_read_as_compose_reads_them() -> None:
    assert _seconds("2s") == 2 and _seconds("500ms") == 0.5 and _seconds("1m30s") == 90
    with pytest.raises(AssertionError):
        _seconds("2 seconds")


def test_redis_never_evicts_and_persists() -> None:
    redis = _services()["redis"]
    command = redis["command"]
    assert isinstance(command, list)
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] in ("everysec", "always")
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", str(redis["image"]))  # a pinned version
    assert redis["volumes"], "the append-only file must outlive the container"
    text = COMPOSE.read_text()
    assert "noeviction:" in text and "appendonly" in text  # the reasons are stated in comments


def test_the_documented_curl_lines_are_in_the_header() -> None:
    header = [line for line in COMPOSE.read_text().splitlines() if line.startswith("#")]
    assert any("docker compose up -d --wait" in line for line in header)
    assert sum("curl" in line for line in header) >= 3


def test_a_broken_file_is_refused() -> None:
    with pytest.raises(ValueError, match="condition"):
        compose_spec.PyCompose.from_yaml(
            "services:\n  a:\n    image: x\n    depends_on:\n      b:\n        condition: bogus\n"
        )


def _instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def test_the_dockerfile_is_multi_stage_on_a_pinned_slim_base() -> None:
    commands = _instructions()
    args = dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])
    stages = [c.value for c in commands if c.cmd == "FROM"]
    assert len(stages) >= 2
    for stage in stages:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage[0])
        # a full version (not a moving tag like 3.11 or latest), slim, optionally by digest
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    assert next(s[2] for s in stages if len(s) == 3) == "build"
    build_runs = " ".join(c.value[0] for c in commands if c.cmd == "RUN")
    assert "pip wheel" in build_runs and "[http]" in build_runs
    # the runtime environment has no pip or setuptools of its own
    assert "venv --without-pip" in build_runs and "pip --python /opt/strands-dedup" in build_runs
    copies = [c for c in commands if c.cmd == "COPY" and "--from=build" in c.flags]
    assert copies, "the runtime stage takes only what the build stage made"


def test_the_image_runs_as_a_non_root_user_with_a_health_check() -> None:
    commands = _instructions()
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    runtime = commands[last_from:]
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (check,) = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    # the CLI's own check: it follows the gateway's port, and passes for any other command
    assert check.value[:3] == ("CMD", "strands-dedup", "healthcheck")
    groups = " ".join(c.value[0] for c in runtime if c.cmd == "RUN")
    assert "groupadd --system --gid 10001" in groups and "--gid 10001" in groups.split("useradd")[1]
    assert users[-1] == "10001:10001"
    env = " ".join(" ".join(c.value) for c in runtime if c.cmd == "ENV")
    assert "STRANDS_DEDUP_PORT" in env
    (entrypoint,) = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json and entrypoint.value == ("strands-dedup",)


def test_the_build_context_is_only_what_the_image_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines
    assert {"!pyproject.toml", "!README.md", "!strands_dedup/"} <= set(lines)


def test_docker_compose_accepts_it() -> None:
    missing = _compose_missing()
    if missing is not None:
        pytest.skip(f"{missing}; the specification and Dockerfile checks above ran")
    subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], check=True)


@pytest.mark.timeout(900)
def test_the_image_builds_and_runs_the_cli() -> None:
    missing = _docker_missing()
    if missing is not None:
        pytest.skip(f"{missing}; the Dockerfile checks above ran")
    subprocess.run(["docker", "build", "-t", "strands-dedup:test", str(ROOT)], check=True)
    version = subprocess.run(
        ["docker", "run", "--rm", "strands-dedup:test", "--version"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert version.stdout.startswith("strands-dedup")
    user = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", "strands-dedup:test", "-u"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert user.stdout.strip() != "0"
    group = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", "strands-dedup:test", "-gn"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert group.stdout.strip() == "strands-dedup"  # the group has an entry
    tools = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "ls",
            "strands-dedup:test",
            "/opt/strands-dedup/bin",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "pip" not in tools.stdout.split()
    idle = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--read-only",
            "--cap-drop",
            "ALL",
            "strands-dedup:test",
            "healthcheck",
        ],
        capture_output=True,
        text=True,
    )
    assert idle.returncode == 0, idle.stderr  # no gateway runs: nothing to probe
