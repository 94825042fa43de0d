"""Ordering candidates by strategy: cheapest, fastest (p95), balanced (weighted normalised
price, p95 latency and recent error rate) or ordered (config order); the caller's `order`
goes first; a small exploration share sends a recently recovered provider first, so that
fresh measurements can win it traffic back."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.config import WeightsConfig
from gateway.routing.candidates import Candidate


def _latency(c: Candidate) -> float:
    # Unmeasured providers count as fast so that they get measured (the warm-up).
    return c.record.p95_s if c.record.p95_s is not None else (c.record.ewma_s or 0.0)


def _balanced_key(candidates: Sequence[Candidate], weights: WeightsConfig):  # type: ignore[no-untyped-def]
    top_price = max(c.entry.price_usd for c in candidates) or 1.0
    top_latency = max(_latency(c) for c in candidates) or 1.0

    def key(c: Candidate) -> float:
        return (
            weights.price * c.entry.price_usd / top_price
            + weights.latency * _latency(c) / top_latency
            + weights.errors * c.record.error_rate
        )

    return key


def rank(
    candidates: Sequence[Candidate],
    strategy: str,
    weights: WeightsConfig,
    order: Sequence[str] = (),
    rng: random.Random | None = None,
    explore_share: float = 0.0,
    now: float = 0.0,
    recent_s: float = 60.0,
) -> list[Candidate]:
    ranked = list(candidates)  # config order: the `ordered` strategy and every tie-break
    if strategy == "cheapest":
        ranked.sort(key=lambda c: (c.entry.price_usd, _latency(c)))
    elif strategy == "fastest":
        ranked.sort(key=lambda c: (_latency(c), c.entry.price_usd))
    elif strategy == "balanced":
        ranked.sort(key=_balanced_key(ranked, weights))
    if order:
        position = {name: i for i, name in enumerate(order)}
        ranked.sort(key=lambda c: position.get(c.entry.name, len(position)))
    elif rng is not None and explore_share:
        recovered = [c for c in ranked[1:] if now - c.record.recovered_at < recent_s]
        if recovered and rng.random() < explore_share:
            chosen = rng.choice(recovered)
            ranked.remove(chosen)
            ranked.insert(0, chosen)
    return ranked
