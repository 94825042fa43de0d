"""How late the event loop runs: a probe task that asks to wake every `interval_s` and
measures how much later it woke. Any callback that holds the loop (a multi-megabyte
encode, a hash, a long parse) shows up here as lateness, whatever request it belongs to."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

INTERVAL_S = 0.01  # a stall longer than this cannot slip between two wake-ups unseen

Sink = Callable[[float], None]


class LoopLagProbe:
    def __init__(self, sinks: list[Sink], interval_s: float = INTERVAL_S):
        self._sinks = sinks
        self._interval_s = interval_s

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self._interval_s
            await asyncio.sleep(self._interval_s)
            late = max(0.0, loop.time() - due)
            for sink in self._sinks:
                sink(late)
