"""deploy/nginx.conf running: Debian's nginx, as tests/integration/nginx_lb.py renders the
config, in front of small backends: round robin, a dead replica skipped, a sent POST never
passed on, a dropped GET retried, what each side sees, and the refusals at the edge."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import nginx_lb
from tests.integration.servers import free_port


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
