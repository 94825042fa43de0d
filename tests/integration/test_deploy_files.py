"""deploy/ and the compose topology, checked without a Docker engine: Debian's nginx tests and
runs deploy/nginx.conf (as tests/integration/nginx_lb.py renders it), promtool checks the
Prometheus config and the alert rules and runs their unit tests, every metric an alert names
is one gateway/metrics.py makes, and docker-compose.yml wires it all as the files say."""

from __future__ import annotations

import difflib
import json
import re
import shutil
import socket
import subprocess
import warnings
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from starlette.requests import Request

from gateway.api.body import body_limit
from gateway.config import load_config
from gateway.metrics import Metrics
from gateway.settings import Settings
from tests.integration import nginx_lb
from tests.integration.servers import ROOT, free_port
from tests.integration.test_container_files import compose, gateway_services
from tests.integration.test_container_files import seconds as compose_seconds

DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Series Prometheus makes itself, not the gateway.
BUILTIN_SERIES = {"up"}
# Named by a rule before gateway/metrics.py has them: name -> who adds it. Remove an entry
# once the collector exists (the test warns until then).
PENDING_METRICS: dict[str, str] = {}
_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is not installed: Debian's `prometheus` package (.ci/run)")
    return subprocess.run(
        [PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )


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


# ---------------------------------------------------------------- Prometheus


def test_promtool_checks_the_prometheus_config(tmp_path: Path) -> None:
    # Checked as compose mounts it, but for two paths that exist only in the container: the
    # scrape key's file (written at start) and the rules beside the config.
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    key = tmp_path / "metrics_key"
    key.write_text("test-metrics-key")
    for scrape in config["scrape_configs"]:
        if "authorization" in scrape:
            scrape["authorization"]["credentials_file"] = str(key)
    config["rule_files"] = [str(DEPLOY / path) for path in config["rule_files"]]
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", "deploy/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "deploy/alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (enough of PromQL for alerts.yml)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # matchers and ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {w for w in words if w not in _PROMQL_KEYWORDS}


def test_series_names_reads_promql() -> None:
    expr = 'sum by (provider) (rate(a_total{x="b_c"}[5m])) / on(z) b > 0.25 and bool c'
    assert series_names(expr) == {"a_total", "b", "c"}


def exported_names() -> set[str]:
    """Every series name gateway/metrics.py exports (a counter as `_total`, a histogram as
    `_bucket`, `_sum`, `_count`)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_every_metric_an_alert_reads_exists() -> None:
    exported = exported_names()
    for rule in alert_rules():
        for name in series_names(rule["expr"]) - exported - BUILTIN_SERIES:
            assert name in PENDING_METRICS, f"{rule['alert']}: gateway/metrics.py has no {name}"
            warnings.warn(
                f"{rule['alert']} reads {name}, not yet in gateway/metrics.py "
                f"({PENDING_METRICS[name]})",
                stacklevel=1,
            )


def test_every_alert_is_unit_tested_firing() -> None:
    tests = yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} <= fired


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


# ---------------------------------------------------------------- the balancer, running


@pytest.fixture
def backends() -> Iterator[dict[str, nginx_lb.Backend]]:
    started = {
        "a": nginx_lb.Backend("a"),
        "b": nginx_lb.Backend("b"),
        "dropper": nginx_lb.Backend("dropper", drops=True),
    }
    yield started
    for backend in started.values():
        backend.stop()


def client(lb: nginx_lb.NginxLB) -> httpx.Client:
    return httpx.Client(base_url=lb.url, timeout=30, trust_env=False)


def edge_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """An answer nginx made itself: the OpenAI envelope, with the edge's request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_round_robin_over_the_replicas(
    backends: dict[str, nginx_lb.Backend], tmp_path: Path
) -> None:
    a, b = backends["a"], backends["b"]
    with nginx_lb.NginxLB([a.port, b.port], log_dir=tmp_path) as lb, client(lb) as http:
        served = [http.get("/echo").json()["backend"] for _ in range(10)]
    assert served.count("a") == served.count("b") == 5, served


