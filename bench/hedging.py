"""Hedged requests against a tail: p50/p99 latency and spend with hedging off and on,
measured in one run, interleaved, through one gateway.

    python -m bench.hedging            # starts emulators + a gateway itself and prints figures

fal gets a 10 % tail of 5 s; with hedging on, the gateway starts Replicate after a fixed
delay and takes the first answer. Figures are ratios against hedging off in the same run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

PNG_SIDE = 48


def _one(url: str, image: bytes, hedge: bool) -> tuple[float, str, float]:
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/images/edits",
        files={"image": ("a.png", image, "image/png")},
        data={
            "model": "recraft-crisp-upscale",
            "response_format": "b64_json",
            "provider[hedge]": "true" if hedge else "false",
        },
        timeout=60,
    )
    response.raise_for_status()
    return (
        time.perf_counter() - started,
        response.headers["x-upscale-attempts"],
        float(response.headers["x-upscale-cost-usd"]),
    )


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(url: str, image: bytes, requests: int = 60, concurrency: int = 4) -> dict[str, Any]:
    """Interleave hedged and unhedged requests; return figures per mode."""
    modes = [i % 2 == 1 for i in range(2 * requests)]
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda hedge: (hedge, *_one(url, image, hedge)), modes))
    figures: dict[str, Any] = {}
    for hedge in (False, True):
        rows = [r for r in results if r[0] is hedge]
        latencies = [r[1] for r in rows]
        figures["on" if hedge else "off"] = {
            "requests": len(rows),
            "p50_s": statistics.median(latencies),
            "p99_s": quantile(latencies, 0.99),
            "hedges": sum("+hedge" in r[2] for r in rows),
            "spend_usd": sum(r[3] for r in rows),
        }
    off, on = figures["off"], figures["on"]
    figures["p99_ratio"] = on["p99_s"] / off["p99_s"]
    figures["spend_ratio"] = on["spend_usd"] / off["spend_usd"]
    return figures


def main() -> None:
    import yaml

    from adapters.emulators import (
        BackgroundServer,
        EmulatorConfig,
        FaultScript,
        create_fal_app,
        create_replicate_app,
    )
    from tests.conftest import make_image
    from tests.integration.servers import ROOT, GatewayProcess

    tail = FaultScript(latency_ms=50, jitter_ms=10, tail_ratio=0.1, tail_ms=5000, seed=7)
    quick = FaultScript(latency_ms=150, jitter_ms=30, seed=8)
    with (
        BackgroundServer(create_fal_app(EmulatorConfig(api_key="k", faults=tail))) as fal,
        BackgroundServer(create_replicate_app(EmulatorConfig(api_key="k", faults=quick))) as rep,
        tempfile.TemporaryDirectory() as tmp,
    ):
        config = yaml.safe_load((ROOT / "config/gateway.yaml").read_text())
        config["routing"]["hedge"].update(delay=0.5, budget_share=0.2)
        config["cache"] = {"enabled": False}  # every request must reach the providers
        config["providers"]["fal"].update(poll_initial_s=0.02, poll_max_s=0.05)
        config["providers"]["replicate"].update(poll_initial_s=0.02, poll_max_s=0.05)
        path = Path(tmp) / "g.yaml"
        path.write_text(yaml.safe_dump(config))
        gateway = GatewayProcess(
            {
                "FAL_KEY": "k",
                "REPLICATE_API_TOKEN": "k",
                "GATEWAY_FAL_URL": fal.url,
                "GATEWAY_REPLICATE_URL": rep.url,
                "GATEWAY_CONFIG": str(path),
                "GATEWAY_LOG_LEVEL": "warning",
            },
            Path(tmp),
        ).start()
        try:
            figures = measure(gateway.url, make_image(PNG_SIDE, PNG_SIDE))
        finally:
            gateway.stop()
    off, on = figures["off"], figures["on"]
    print(
        f"hedging off: p50 {off['p50_s']:.3f} s  p99 {off['p99_s']:.3f} s  "
        f"spend {off['spend_usd']:.3f} USD ({off['requests']} requests)"
    )
    print(
        f"hedging on:  p50 {on['p50_s']:.3f} s  p99 {on['p99_s']:.3f} s  "
        f"spend {on['spend_usd']:.3f} USD, {on['hedges']} hedges"
    )
    print(
        f"p99 ratio on/off: {figures['p99_ratio']:.2f}  spend ratio: {figures['spend_ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
