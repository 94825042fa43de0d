"""GATEWAY_WORKERS=2: one scrape of /metrics shows the sum of both workers, and a worker that
dies (and that uvicorn's supervisor replaces) takes its gauges along but leaves its counts.

The test names PROMETHEUS_MULTIPROC_DIR itself, as an operator may, so that it can read the
files there: one per worker pid and kind, the per-worker evidence of who served what."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_image
from tests.integration import reconcile
from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.redis_server import RedisServer
from tests.integration.servers import GatewayProcess

METRICS_KEY = "test-metrics-key-5c1d"
STALE_PID = 1  # init's: never a worker's, so only the start-up wipe can remove its files
BATCH = 4  # concurrent requests, each on a fresh connection: both workers accept some
MAX_REQUESTS = 96


def write_stale(path: Path, kind: str, sample: str, value: float, **labels: str) -> None:
    """A file as an earlier run would have left it, in prometheus_client's own format."""
    metric = sample.removesuffix("_total")
    stale = MmapedDict(str(path / f"{kind}_{STALE_PID}.db"))
    key = mmap_key(metric, sample, list(labels), list(labels.values()), "from an earlier run")
    stale.write_value(key, value, 0.0)
    stale.close()


@pytest.fixture
def two_workers(
    tmp_path: Path,
    fal_emulator: Emulator,
    replicate_emulator: Emulator,
    redis_server: RedisServer,
) -> Iterator[tuple[GatewayProcess, Path]]:
    files = tmp_path / "metrics"
    files.mkdir(mode=0o700)
    write_stale(files, "counter", "upscale_requests_total", 1000, status="404")
    write_stale(files, "gauge_livemax", "upscale_state_store_degraded", 1)
    process = start_gateway(
        tmp_path,
        fal_emulator,
        replicate_emulator,
        write_config(tmp_path / "gateway.yaml"),
        GATEWAY_WORKERS="2",
        REDIS_URL=redis_server.url,
        PROMETHEUS_MULTIPROC_DIR=str(files),
        GATEWAY_METRICS_KEY=METRICS_KEY,
    )
    try:
        yield process, files
    finally:
        process.stop()


def scrape(process: GatewayProcess) -> dict[str, float]:
    """One scrape: each sample name's total over its label sets."""
    response = httpx.get(
        f"{process.url}/metrics",
        headers={"Authorization": f"Bearer {METRICS_KEY}"},
        timeout=10,
    )
    response.raise_for_status()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                continue
            key = sample.name
            if sample.name == "upscale_requests_total":
                key = f"{key}{{status={sample.labels['status']}}}"
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def served_by_pid(files: Path) -> dict[int, float]:
    """Upscales each worker pid counted, from its own counter file."""
    served: dict[int, float] = {}
    for path in files.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for family in MultiProcessCollector.merge([str(path)]):
            if family.name == "upscale_provider_requests":
                served[pid] = sum(s.value for s in family.samples if s.labels["outcome"] == "ok")
    return {pid: n for pid, n in served.items() if n}


def live_gauge_pids(files: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in files.glob("gauge_live*_*.db")}


def parent_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, not ")".
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def wait_for(condition: Callable[[], bool], what: str, process: GatewayProcess) -> None:
    deadline = time.monotonic() + 30  # a bound for a broken gateway, not a timing claim
    while not condition():
        assert time.monotonic() < deadline, (what, process.log())
        time.sleep(0.05)


def upscale(process: GatewayProcess) -> None:
    # A client of its own per request: a fresh connection, which either worker may accept.
    with httpx.Client(timeout=30) as client:
        answer = client.post(
            f"{process.url}/v1/images/edits",
            files={"image": ("a.png", make_image(40, 40), "image/png")},
            data={"model": "recraft-crisp-upscale", "response_format": "b64_json"},
        )
        assert answer.status_code == 200, answer.text
        assert client.get(f"{process.url}/no-such-page").status_code == 404


def billed_micros(*emulators: Emulator) -> int:
    return sum(int(reconcile.emulator_jobs(e)["billed_micros"]) for e in emulators)


def test_one_scrape_sums_both_workers_and_survives_a_worker_restart(
    two_workers: tuple[GatewayProcess, Path],
    fal_emulator: Emulator,
    replicate_emulator: Emulator,
) -> None:
    process, files = two_workers
    assert process.proc is not None
    # The earlier run's files were wiped before the workers started.
    assert not list(files.glob(f"*_{STALE_PID}.db"))
    billed_before = billed_micros(fal_emulator, replicate_emulator)
    ledger_before = sum(process.ledger_micros().values())

    sent = 0
    with ThreadPoolExecutor(BATCH) as pool:
        while len(served_by_pid(files)) < 2:
            assert sent < MAX_REQUESTS, ("one worker accepted every connection", process.log())
            list(pool.map(lambda _: upscale(process), range(BATCH)))
            sent += BATCH
    served = served_by_pid(files)
    assert sum(served.values()) == sent
    workers = set(served)
    assert all(parent_of(pid) == process.proc.pid for pid in workers)

    totals = scrape(process)
    assert totals["upscale_provider_requests_total"] == sent
    assert totals["upscale_provider_latency_seconds_count"] == sent  # histograms merge too
    assert totals["upscale_requests_total{status=404}"] == sent
    assert totals["upscale_state_store_degraded"] == 0  # the stale 1 is gone
    # Spend: settled into the shared ledger by whichever worker served, summed here.
    wait_for(
        lambda: (
            sum(process.ledger_micros().values()) - ledger_before
            == billed_micros(fal_emulator, replicate_emulator) - billed_before
        ),
        "the ledger never caught up with the providers' bills",
        process,
    )
    assert process.spend_metric_micros() == {p: v for p, v in process.ledger_micros().items() if v}

    victim = min(workers)
    survivor = (workers - {victim}).pop()
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in live_gauge_pids(files) and len(live_gauge_pids(files)) == 2,
        "the dead worker's gauges stayed, or no replacement started",
        process,
    )
    (replacement,) = live_gauge_pids(files) - {survivor}
    assert replacement != victim and parent_of(replacement) == process.proc.pid

    # Its counter files stay, and one scrape still sums them with the others'.
    assert (files / f"counter_{victim}.db").exists()
    after = scrape(process)
    assert after["upscale_provider_requests_total"] == sent
    assert after["upscale_provider_latency_seconds_count"] == sent
    assert after["upscale_requests_total{status=404}"] == sent
    assert after["upscale_spend_usd_total"] == pytest.approx(totals["upscale_spend_usd_total"])
    assert after["upscale_state_store_degraded"] == 0
    assert "Traceback" not in process.log()