def test_a_dead_replica_is_skipped(backends: dict[str, nginx_lb.Backend], tmp_path: Path) -> None:
    a, b, dead = backends["a"], backends["b"], free_port()  # nothing listens there
    with nginx_lb.NginxLB([a.port, dead, b.port], log_dir=tmp_path) as lb, client(lb) as http:
        for _ in range(6):
            assert http.get("/echo").status_code == 200
        # A refused connect: nothing was sent, so even a POST goes on to the next replica.
        for _ in range(3):
            assert http.post("/echo", content=b"{}").status_code == 200
    assert len(a.seen) + len(b.seen) == 9 and a.seen and b.seen


def test_a_post_that_reached_a_replica_is_not_sent_to_another(
    backends: dict[str, nginx_lb.Backend], tmp_path: Path
) -> None:
    dropper, b = backends["dropper"], backends["b"]
    with nginx_lb.NginxLB([dropper.port, b.port], log_dir=tmp_path) as lb, client(lb) as http:
        answers = []
        while not dropper.requests("POST") and len(answers) < 4:
            answers.append(http.post("/drop", content=b'{"image": "..."}'))
    assert dropper.requests("POST") == ["/drop"], "round robin never chose the dropping replica"
    # Each POST reached exactly one replica: b answered its own, the dropped one got a 502.
    assert [r.status_code for r in answers].count(502) == 1
    assert len(b.requests("POST")) == [r.status_code for r in answers].count(200)
    error = edge_error(next(r for r in answers if r.status_code == 502), 502)
    assert error["type"] == "server_error"


def test_a_get_that_a_replica_dropped_is_retried(
    backends: dict[str, nginx_lb.Backend], tmp_path: Path
) -> None:
    dropper, b = backends["dropper"], backends["b"]
    with nginx_lb.NginxLB([dropper.port, b.port], log_dir=tmp_path) as lb, client(lb) as http:
        answers = []
        while not dropper.requests("GET") and len(answers) < 4:
            answers.append(http.get("/drop"))
    assert dropper.requests("GET"), "round robin never chose the dropping replica"
    assert all(r.status_code == 200 and r.json()["backend"] == "b" for r in answers)


def test_what_the_replica_sees_and_the_client_gets(
    backends: dict[str, nginx_lb.Backend], tmp_path: Path
) -> None:
    a = backends["a"]
    with nginx_lb.NginxLB([a.port], log_dir=tmp_path) as lb, client(lb) as http:
        response = http.get(
            "/echo",
            headers={"host": "api.example:8080", "x-forwarded-for": "6.6.6.6", "x-request-id": "x"},
        )
        # Its connection's next request: nginx logs one request before it reads the next.
        assert http.get("/healthz").status_code == 200
        log = lb.access_log()
    seen = {k.lower(): v for k, v in response.json()["headers"].items()}
    assert seen["host"] == "api.example:8080"
    assert seen["x-forwarded-for"] == seen["x-real-ip"] == "127.0.0.1"  # replaced, not appended
    assert seen["x-forwarded-proto"] == "http"
    assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"])
    # The replica's request id reaches the client, once; the access log has both ids.
    assert response.headers.get_list("x-request-id") == ["req_a"]
    assert f"edge_id={seen['x-request-id']} request_id=req_a" in log
    assert "/healthz" not in log


def test_refusals_at_the_edge(backends: dict[str, nginx_lb.Backend], tmp_path: Path) -> None:
    a = backends["a"]
    with nginx_lb.NginxLB([a.port], log_dir=tmp_path) as lb, client(lb) as http:
        too_long = http.get("/echo", headers={"x-big": "a" * 20_000})
        assert edge_error(too_long, 431)["code"] == "headers"
        # A declared body over client_max_body_size is refused before it is sent.
        with socket.create_connection(("127.0.0.1", lb.port), timeout=30) as raw:
            raw.sendall(
                b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
            )
            # Read by its Content-Length: nginx may reset the connection after its answer.
            refused = HTTPResponse(raw)
            refused.begin()
            body = refused.read()
        assert refused.status == 413, body
        assert refused.getheader("content-type") == "application/json"
        assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert a.seen == [], "a refused request reached the replica"
