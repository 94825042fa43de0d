"""deploy/nginx.conf and the compose topology, checked without a Docker engine: Debian's nginx
tests deploy/nginx.conf (as tests/integration/nginx_lb.py renders it), and docker-compose.yml
wires replicas, nginx, MinIO and Prometheus as the files say. Prometheus's files are checked
in test_prometheus_files.py, nginx running in test_nginx_balancer.py."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from starlette.requests import Request

from gateway.api.body import body_limit
from gateway.config import load_config
from gateway.settings import Settings
from tests.integration import nginx_lb
from tests.integration.servers import ROOT, free_port
from tests.integration.test_container_files import compose, gateway_services
from tests.integration.test_container_files import seconds as compose_seconds

DEPLOY = ROOT / "deploy"


def limits() -> Any:
    return load_config(ROOT / "config" / "gateway.yaml").limits


def nginx_conf() -> nginx_lb.Directive:
    return nginx_lb.parse(nginx_lb.CONF.read_text())


def seconds(value: str) -> float:
    """An nginx time (`10s`, `2m`, `500ms`) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|)", value)
    assert match, value
    return int(match[1]) * units[match[2]]


def size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmM]?)", value)
    assert match, value
    return int(match[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20}[match[2].lower()]


def default_of(value: str) -> str:
    """`${NAME:-default}` or `${NAME-default}` -> default; a literal stays itself."""
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-(.*)\}", value)
    return match[1] if match else value


def services() -> dict[str, Any]:
    return compose()["services"]


def gateway_port() -> str:
    env = next(iter(gateway_services().values()))["environment"]
    return str(env.get("GATEWAY_PORT", "8080"))


# ---------------------------------------------------------------- nginx


def test_nginx_accepts_the_config_as_the_tests_run_it() -> None:
    rendered = nginx_lb.render([free_port(), free_port(), free_port()], free_port())
    result = nginx_lb.nginx_test(rendered)
    assert result.returncode == 0, result.stderr
    assert "[emerg]" not in result.stderr and "[alert]" not in result.stderr, result.stderr


