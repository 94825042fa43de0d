"""Prometheus collectors, in one place, on a registry of the app's own (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.state.base import LATENCY_BOUNDS

BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "upscale_provider_requests",
            "Provider attempts by outcome (ok, error class, cancelled).",
            ["provider", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "upscale_provider_latency_seconds",
            "Provider time of successful attempts.",
            ["provider"],
            buckets=LATENCY_BOUNDS[:-1],
            registry=r,
        )
        self.failovers = Counter(
            "upscale_failovers",
            "Requests moved on to another provider after a failure.",
            ["from_provider"],
            registry=r,
        )
        self.hedges = Counter(
            "upscale_hedges",
            "Hedged attempts: started, won, lost, or denied by the budget.",
            ["outcome"],
            registry=r,
        )
        self.breaker = Gauge(
            "upscale_breaker_state",
            "Circuit per provider: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=r,
        )
        self.spend = Counter(
            "upscale_spend_usd",
            "Spend in USD by provider (hedge losers included).",
            ["provider"],
            registry=r,
        )
        self.requests = Counter(
            "upscale_requests", "Upscale requests by HTTP status.", ["status"], registry=r
        )
        self.store_degraded = Gauge(
            "upscale_state_store_degraded",
            "1 while the shared state store is unreachable.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
