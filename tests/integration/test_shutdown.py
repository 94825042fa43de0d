"""SIGTERM drains: requests in flight when the signal arrives are served before the process
exits, in sandbox mode too (where the emulated providers run in the gateway's own loop and
must not stop before the requests they serve)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_image
from tests.integration.conftest import Emulator, start_gateway, write_config
from tests.integration.servers import GatewayProcess


def test_sigterm_lets_in_flight_sandbox_requests_finish(tmp_path: Path) -> None:
    config = write_config(tmp_path / "g.yaml", sandbox={"latency_ms": 1500, "jitter_ms": 0})
    process = GatewayProcess({"GATEWAY_CONFIG": str(config)}, tmp_path).start()
    assert process.proc is not None
    # The in-loop emulators leave logging alone: the gateway's own startup lines are there.
    assert "upscale-gateway listening on" in process.log()
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(
                httpx.post,
                f"{process.url}/v1/images/edits",
                files={"image": ("a.png", make_image(40, 40), "image/png")},
                data={"model": "recraft-crisp-upscale", "response_format": "b64_json"},
                timeout=30,
            )
            for _ in range(3)
        ]
        time.sleep(0.7)  # all three are now waiting on the emulated provider
        process.proc.send_signal(signal.SIGTERM)
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200, 200, 200], process.log()
    # uvicorn re-raises the captured SIGTERM once drained: the exit status says "terminated".
    assert process.proc.wait(20) in (0, -signal.SIGTERM)
    assert "Traceback" not in process.log()


@pytest.mark.unreconciled(
    "GATEWAY_WORKERS=2 without Redis: each worker keeps its own in-memory ledger and "
    "counters, /admin/spend answers from whichever worker takes the connection, and the "
    "process is stopped inside the test"
)
def test_worker_processes_verify_each_others_urls(
    tmp_path: Path, fal_emulator: Emulator, replicate_emulator: Emulator
) -> None:
    """GATEWAY_WORKERS=2 on one port: a URL signed by either worker serves from either, and
    both workers log as the single process does."""
    config = write_config(tmp_path / "g.yaml")
    process = start_gateway(
        tmp_path,
        fal_emulator,
        replicate_emulator,
        config,
        GATEWAY_WORKERS="2",
        GATEWAY_SIGNING_KEY="",  # unset: the parent makes one key for both workers
    )
    try:
        for _ in range(8):
            answer = httpx.post(
                f"{process.url}/v1/images/edits",
                files={"image": ("a.png", make_image(40, 40), "image/png")},
                data={"model": "recraft-crisp-upscale", "scale_factor": "2"},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            for _ in range(3):  # the connection may land on either worker
                fetched = httpx.get(answer.json()["data"][0]["url"], timeout=10)
                assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
        log = process.log_path.read_text()
        workers = {
            line.split("[")[1].split("]")[0]
            for line in log.splitlines()
            if "Started server process" in line
        }
        assert len(workers) == 2, log
        assert '"event":"request"' in log and "VIPS:" not in log
    finally:
        process.stop()
