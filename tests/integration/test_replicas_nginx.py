"""The compose topology as local processes: Debian's nginx from deploy/nginx.conf, round robin
over three gateway replicas on one Redis and one S3 bucket (moto's server), the clients the
official `openai` SDK. Through nginx every `url` answer resolves, a cache hit and an
idempotent replay are served whichever replica gets them, the README's SDK example runs
unchanged, and a replica killed under load loses no request and bills nothing twice. After
each test the ledger equals the emulators' bills (conftest's reconciliation)."""

from __future__ import annotations

import io
import itertools
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from tests.conftest import make_image
from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.nginx_lb import NginxLB
from tests.integration.redis_server import RedisServer
from tests.integration.s3_server import S3Server
from tests.integration.servers import ROOT, GatewayProcess, free_port

MODEL = "recraft-crisp-upscale"
BUCKET = "upscale-results"  # compose's bucket
_sizes = itertools.count(40)


class Topology:
    def __init__(self, lb: NginxLB, replicas: list[GatewayProcess]):
        self.lb, self.replicas = lb, replicas
        self.base_url = f"{lb.url}/v1"

    def sdk(self, retries: int = 0) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key="any", max_retries=retries, timeout=60)

    def upstreams_since(self, offset: int) -> Counter[str]:
        """Replica address -> upscales nginx passed to it, from its access log after `offset`."""
        lines = self.lb.access_log()[offset:].splitlines()
        return Counter(
            m[1] for line in lines if "POST /v1/images/edits" in line and (m := _UPSTREAM(line))
        )

    def log_offset(self) -> int:
        return len(self.lb.access_log())


def _UPSTREAM(line: str) -> re.Match[str] | None:
    return re.search(r" upstream=(\S+) us=200 ", line)


@pytest.fixture(scope="module")
def topology(
    tmp_path_factory: pytest.TempPathFactory,
    fal_emulator: Emulator,
    replicate_emulator: Emulator,
    redis_server: RedisServer,
    s3_server: S3Server,
) -> Iterator[Topology]:
    workdir = tmp_path_factory.mktemp("nginx-replicas")
    s3_server.bucket(BUCKET)
    config = write_config(
        workdir / "gateway.yaml",
        cache={"enabled": True},
        routing={"redis_prefix": "nginxreplicas", "explore_share": 0},
        # A dead replica's claim lapses quickly: the client's retry takes it over.
        idempotency={"lease_s": 2},
        results={"timeout_s": 3},
        # The kill drill's fal takes 2.5 s: on a loaded machine that passed the tests' 3 s
        # attempt timeout, and the failover's second job (rightly billed) hid what is counted
        # here, a retry that pays again.
        providers={"fal": {"attempt_timeout_s": 15}},
    )
    port = free_port()
    # As compose has it: one public URL (nginx's), one signing key, one bucket, one Redis.
    env = s3_server.env(
        BUCKET,
        "results",
        REDIS_URL=redis_server.url,
        GATEWAY_PUBLIC_URL=f"http://127.0.0.1:{port}",
        GATEWAY_RESULTS_PUBLIC_ENDPOINT=f"http://localhost:{s3_server.port}",
    )
    replicas: list[GatewayProcess] = []
    try:
        for _ in range(3):
            replicas.append(start_gateway(workdir, fal_emulator, replicate_emulator, config, **env))
        with NginxLB([r.port for r in replicas], port=port, log_dir=workdir) as lb:
            yield Topology(lb, replicas)
    finally:
        for replica in replicas:
            replica.stop()


def submits(*emulators: Emulator) -> int:
    return sum(
        1 for e in emulators for r in e.requests() if r["path"].endswith(("/crisp", "/predictions"))
    )


def edit(client: OpenAI, image: bytes, key: str | None = None, **extra: Any) -> Any:
    return client.images.with_raw_response.edit(
        model=MODEL,
        image=("a.png", image, "image/png"),
        prompt="x",
        extra_body={"scale_factor": 2, **extra},
        extra_headers={"Idempotency-Key": key} if key else {},
    )


def fetched_size(url: str) -> tuple[int, int]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, (url, response.status_code, response.text[:200])
    return Image.open(io.BytesIO(response.content)).size


