"""No Docker engine runs here, so the Dockerfile and compose file are linted and checked
against the code: hadolint, the compose-spec schema, and the names they share with it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENV_NAMES = {f.alias for f in Settings.model_fields.values() if f.alias}


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: `make install` puts it in the venv")
    return str(found)


def test_hadolint_is_clean() -> None:
    run = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_matches_the_compose_spec() -> None:
    run = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_env_names_are_the_settings_contract() -> None:
    dockerfile_env = set(
        re.findall(r"\b(GATEWAY_[A-Z_]+|FAL_KEY|REPLICATE_API_TOKEN|REDIS_URL)=", DOCKERFILE)
    )
    compose_env = set(COMPOSE["services"]["gateway"]["environment"])
    assert dockerfile_env and compose_env
    assert dockerfile_env <= ENV_NAMES, dockerfile_env - ENV_NAMES
    assert compose_env <= ENV_NAMES, compose_env - ENV_NAMES


def test_ports_healthcheck_user_and_entrypoint_agree() -> None:
    exposed = re.search(r"^EXPOSE (\d+)$", DOCKERFILE, re.M)
    port = re.search(r"GATEWAY_PORT=(\d+)", DOCKERFILE)
    assert exposed and port and exposed[1] == port[1]
    published = COMPOSE["services"]["gateway"]["ports"][0].split(":")[-1]
    assert published == exposed[1]
    assert "/healthz" in DOCKERFILE.split("HEALTHCHECK", 1)[1].split("\n")[1]
    assert "/healthz" in str(COMPOSE["services"]["gateway"]["healthcheck"]["test"])
    user = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert 'CMD ["python", "-m", "gateway"]' in DOCKERFILE
    assert (ROOT / "gateway" / "__main__.py").exists()
    config = re.search(r"GATEWAY_CONFIG=/app/(\S+)", DOCKERFILE)
    assert config and (ROOT / config[1]).exists()


def test_copied_paths_exist() -> None:
    for source in re.findall(r"^COPY (?!--from)(\S+(?: \S+)*) \S+$", DOCKERFILE, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path


def test_compose_redis_is_what_the_gateway_is_pointed_at() -> None:
    services = COMPOSE["services"]
    assert "redis" in services
    assert services["gateway"]["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"
