"""The Batch API on three replicas sharing Redis and one store: every replica works the
batch's lines from the Redis Stream; a replica SIGKILLed mid-batch loses no line, its lines
are reclaimed by the others and follow the provider jobs it had submitted (their
Idempotency-Keys), so no input is paid twice and the ledger equals the providers' bills
(checked after the test by the suite's reconcile hook)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from tests.integration import batch_helpers as bh
from tests.integration.replicas import Gateways
from tests.integration.servers import GatewayProcess

LINES = 36
PER_REPLICA = 4  # 3 x 4 lines in flight: one wave of submits, then 2 s of waiting
BATCH = {"reclaim_idle_s": 2, "poll_s": 0.2, "concurrency": PER_REPLICA}


def _sdk(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="any", max_retries=2, timeout=60)


def _wait_for_wave(fal_jobs: Callable[[], list[dict[str, Any]]], count: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        jobs = fal_jobs()
        if len(jobs) >= count and all(j["state"] in ("queued", "running") for j in jobs):
            return
        assert not any(j["state"] == "succeeded" for j in jobs), "the wave ended unseen"
        assert time.monotonic() < deadline, f"the first wave never reached fal: {jobs}"
        time.sleep(0.05)


def test_a_replica_killed_mid_batch_loses_no_line_and_pays_none_twice(
    gateways: Gateways, tmp_path: Path
) -> None:
    shared = {"GATEWAY_RESULTS_DIR": str(tmp_path / "shared-results")}
    replicas = gateways.start(
        3,
        env=shared,
        sections={"batch": BATCH, "idempotency": {"lease_s": 2}},
    )
    fal = gateways.fal
    fal.faults(latency_ms=2000, jitter_ms=0)
    lines = [
        bh.line(f"k{i}", bh.distinct_image(500 + i), scale_factor=2, response_format="b64_json")
        for i in range(LINES)
    ]
    client = _sdk(replicas[1])
    before = {j["id"] for j in fal.jobs()["jobs"]}  # the session's emulator has others'
    replicate_before = {j["id"] for j in gateways.replicate.jobs()["jobs"]}

    def new_jobs() -> list[dict[str, Any]]:
        return [j for j in fal.jobs()["jobs"] if j["id"] not in before]

    created = bh.run(client, lines)

    # Every replica takes its share of the first wave; the kill lands while those jobs wait
    # at fal, journaled, between two waves of submits (no submit is cut in half).
    _wait_for_wave(new_jobs, 3 * PER_REPLICA)
    time.sleep(0.5)
    victim = replicas[0]
    assert victim.proc is not None
    victim.proc.kill()
    victim.proc.wait()

    batch = bh.wait(client, created.id, timeout_s=180)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (LINES, LINES, 0)
    output = bh.read_lines(client, batch.output_file_id)
    assert set(output) == {f"k{i}" for i in range(LINES)}  # no line lost
    assert bh.read_lines(client, batch.error_file_id) == {}
    for item in output.values():
        assert bh.image_size(item) == (80, 64)

    jobs = new_jobs()
    per_input = Counter(j["input_sha256"] for j in jobs)
    assert len(per_input) == LINES and set(per_input.values()) == {1}, per_input  # none twice
    assert all(j["billed"] for j in jobs)
    late = [j for j in gateways.replicate.jobs()["jobs"] if j["id"] not in replicate_before]
    assert not late
    assert batch.model_extra is not None
    assert batch.model_extra["cost_usd"] == round(sum(j["price_usd"] for j in jobs), 6)

    # The survivors say what they took over.
    reclaimed = 0.0
    for survivor in replicas[1:]:
        text = httpx.get(f"{survivor.url}/metrics", timeout=10).text
        reclaimed += sum(
            float(row.split()[-1])
            for row in text.splitlines()
            if row.startswith("upscale_batch_lines_reclaimed_total")
        )
    assert reclaimed >= 1
