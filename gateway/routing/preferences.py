"""Per-request routing preferences, shaped like OpenRouter's `provider` object and sent
through the SDKs' `extra_body` (multipart bracket notation or JSON):
`order`, `only`, `ignore`, `sort`, `max_price`, `allow_fallbacks`, and our `hedge`."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest

# OpenRouter's sort names next to ours.
SORTS = {
    "price": "cheapest",
    "latency": "fastest",
    "cheapest": "cheapest",
    "fastest": "fastest",
    "balanced": "balanced",
    "ordered": "ordered",
}
_KEYS = {"order", "only", "ignore", "sort", "max_price", "allow_fallbacks", "hedge"}
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


@dataclass(frozen=True, slots=True)
class Preferences:
    order: tuple[str, ...] = ()
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    sort: str | None = None
    max_price: float | None = None
    allow_fallbacks: bool = True
    hedge: bool | None = None


def _names(value: Any, param: str, known: Collection[str], text: bool) -> tuple[str, ...]:
    if not text and not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be a list of provider names.", param=param)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, dict):  # bracket notation with explicit indices: a[0]=x
        value = list(value.values())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"'{param}' must be a list of provider names.", param=param)
    unknown = [v for v in value if v not in known]
    if unknown:
        raise InvalidRequest(
            f"Unknown provider {unknown[0]!r} in '{param}'; known: {', '.join(sorted(known))}.",
            param=param,
        )
    return tuple(dict.fromkeys(value))


def _bool(value: Any, param: str, text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise InvalidRequest(f"'{param}' must be true or false.", param=param)


def parse_preferences(raw: Any, known: Collection[str], *, text: bool = True) -> Preferences:
    """`text`: the object came as form fields, where lists, numbers and booleans are written
    as text (`provider[only]=fal,replicate`); in JSON they must be JSON's own."""
    if raw is None or raw == "":
        return Preferences()
    if not isinstance(raw, dict):
        raise InvalidRequest("'provider' must be an object.", param="provider")
    extra = set(raw) - _KEYS
    if extra:
        raise InvalidRequest(
            f"Unknown field 'provider.{sorted(extra)[0]}'; use {', '.join(sorted(_KEYS))}.",
            param=f"provider.{sorted(extra)[0]}",
        )
    prefs: dict[str, Any] = {}
    if "order" in raw:
        prefs["order"] = _names(raw["order"], "provider.order", known, text)
    if "only" in raw:
        prefs["only"] = frozenset(_names(raw["only"], "provider.only", known, text))
    if "ignore" in raw:
        prefs["ignore"] = frozenset(_names(raw["ignore"], "provider.ignore", known, text))
    if "sort" in raw:
        sort = raw["sort"]
        if not isinstance(sort, str) or (sort if not text else sort.lower()) not in SORTS:
            raise InvalidRequest(
                f"'provider.sort' must be one of {', '.join(SORTS)}.", param="provider.sort"
            )
        prefs["sort"] = SORTS[sort.lower()]
    if "max_price" in raw:
        try:
            price = (
                math.nan
                if not text and isinstance(raw["max_price"], str)
                else float(raw["max_price"])
            )
        except (TypeError, ValueError):
            price = math.nan
        if isinstance(raw["max_price"], bool) or not math.isfinite(price) or price < 0:
            raise InvalidRequest(
                "'provider.max_price' must be a non-negative number (USD per image).",
                param="provider.max_price",
            )
        prefs["max_price"] = price
    if "allow_fallbacks" in raw:
        prefs["allow_fallbacks"] = _bool(raw["allow_fallbacks"], "provider.allow_fallbacks", text)
    if "hedge" in raw:
        prefs["hedge"] = _bool(raw["hedge"], "provider.hedge", text)
    return Preferences(**prefs)
