"""The dryRun estimate: what a request would cost on the plan routing made for it (the
request validated as a real one would be, its image measured), without calling a provider,
holding budget or spending."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.accounts import micros


def estimate(model: str, n: int, plan: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """`plan`: (provider, USD per image) in the order routing would try them; not empty (a
    plan with no candidate is an error the router raises)."""
    lead, price = plan[0]
    unit = micros(price)
    return {
        "estimated": True,
        "model": model,
        "provider": lead,
        "total_cost_micros": unit * n,
        "currency": "USD",
        "components": [
            {
                "type": "image",
                "provider": lead,
                "quantity": n,
                "unit_cost_micros": unit,
                "cost_micros": unit * n,
            }
        ],
        # If the first provider fails, a fallback may cost more (at most this per image).
        "fallbacks": [name for name, _ in plan[1:]],
        "max_cost_micros": max(micros(p) for _, p in plan) * n,
    }
