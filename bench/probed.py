"""The gateway exactly as `python -m gateway` serves it, with one more route for the
benchmarks: GET /_bench/lag answers the event-loop probe's samples (seconds late, one per
10 ms) taken since the last GET, and forgets them. The samples come from the gateway's own
probe (gateway/looplag.py), which also feeds gateway_event_loop_lag_seconds. With them come
the garbage collector's pauses over the same time (`gc`: [generation, seconds] each), the
one kind of stall no request's code makes.

    python -m bench.probed --port 8093
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

from fastapi import FastAPI

import gateway.__main__ as entry
from gateway.app import create_app
from gateway.settings import Settings


def probed_app(settings: Settings | None = None) -> FastAPI:
    app = create_app(settings)
    samples: list[float] = []
    app.state.lag_sinks = [samples.append]
    pauses: list[tuple[int, float]] = []
    began = [0.0]

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append((int(info["generation"]), time.perf_counter() - began[0]))

    gc.callbacks.append(timed)

    @app.get("/_bench/lag", include_in_schema=False)
    async def lag() -> dict[str, list[Any]]:
        taken, collected = samples[:], pauses[:]
        samples.clear()
        pauses.clear()
        return {"samples": taken, "gc": collected}

    return app


if __name__ == "__main__":
    entry.create_app = probed_app  # type: ignore[assignment]
    entry.main(sys.argv[1:])
