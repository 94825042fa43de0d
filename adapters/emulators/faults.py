"""Fault scripts for the emulators: what goes wrong, how often, and how slow jobs are."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

Rate = float  # a probability per job or request, 0..1

# Each request draws at most one fault, in this order of the cumulative rates.
FAULT_KINDS = (
    "error",
    "rate_limit",
    "hang",
    "malformed",
    "truncated",
    "slow_download",
    "job_failure",
    "content_policy",
    "empty_output",
)


class FaultScript(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(1200, ge=0)  # simulated service time of one job
    jitter_ms: float = Field(400, ge=0)  # uniform +-
    tail_ratio: Rate = Field(0, ge=0, le=1)  # share of jobs that take tail_ms instead
    tail_ms: float = Field(0, ge=0)
    error_rate: Rate = Field(0, ge=0, le=1)  # submit/create answers error_status
    error_status: int = Field(500, ge=400, le=599)
    rate_limit_rate: Rate = Field(0, ge=0, le=1)  # 429 with Retry-After
    retry_after_s: float = Field(1, ge=0)
    hang_rate: Rate = Field(0, ge=0, le=1)  # submit/create does not answer for hang_s
    hang_s: float = Field(3600, ge=0)
    malformed_rate: Rate = Field(0, ge=0, le=1)  # a success whose body is not JSON
    truncated_rate: Rate = Field(0, ge=0, le=1)  # the result file is served cut in half
    slow_download_rate: Rate = Field(0, ge=0, le=1)  # the result file trickles out
    download_bytes_per_s: float = Field(256 * 1024, gt=0)
    job_failure_rate: Rate = Field(0, ge=0, le=1)  # the model fails the job
    content_policy_rate: Rate = Field(0, ge=0, le=1)  # the job is refused for its content
    empty_output_rate: Rate = Field(0, ge=0, le=1)  # success without a usable image
    seed: int | None = None

    def rates(self) -> dict[str, float]:
        return {kind: getattr(self, f"{kind}_rate") for kind in FAULT_KINDS}


class FaultDice:
    """Draws faults and latencies from a script; seeded for repeatable scenarios."""

    def __init__(self, script: FaultScript):
        self.script = script
        self._rng = random.Random(script.seed)

    def replace(self, script: FaultScript) -> None:
        self.script = script
        self._rng = random.Random(script.seed)

    def fault(self) -> str | None:
        u = self._rng.random()
        acc = 0.0
        for kind, rate in self.script.rates().items():
            acc += rate
            if rate and u < acc:
                return kind
        return None

    def latency_s(self) -> float:
        s = self.script
        if s.tail_ratio and self._rng.random() < s.tail_ratio:
            return s.tail_ms / 1000
        jitter = self._rng.uniform(-s.jitter_ms, s.jitter_ms) if s.jitter_ms else 0.0
        return max(0.0, s.latency_ms + jitter) / 1000
