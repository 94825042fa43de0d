"""The soak: a closed loop of SDK clients for a bounded time against the emulated providers
with a mixed fault script on both, watching the gateway's RSS and open file descriptors.

A failed request is excused when every provider it tried had a fault injected (its
`x-upscale-attempts` shows a failure on each); any other failure is unexplained. At the end,
"ledger = providers' bills" over the whole run (reliability.drills)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.hedging import quantile
from reliability.drills import BASE, QUIET_S, Clients, double_charges, emulators
from reliability.stack import Stack
from tests.integration import reconcile

MIXED_FAL = {
    "error_rate": 0.02,
    "rate_limit_rate": 0.02,
    "retry_after_s": 1,
    "hang_rate": 0.01,
    "malformed_rate": 0.02,
    "truncated_rate": 0.02,
    "slow_download_rate": 0.02,
    "job_failure_rate": 0.02,
}
MIXED_REPLICATE = {
    "error_rate": 0.02,
    "malformed_rate": 0.01,
    "truncated_rate": 0.01,
    "job_failure_rate": 0.02,
}


@dataclass(slots=True)
class SoakResult:
    seconds: float
    concurrency: int
    requests: int
    ok: int
    excused: int
    unexplained: int
    double_charged: int
    p99_s: float
    bills: reconcile.Reconciliation | None = None  # ledger vs bills vs counters
    rss_mib: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def rss_growth(self) -> float:
        """RSS at the end over RSS after the first fifth (warm-up), minus one."""
        settled = self.rss_mib[len(self.rss_mib) // 5]
        return self.rss_mib[-1] / settled - 1 if settled else 0.0

    @property
    def fds_settled(self) -> int:
        """Open files after the warm-up: the pools have grown to the load by then."""
        return self.fds[len(self.fds) // 5]

    @property
    def flat(self) -> bool:
        return self.rss_growth < 0.10 and self.fds[-1] <= self.fds_settled + 8


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class JobWatch:
    """Follows the providers' jobs while they are listed (the emulators keep the newest
    2000), so completed jobs per input are counted over any length of run."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.before = {j["id"] for j in stack.jobs()}
        self.seen: dict[str, dict[str, Any]] = {}

    def poll(self) -> None:
        for job in self.stack.jobs():
            if job["id"] not in self.before:
                self.seen[job["id"]] = job

    def double_charges(self) -> int:
        return double_charges(list(self.seen.values()))


def soak(stack: Stack, seconds: float, concurrency: int, sample_s: float = 5.0) -> SoakResult:
    stack.fal.faults(**{**BASE, **MIXED_FAL})
    stack.replicate.faults(**{**BASE, **MIXED_REPLICATE})
    (replica,) = stack.replicas[:1]
    assert replica.proc is not None
    pid = replica.proc.pid
    clients = Clients(stack, f"soak-{os.getpid()}")
    watch = JobWatch(stack)
    billed_before = reconcile.snapshot(emulators(stack))
    result = SoakResult(seconds, concurrency, 0, 0, 0, 0, 0, 0.0)
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))
    lock = threading.Lock()

    def loop() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(counter)
            clients.send(index)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    while time.monotonic() < deadline:
        result.rss_mib.append(_rss_mib(pid))
        result.fds.append(len(os.listdir(f"/proc/{pid}/fd")))
        watch.poll()
        time.sleep(min(sample_s, max(0.0, deadline - time.monotonic())))
    for worker in workers:
        worker.join()
    clients.close()
    result.bills = reconcile.check(billed_before, emulators(stack), quiet_s=QUIET_S, timeout_s=30)
    watch.poll()
    result.rss_mib.append(_rss_mib(pid))
    result.fds.append(len(os.listdir(f"/proc/{pid}/fd")))
    outcomes = clients.outcomes
    result.ok = outcomes.pop("ok", 0)
    result.requests = result.ok + sum(outcomes.values())
    result.excused = clients.excused()
    result.unexplained = result.requests - result.ok - result.excused
    result.double_charged = watch.double_charges()
    result.p99_s = quantile(clients.waits, 0.99)
    result.errors = outcomes
    return result


def still_serving(stack: Stack) -> bool:
    return all(
        httpx.get(f"{r.url}/healthz", timeout=5).status_code == 200
        for r in stack.replicas
        if r.proc is not None and r.proc.poll() is None
    )