def test_the_tests_change_only_the_upstream_servers_and_the_listen_address() -> None:
    original = nginx_lb.CONF.read_text().splitlines()
    rendered = nginx_lb.render([1111, 2222, 3333], 4444).splitlines()
    changed = [
        line[1:].strip()
        for line in difflib.unified_diff(original, rendered, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed, "render changed nothing"
    for line in changed:
        assert re.fullmatch(r"(server \S+ max_fails=\S+ fail_timeout=\S+|listen \S+);", line), line


def test_nginx_bounds_match_the_gateways_limits() -> None:
    http = nginx_conf().one("http")
    server = http.one("server")
    lim = limits()

    def arg(block: nginx_lb.Directive, name: str) -> str:
        return block.one(name).args[0]

    assert seconds(arg(http, "client_header_timeout")) == lim.header_timeout_s
    assert seconds(arg(http, "client_body_timeout")) == lim.body_idle_timeout_s
    assert seconds(arg(http, "send_timeout")) == lim.write_timeout_s
    count, each = http.one("large_client_header_buffers").args
    assert int(count) * size(each) <= lim.max_header_bytes
    # No body the gateway would read is refused at the edge; none much larger gets through.
    largest = max(
        body_limit(
            Request({"type": "http", "headers": [(b"content-type", ctype)]}), lim.max_image_bytes
        )
        for ctype in (b"application/json", b"multipart/form-data; boundary=x")
    )
    edge = size(arg(http, "client_max_body_size"))
    assert largest <= edge <= largest + (1 << 20), (largest, edge)
    # An upscale's answer is never cut off inside the gateway's own deadline.
    assert seconds(arg(server, "proxy_read_timeout")) > lim.request_timeout_s
    # Idle upstream connections are dropped by nginx before the gateway drops them.
    main_py = (ROOT / "gateway" / "__main__.py").read_text()
    keep_alive = re.search(r'"timeout_keep_alive": (\d+)', main_py)
    assert keep_alive, "gateway/__main__.py sets no timeout_keep_alive"
    upstream = http.one("upstream", "gateways")
    assert seconds(arg(upstream, "keepalive_timeout")) < int(keep_alive[1])
    assert arg(server, "proxy_request_buffering") == "on"
    assert arg(server, "proxy_http_version") == "1.1"


def test_a_sent_post_is_never_passed_to_another_replica() -> None:
    for directive in nginx_conf().walk():
        if directive.name == "proxy_next_upstream":
            assert "non_idempotent" not in directive.args, directive.args
            assert set(directive.args) <= {"error", "timeout"}, directive.args


def test_every_upstream_server_has_passive_health() -> None:
    for address, params in nginx_lb.upstream_servers(nginx_lb.CONF.read_text()):
        assert "max_fails=" in params and "fail_timeout=" in params, address


# ---------------------------------------------------------------- compose


def test_three_replicas_of_one_definition() -> None:
    replicas = gateway_services()
    assert sorted(replicas) == ["gateway-1", "gateway-2", "gateway-3"]
    first, *others = replicas.values()
    assert all(other == first for other in others), "the replicas differ"


def test_the_replicas_share_a_signing_key_that_production_refuses() -> None:
    # Each replica making its own key would fail proxied result URLs on two replicas in
    # three; the shared default is a placeholder, so production does not start with it.
    keys = {s["environment"]["GATEWAY_SIGNING_KEY"] for s in gateway_services().values()}
    (key,) = keys
    default = key.split(":-", 1)[1].rstrip("}")
    assert default
    with pytest.raises(ValueError, match="GATEWAY_SIGNING_KEY holds a placeholder"):
        Settings(GATEWAY_ENV="production", GATEWAY_SIGNING_KEY=default)


def test_each_replica_is_hardened() -> None:
    for name, service in gateway_services().items():
        assert service.get("read_only") is True, name
        assert "ALL" in service.get("cap_drop", []), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("init") is True, name
        assert "/healthz" in " ".join(service["healthcheck"]["test"]), name
        assert "stop_grace_period" in service, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["depends_on"]["minio-init"]["condition"] == (
            "service_completed_successfully"
        ), name


def test_nginx_balances_the_replicas() -> None:
    nginx = services()["nginx"]
    command = nginx["command"]
    conf_path = command[command.index("-c") + 1]
    prefix = command[command.index("-p") + 1]
    mounts = {dst: src for src, dst, *_ in (str(v).split(":") for v in nginx["volumes"])}
    assert (ROOT / mounts[conf_path]).resolve() == nginx_lb.CONF
    assert prefix.rstrip("/") in [str(t).split(":")[0] for t in nginx.get("tmpfs", [])]
    assert nginx.get("read_only") is True and "ALL" in nginx.get("cap_drop", [])
    # A graceful stop (requests in progress finish) that ends before the container is killed.
    assert nginx.get("stop_signal") == "SIGQUIT"
    shutdown = seconds(nginx_conf().one("worker_shutdown_timeout").args[0])
    assert shutdown < compose_seconds(nginx["stop_grace_period"])

    text = nginx_lb.CONF.read_text()
    port = gateway_port()
    upstreams = {address for address, _ in nginx_lb.upstream_servers(text)}
    assert upstreams == {f"{name}:{port}" for name in gateway_services()}
    for name in gateway_services():
        assert nginx["depends_on"][name]["condition"] == "service_healthy"

    (listen,) = nginx_lb.listen_addresses(text)
    (published,) = nginx["ports"]
    host_ip, host_port, target = str(published).split(":")
    assert host_ip == "127.0.0.1" and target == listen.rsplit(":", 1)[-1]
    # The URLs the replicas hand out name the balancer.
    for service in gateway_services().values():
        public = urlsplit(default_of(service["environment"]["GATEWAY_PUBLIC_URL"]))
        assert public.hostname == "localhost" and str(public.port) == host_port


def test_prometheus_scrapes_each_replica_with_the_rules() -> None:
    prometheus = services()["prometheus"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    assert targets == {f"{name}:{gateway_port()}" for name in gateway_services()}
    assert job["metrics_path"] == "/metrics"

    script = " ".join(prometheus["entrypoint"])
    config_file = re.search(r"--config\.file=(\S+)", script)
    assert config_file, script
    mounts = {dst: src for src, dst, *_ in (str(v).split(":") for v in prometheus["volumes"])}
    assert (ROOT / mounts[config_file[1]]).resolve() == DEPLOY / "prometheus.yml"
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_file[1]).parent / rule_file)
        assert (ROOT / mounts[in_container]).resolve() == DEPLOY / rule_file
    # The scrape key's file is written at start, on a tmpfs, from GATEWAY_METRICS_KEY.
    key_file = job["authorization"]["credentials_file"]
    assert f"> {key_file}" in script and "GATEWAY_METRICS_KEY" in script
    tmpfs = [str(t).split(":")[0] for t in prometheus.get("tmpfs", [])]
    assert any(key_file.startswith(t.rstrip("/") + "/") for t in tmpfs), tmpfs


def test_results_go_to_the_minio_bucket_that_init_creates() -> None:
    spec = services()
    env = next(iter(gateway_services().values()))["environment"]
    results = urlsplit(default_of(env["GATEWAY_RESULTS_URL"]))
    assert results.scheme == "s3"
    script = "\n".join(spec["minio-init"]["entrypoint"])
    assert f"mc mb --ignore-existing local/{results.hostname}" in script
    endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
    assert endpoint.hostname in spec and endpoint.hostname == "minio"
    # Presigned URLs name the address clients reach: MinIO's port, published on loopback.
    public = urlsplit(default_of(env["GATEWAY_RESULTS_PUBLIC_ENDPOINT"]))
    published = [str(p).split(":") for p in spec["minio"]["ports"]]
    assert ["127.0.0.1", str(public.port), str(endpoint.port)] in published
    # The gateway signs with the user that minio-init creates.
    init_env = spec["minio-init"]["environment"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name] == init_env[name], name
        assert f'"$${name}"' in script, name  # compose's $$: the shell's own variable


def test_mounted_files_exist_in_the_repo() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).is_file(), f"{name} mounts {source}: not in the repo"
