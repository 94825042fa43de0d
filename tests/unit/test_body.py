from __future__ import annotations

import pytest

from gateway.api.body import unflatten
from gateway.errors import InvalidRequest


def test_bracket_notation_as_the_sdks_send_extra_body() -> None:
    items = [
        ("provider[only][]", "replicate"),
        ("provider[only][]", "fal"),
        ("provider[max_price]", "0.005"),
        ("scale_factor", "2"),
    ]
    assert unflatten(items) == {
        "provider": {"only": ["replicate", "fal"], "max_price": "0.005"},
        "scale_factor": "2",
    }


def test_lists_of_objects() -> None:
    assert unflatten([("a[][b]", "1"), ("a[][b]", "2")]) == {"a": [{"b": "1"}, {"b": "2"}]}


@pytest.mark.parametrize(
    "items",
    [[("a", "1"), ("a[b]", "2")], [("a[]", "1"), ("a[b]", "2")], [("a]b", "1")]],
)
def test_conflicts_and_malformed_keys_are_400(items: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidRequest):
        unflatten(items)
