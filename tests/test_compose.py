"""docker-compose.yml: valid offline, production-shaped, with no password of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

COMPOSE = Path(__file__).parent.parent / "docker-compose.yml"


def config(**env: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("docker-compose"), "Debian's docker-compose validates the file offline"
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_is_valid_with_the_required_secrets():
    result = config(POSTGRES_PASSWORD="x", FLOWER_BASIC_AUTH="ops:x")

    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_run_without_the_secrets():
    env = {
        k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH")
    }

    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_compose_services_are_production_shaped():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]

    assert set(services) == {"postgres", "redis", "migrate", "worker", "flower"}
    assert all(
        "healthcheck" in services[name] for name in ("postgres", "redis", "worker", "flower")
    )
    assert (
        services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    )
    assert services["worker"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "noeviction" in redis_command
    assert services["flower"]["ports"] == ["127.0.0.1:${FLOWER_PORT:-5555}:5555"]
    assert "ports" not in services["worker"] and "container_name" not in services["worker"]
    assert set(spec["volumes"]) == {"postgres-data", "redis-data"}