def test_every_url_answer_resolves_whichever_replica_made_it(
    topology: Topology, emulators: tuple[Emulator, Emulator]
) -> None:
    offset = topology.log_offset()
    client = topology.sdk()
    for n in range(9):
        width = next(_sizes)
        answer = edit(client, make_image(width, 40), cache=n % 2 == 0).parse()
        assert fetched_size(answer.data[0].url) == (width * 2, 80)
    served = topology.upstreams_since(offset)
    assert len(served) == 3 and min(served.values()) == 3, served  # round robin


def test_a_cache_hit_and_a_replay_work_on_whichever_replica_gets_them(
    topology: Topology, emulators: tuple[Emulator, Emulator]
) -> None:
    client = topology.sdk()
    width = next(_sizes)
    image = make_image(width, 40)
    before, offset = submits(*emulators), topology.log_offset()
    answers = [edit(client, image) for _ in range(6)]
    assert [a.headers["x-upscale-cache"] for a in answers] == ["miss"] + ["hit"] * 5
    for answer in answers:
        assert fetched_size(answer.parse().data[0].url) == (width * 2, 80)
    key, other = str(uuid.uuid4()), make_image(next(_sizes), 40)
    replays = [edit(client, other, key=key, cache=False) for _ in range(6)]
    assert [a.headers.get("idempotent-replayed") for a in replays[1:]] == ["true"] * 5
    urls = {a.parse().data[0].url for a in replays}
    assert len({fetched_size(url) for url in urls}) == 1
    assert submits(*emulators) - before == 2  # one job for the six hits, one for the replays
    assert len(topology.upstreams_since(offset)) == 3  # every replica answered some of them


def test_the_readme_sdk_example_runs_unchanged_against_nginx(
    topology: Topology, emulators: tuple[Emulator, Emulator]
) -> None:
    example = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert example, "README has no python example"
    for _ in range(3):  # once on each replica
        run = subprocess.run(
            [sys.executable, "-c", example[1]],
            env={"GATEWAY_URL": topology.base_url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert fetched_size(run.stdout.strip().splitlines()[-1]) == (600, 400)


def test_a_replica_killed_under_load_loses_no_request_and_bills_nothing_twice(
    topology: Topology, emulators: tuple[Emulator, Emulator]
) -> None:
    """Last in the module: one replica stays dead. Each client sends its own Idempotency-Key
    and lets the SDK retry (it retries nginx's 502); the requests the dead replica held are
    taken over by a live one, which follows the provider job already submitted."""
    fal, replicate = emulators
    fal.faults(latency_ms=2500, jitter_ms=0)
    requests = 24
    widths = [next(_sizes) for _ in range(requests)]
    images = [make_image(width, 40) for width in widths]
    keys = [f"kill-drill-{uuid.uuid4()}" for _ in range(requests)]
    before, offset = submits(fal, replicate), topology.log_offset()
    client = topology.sdk(retries=4)
    victim = topology.replicas[1]

    def send(i: int) -> tuple[Any, float]:
        started = time.monotonic()
        answer = edit(client, images[i], key=keys[i], cache=False)
        return answer, time.monotonic() - started

    with ThreadPoolExecutor(requests) as pool:
        futures = [pool.submit(send, i) for i in range(requests)]
        time.sleep(1.2)  # every job is at fal now
        assert victim.proc is not None
        victim.proc.kill()
        results = [f.result() for f in futures]
    sizes = [fetched_size(a.parse().data[0].url) for a, _ in results]
    assert sizes == [(width * 2, 80) for width in widths]  # every request answered, right
    jobs = submits(fal, replicate) - before
    lines = topology.lb.access_log()[offset:].splitlines()
    refused = sum(1 for line in lines if "POST /v1/images/edits" in line and " 502 " in line)
    slowest = max(elapsed for _, elapsed in results)
    print(
        f"\nkill drill: {requests} requests, 1 of 3 replicas SIGKILLed at 1.2 s; "
        f"{requests} answered 200, {refused} 502s at the edge retried by the SDK, "
        f"{jobs} provider jobs, slowest {slowest:.1f} s"
    )
    assert refused > 0, "the killed replica held none of the requests: nothing was drilled"
    attempts = Counter(a.headers["x-upscale-attempts"] for a, _ in results)
    assert attempts == {"fal=ok": requests}, attempts  # one attempt each: no failover
    assert jobs == requests  # none paid twice: the retries followed the dead replica's jobs
