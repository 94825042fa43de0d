"""The container files, checked without a Docker engine or the network: hadolint lints the
Dockerfile, check-jsonschema validates docker-compose.yml against its bundled compose-spec
schema, and the rest cross-checks both (and .dockerignore) against the code they package:
environment names, port, health path, user, copied paths, shutdown grace."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETTINGS_PY = ROOT / "gateway" / "settings.py"
# The design doc may live in the checkout or, while the project is young, beside it.
DESIGN_CANDIDATES = (
    ROOT / "DESIGN.md",
    ROOT / "docs" / "DESIGN.md",
    ROOT.parent / "shared" / "DESIGN.md",
)
ENV_NAME = re.compile(r"(?:GATEWAY|FAL|REPLICATE|REDIS)_[A-Z0-9_]+")
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: a fetch fails at once, it never leaves


# ---------------------------------------------------------------- reading the files


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuations joined."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may also sit inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword, args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(stage, "ENV"):
        tokens = shlex.split(args)
        if "=" not in tokens[0]:  # legacy `ENV NAME value`
            env[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            name, _, value = token.partition("=")
            env[name] = value
    return env


def flags_and_rest(args: str) -> tuple[dict[str, str], str]:
    """`--from=build /a /b` -> ({"from": "build"}, "/a /b")."""
    flags: dict[str, str] = {}
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        args = args.strip()
    return flags, args


def runtime() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def gateway_services() -> dict[str, dict[str, Any]]:
    """The services built from this repository: the gateway replicas behind nginx (the
    others run published images)."""
    return {name: s for name, s in compose()["services"].items() if "build" in s}


def gateway_service() -> dict[str, Any]:
    """The first replica; the others are the same definition (tests/integration/
    test_deploy_files.py checks that)."""
    services = gateway_services()
    assert services, "docker-compose.yml builds no gateway service"
    return services[min(services)]


def compose_env() -> dict[str, str]:
    env = gateway_service().get("environment", {})
    if isinstance(env, list):  # the `- NAME=value` form
        env = dict(item.partition("=")[::2] for item in env)
    return {name: str(value) for name, value in env.items()}


def seconds(duration: str | int) -> float:
    """A compose duration (`1m30s`, `40s`, `500ms`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: `make install` puts it in the venv ([dev] extra)")
    return str(found)


def offline_env(home: Path) -> dict[str, str]:
    """The environment for a linter: any network fetch goes to a dead proxy, and no user-level
    configuration (a hadolint.yaml in $HOME, HADOLINT_* variables) can silence a rule."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HADOLINT_",))}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = DEAD_PROXY
    env["NO_PROXY"] = env["no_proxy"] = ""
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    return env


def run(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, env=offline_env(home), capture_output=True, text=True, check=False
    )


# ---------------------------------------------------------------- linters


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    assert not list(ROOT.glob(".hadolint.y*ml")), "a repo-wide hadolint config hides rules"
    result = run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"], tmp_path
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert report.strip() == "", report


def test_hadolint_ignores_are_targeted_and_explained() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint" not in line or "ignore" not in line:
            continue
        assert re.fullmatch(r"# hadolint ignore=(DL|SC)\d{4}(,(DL|SC)\d{4})*", line.strip()), line
        why = lines[number - 1].strip() if number else ""
        assert why.startswith("#") and "hadolint" not in why, f"say why above: {line}"


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    # The builtin schema ships inside check-jsonschema and refers only to itself; with the dead
    # proxy a remote $ref would fail here rather than quietly reach the network. (--no-cache is
    # irrelevant: it concerns downloaded schemas, and none is downloaded.)
    result = run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- in step with the code


def design_names() -> set[str]:
    for path in DESIGN_CANDIDATES:
        if path.exists():
            text = path.read_text()
            match = re.search(r"^## Settings.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
            section = match[1] if match else ""
            return set(re.findall(rf"`({ENV_NAME.pattern})`", section))
    return set()


def settings_names() -> set[str]:
    """Environment names gateway/settings.py declares (aliases of its pydantic fields)."""
    return set(re.findall(rf"[\"']({ENV_NAME.pattern})[\"']", SETTINGS_PY.read_text()))


def packaged_names() -> dict[str, str]:
    """Each environment name the container files set or interpolate -> where."""
    names = {name: "Dockerfile ENV" for name in env_of(runtime()) if ENV_NAME.fullmatch(name)}
    for name, value in compose_env().items():
        if ENV_NAME.fullmatch(name):
            names.setdefault(name, "docker-compose.yml environment")
        for used in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value):
            if ENV_NAME.fullmatch(used):
                names.setdefault(used, "docker-compose.yml interpolation")
    return names


def test_env_names_are_in_the_design_or_the_settings() -> None:
    names = packaged_names()
    assert "GATEWAY_PORT" in names and "FAL_KEY" in names, names
    unknown = set(names) - design_names()
    if unknown and not SETTINGS_PY.exists():
        pytest.skip(f"gateway/settings.py does not exist yet; cannot check {sorted(unknown)}")
    unknown -= settings_names() if SETTINGS_PY.exists() else set()
    assert not unknown, {name: names[name] for name in sorted(unknown)}


def test_env_names_are_read_by_the_settings() -> None:
    """Stricter: a name the design lists but settings.py does not read is silently ignored."""
    if not SETTINGS_PY.exists():
        pytest.skip("gateway/settings.py does not exist yet")
    unread = set(packaged_names()) - settings_names()
    assert not unread, sorted(unread)


def test_compose_passes_each_setting_under_its_own_name() -> None:
    # `FAL_KEY: ${FAL_KEY:-}`: the operator sets the names the docs give.
    for name, value in compose_env().items():
        used = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value)
        assert used in ([], [name]), f"{name}: {value}"


def test_one_port_everywhere() -> None:
    stage = runtime()
    exposed = {args.split("/")[0] for args in instructions(stage, "EXPOSE")}
    assert exposed == {env_of(stage)["GATEWAY_PORT"]}, exposed
    port = exposed.pop()
    for name, service in gateway_services().items():
        # Clients reach the replicas through nginx (its upstreams name this port:
        # tests/integration/test_deploy_files.py); a replica publishes nothing of its own.
        assert "ports" not in service, f"{name} publishes a port beside the balancer"
    assert compose_env().get("GATEWAY_PORT", port) == port
    assert f":{port}/healthz" in str(gateway_service()["healthcheck"]["test"])


def test_healthchecks_probe_healthz_without_curl() -> None:
    (check,) = instructions(runtime(), "HEALTHCHECK")
    _, command = flags_and_rest(check)
    assert command.startswith("CMD ["), "exec form"
    probe = json.loads(command.removeprefix("CMD "))
    assert probe[:2] == ["python", "-c"] and "urllib.request" in probe[2], probe
    assert "/healthz" in probe[2], probe
    compose_test = gateway_service()["healthcheck"]["test"]
    assert compose_test[0] == "CMD" and "/healthz" in " ".join(compose_test)
    routes = [p for p in (ROOT / "gateway").rglob("*.py") if '"/healthz"' in p.read_text()]
    assert routes, "no module of the gateway declares the /healthz route"


def test_runs_as_a_fixed_non_root_user() -> None:
    stage = runtime()
    user = instructions(stage, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: a numeric, non-root UID"
    assert not gid or (gid.isdigit() and int(gid) > 0), f"USER {user}"
    setup = " ".join(instructions(stage, "RUN"))
    assert re.search(rf"useradd .*--uid {uid}\b", setup), "USER must name the created account"
    if gid:
        assert re.search(rf"groupadd .*--gid {gid}\b", setup)
    # The results directory exists, owned by that user, inside a declared volume.
    results = env_of(stage)["GATEWAY_RESULTS_DIR"]
    assert results in setup and re.search(r"install -d -o|chown", setup), setup
    volumes = [v for args in instructions(stage, "VOLUME") for v in json.loads(args)]
    assert any(results == v or results.startswith(v + "/") for v in volumes), volumes


def test_image_layout_and_entrypoint() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build, then runtime"
    bases = {instructions(stage, "FROM")[0].split()[0] for stage in stages}
    # One base for every stage: the venv links to the base's interpreter path.
    assert len(bases) == 1, bases
    (base,) = bases
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    build_name = instructions(stages[0], "FROM")[0].split()[-1]
    stage = stages[-1]
    copied_from = [flags_and_rest(a) for a in instructions(stage, "COPY") if "--from" in a]
    assert any(f["from"] == build_name and "/opt/venv" in rest for f, rest in copied_from)
    installs = [a for st in stages for a in instructions(st, "RUN") if "pip install" in a]
    assert installs and not any("[" in a for a in installs), "runtime dependencies only"

    env = env_of(stage)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    workdir = instructions(stage, "WORKDIR")[-1]
    assert workdir == "/app"
    config = env["GATEWAY_CONFIG"]
    assert config.startswith(workdir + "/"), config
    assert (ROOT / config.removeprefix(workdir + "/")).is_file(), config
    assert instructions(stage, "STOPSIGNAL") == ["SIGTERM"]
    assert [json.loads(c) for c in instructions(stage, "CMD")] == [["python", "-m", "gateway"]]
    assert (ROOT / "gateway" / "__main__.py").is_file()


def test_build_context_holds_what_the_build_copies() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "!"))
    ]
    for required in (".venv", ".git", "tests", "bench", "var"):
        assert required in ignored, f".dockerignore should exclude {required}"

    sources: set[str] = set()
    for stage in dockerfile_stages():
        for args in instructions(stage, "COPY"):
            flags, rest = flags_and_rest(args)
            if "from" not in flags:
                sources.update(Path(p).as_posix().rstrip("/") for p in rest.split()[:-1])
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        for pattern in ignored:
            parts = Path(source).parts
            hit = any(fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts)))
            assert not hit, f"COPY {source} is excluded by .dockerignore ({pattern})"

    # `pip install .` needs the metadata, the readme it names and every package it finds.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"].get("readme", "pyproject.toml")}
    find = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    needed |= {pattern.rstrip("*.") for pattern in find.get("include", [])}
    assert needed <= sources, needed - sources


def test_compose_wiring() -> None:
    spec = compose()
    assert "version" not in spec, "the top-level version key is obsolete"
    services = spec["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    assert compose_env()["REDIS_URL"].startswith("redis://redis:")
    assert redis.get("restart")
    for gateway in gateway_services().values():
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
        assert gateway.get("restart")
        build = gateway["build"]
        assert build in (".", {"context": "."}) or build.get("context") == "."

        # Results go to a declared named volume mounted at (or above) GATEWAY_RESULTS_DIR.
        env_dir = compose_env().get("GATEWAY_RESULTS_DIR")
        results = env_dir or env_of(runtime())["GATEWAY_RESULTS_DIR"]
        mounts = [str(v).split(":") for v in gateway["volumes"]]
        named = [(src, dst) for src, dst, *_ in mounts if not src.startswith((".", "/"))]
        assert any(results == dst or results.startswith(dst + "/") for _, dst in named), mounts
        assert {src for src, _ in named} <= set(spec.get("volumes") or {})
        if gateway.get("read_only"):
            assert "/tmp" in [str(t).split(":")[0] for t in gateway.get("tmpfs", [])]


def test_stop_grace_outlasts_the_servers_drain() -> None:
    from gateway.__main__ import DRAIN_S

    for name, service in gateway_services().items():
        grace = seconds(service.get("stop_grace_period", "10s"))  # Docker's default
        assert grace > DRAIN_S, f"{name}: stop_grace_period {grace}s < the {DRAIN_S} s drain"
