from __future__ import annotations

import random

import pytest

from gateway.config import WeightsConfig
from gateway.errors import InvalidRequest
from gateway.routing.candidates import Candidate
from gateway.routing.entries import ProviderEntry
from gateway.routing.preferences import Preferences, parse_preferences
from gateway.routing.scoring import rank
from gateway.state.base import ProviderRecord, percentile

KNOWN = ("fal", "replicate")


def test_bracket_notation_values_parse() -> None:
    prefs = parse_preferences(
        {
            "only": ["replicate"],
            "max_price": "0.005",
            "allow_fallbacks": "false",
            "sort": "latency",
            "order": {"0": "replicate", "1": "fal"},
            "hedge": "true",
        },
        KNOWN,
    )
    assert prefs == Preferences(
        order=("replicate", "fal"),
        only=frozenset({"replicate"}),
        sort="fastest",
        max_price=0.005,
        allow_fallbacks=False,
        hedge=True,
    )
    assert parse_preferences(None, KNOWN) == Preferences()
    assert parse_preferences({"ignore": "fal"}, KNOWN).ignore == frozenset({"fal"})


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ("fal", "provider"),
        ({"only": ["openai"]}, "provider.only"),
        ({"ignore": [3]}, "provider.ignore"),
        ({"order": ["x"]}, "provider.order"),
        ({"sort": "random"}, "provider.sort"),
        ({"max_price": "cheap"}, "provider.max_price"),
        ({"max_price": -1}, "provider.max_price"),
        ({"max_price": True}, "provider.max_price"),
        ({"allow_fallbacks": "sometimes"}, "provider.allow_fallbacks"),
        ({"quantizations": ["fp8"]}, "provider.quantizations"),
    ],
)
def test_invalid_preferences_name_their_param(raw: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_preferences(raw, KNOWN)
    assert err.value.param == param


def candidate(
    name: str, price: float, p95: float | None = None, fail: int = 0, recovered_at: float = 0.0
) -> Candidate:
    entry = ProviderEntry(name, object(), price, frozenset())  # type: ignore[arg-type]
    record = ProviderRecord(name, p95_s=p95, successes=10, failures=fail, recovered_at=recovered_at)
    return Candidate(entry, record)


def names(ranked: list[Candidate]) -> list[str]:
    return [c.entry.name for c in ranked]


def test_strategies() -> None:
    fal, rep = candidate("fal", 0.004, p95=3.0), candidate("replicate", 0.006, p95=0.3)
    weights = WeightsConfig()
    assert names(rank([rep, fal], "cheapest", weights)) == ["fal", "replicate"]
    assert names(rank([fal, rep], "fastest", weights)) == ["replicate", "fal"]
    assert names(rank([fal, rep], "ordered", weights)) == ["fal", "replicate"]
    assert names(rank([fal, rep], "balanced", weights)) == ["replicate", "fal"]
    flaky = candidate("replicate", 0.006, p95=0.3, fail=10)
    assert names(rank([fal, flaky], "balanced", weights)) == ["fal", "replicate"]
    assert names(rank([fal, rep], "cheapest", weights, order=("replicate",))) == [
        "replicate",
        "fal",
    ]


def test_unmeasured_provider_is_tried_by_fastest() -> None:
    measured, new = candidate("fal", 0.004, p95=1.0), candidate("replicate", 0.006)
    assert names(rank([measured, new], "fastest", WeightsConfig())) == ["replicate", "fal"]


def test_exploration_only_for_recently_recovered() -> None:
    fal, rep = candidate("fal", 0.004), candidate("replicate", 0.006, recovered_at=1000.0)
    rng = random.Random(0)
    picks = [
        names(
            rank([fal, rep], "cheapest", WeightsConfig(), rng=rng, explore_share=0.2, now=1010.0)
        )[0]
        for _ in range(1000)
    ]
    assert 120 < picks.count("replicate") < 280
    stale = [
        names(
            rank([fal, rep], "cheapest", WeightsConfig(), rng=rng, explore_share=0.2, now=5000.0)
        )[0]
        for _ in range(200)
    ]
    assert stale.count("replicate") == 0


def test_percentile_interpolates() -> None:
    histogram = [0] * 22
    histogram[3] = 90  # 0.1..0.2 s
    histogram[11] = 10  # 3..5 s
    assert 0.1 <= (percentile(histogram, 0.5) or 0) <= 0.2
    assert 3.0 <= (percentile(histogram, 0.95) or 0) <= 5.0
    assert percentile([0] * 22, 0.5) is None
