"""A 1,000-line batch in the sandbox (`--sandbox`, the in-process emulators at their default
latency): every line completes at its exact size, and the gateway's peak RSS stays far below
the bytes the batch moved, since neither the input file nor the output file is ever held
whole (uploads are spooled, lines read by byte range, output streamed line by line)."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest
from openai import OpenAI
from PIL import Image

from tests.integration import batch_helpers as bh
from tests.integration.conftest import write_config
from tests.integration.servers import GatewayProcess

LINES = 1000
SIDE = 96
# 16 lines in flight: enough to keep the sandbox busy, few enough that the allocator's
# per-thread slack (noise, not holding) stays small beside what holding lines would add.
BATCH = {"concurrency": 16, "per_batch": 16, "per_key": 16, "poll_s": 0.2}
MARK = 400  # by then the sandbox emulators keep their last 256 jobs: the plateau


def noise_png(seed: int) -> bytes:
    """Incompressible pixels: each data URI is about 37 KB, as a small product photo."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (SIDE, SIDE), rng.randbytes(SIDE * SIDE * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def rss_kib(process: GatewayProcess) -> int:
    assert process.proc is not None
    for row in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture
def sandboxed(tmp_path: Path) -> GatewayProcess:
    config = write_config(tmp_path / "g.yaml", batch=BATCH)
    process = GatewayProcess({"GATEWAY_CONFIG": str(config)}, tmp_path)
    process.args = ("--sandbox", "--port", str(process.port))
    return process.start()


def test_a_thousand_line_batch_completes_with_bounded_memory(
    sandboxed: GatewayProcess, record_property: pytest.RecordProperty
) -> None:
    process = sandboxed
    try:
        client = OpenAI(base_url=f"{process.url}/v1", api_key="any", max_retries=2, timeout=120)
        lines = [
            bh.line(
                f"p{i}",
                noise_png(i),
                scale_factor=2,
                response_format="b64_json" if i % 2 else "url",
            )
            for i in range(LINES)
        ]
        body = bh.jsonl(lines)
        # Warm: one small batch first, so the peak below is the big batch's, not start-up's.
        bh.wait(client, bh.run(client, lines[:2]).id)
        idle_kib = process.peak_rss_kib()
        started = time.monotonic()
        uploaded = client.files.create(file=("catalogue.jsonl", body), purpose="batch")
        created = client.batches.create(
            input_file_id=uploaded.id, endpoint=bh.ENDPOINT, completion_window="24h"
        )
        half_kib = 0
        deadline = time.monotonic() + 420
        while True:
            batch = client.batches.retrieve(created.id)
            counts = batch.request_counts
            if not half_kib and counts and counts.completed + counts.failed >= MARK:
                half_kib = process.peak_rss_kib()
            if batch.status in bh.FINAL:
                break
            assert time.monotonic() < deadline, batch
            time.sleep(0.5)
        took = time.monotonic() - started
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (LINES, 0)
        peak_kib = process.peak_rss_kib()
        output = client.files.retrieve(batch.output_file_id or "")
        seen = 0
        for item in bh.read_lines(client, batch.output_file_id).values():
            if item["response"]["body"]["data"][0].get("b64_json"):
                assert bh.image_size(item) == (2 * SIDE, 2 * SIDE)
            seen += 1
        assert seen == LINES
        moved = len(body) + output.bytes
        growth = (peak_kib - idle_kib) * 1024
        figure = (
            f"{LINES} lines, input {len(body) / 2**20:.1f} MiB, output {output.bytes / 2**20:.1f} "
            f"MiB, {took:.0f} s; gateway RSS idle {idle_kib / 1024:.0f} MiB, peak "
            f"{peak_kib / 1024:.0f} MiB (at line {MARK} {half_kib / 1024:.0f} MiB; "
            f"+{growth / 2**20:.0f} MiB = {growth / moved:.2f} x the bytes moved), "
            f"after {rss_kib(process) / 1024:.0f} MiB"
        )
        print(figure)
        record_property("batch_rss", figure)
        # By line MARK the peak holds what is bounded: the lines in flight, the sandbox
        # emulators' last jobs, allocator slack. Holding lines, outcomes or either file
        # would grow it on with every later line, by at least the bytes they moved; half
        # of those is the bound.
        later = moved * (LINES - MARK) / LINES
        assert (peak_kib - half_kib) * 1024 < 0.5 * later, figure
    finally:
        process.stop()
