"""Which providers may serve a request: static filters (flags the request insists on, the
caller's preferences, price) and dynamic ones (circuit, cool-down, operator drain)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from gateway.errors import GatewayError, InvalidRequest, NoProviderAvailable
from gateway.routing.entries import ProviderEntry
from gateway.routing.preferences import Preferences
from gateway.state.base import ProviderRecord


@dataclass(frozen=True, slots=True)
class Candidate:
    entry: ProviderEntry
    record: ProviderRecord
    probe: bool = False  # half-open: may be tried only as the one probe across replicas


class Plan(list[Candidate]):
    """The candidates to try, in order, and why the others were left out (the error of a
    request that fails says why they were not tried)."""

    def __init__(self, candidates: Sequence[Candidate], excluded: dict[str, str]):
        super().__init__(candidates)
        self.excluded = excluded


@dataclass(slots=True)
class Selection:
    candidates: list[Candidate] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # provider -> why


def select(
    entries: Sequence[ProviderEntry],
    records: Mapping[str, ProviderRecord],
    prefs: Preferences,
    required: frozenset[str],
    now: float,
    unfit: Mapping[str, str] | None = None,
) -> Selection:
    """`unfit`: providers that cannot take this request's input, and why."""
    unfit = unfit or {}
    if not entries:
        raise NoProviderAvailable("No provider is configured: set FAL_KEY or REPLICATE_API_TOKEN.")
    pool = [e for e in entries if prefs.only is None or e.name in prefs.only]
    pool = [e for e in pool if e.name not in prefs.ignore]
    if not pool:
        raise InvalidRequest(
            "'provider.only' and 'provider.ignore' leave no provider.",
            param="provider.only" if prefs.only is not None else "provider.ignore",
        )
    pool = [priced(e, records.get(e.name)) for e in pool]
    if prefs.max_price is not None:
        pool = [e for e in pool if e.price_usd <= prefs.max_price]
        if not pool:
            cheapest = min(e.price_usd for e in entries)
            raise InvalidRequest(
                f"No provider costs at most {prefs.max_price:g} USD an image (cheapest: "
                f"{cheapest:g}).",
                param="provider.max_price",
            )
    selection = Selection()
    for entry in pool:
        record = records.get(entry.name) or ProviderRecord(entry.name)
        missing = required - entry.supports
        circuit = record.circuit(now)
        if entry.name in unfit:
            selection.excluded[entry.name] = unfit[entry.name]
        elif missing:
            selection.excluded[entry.name] = f"does not support {', '.join(sorted(missing))}=true"
        elif record.drained:
            selection.excluded[entry.name] = "drained by an operator"
        elif record.cooldown_until > now:
            selection.excluded[entry.name] = (
                f"rate limited, cooling down for {record.cooldown_until - now:.0f} s"
            )
        elif circuit == "open":
            selection.excluded[entry.name] = (
                f"circuit open for {record.open_until - now:.0f} s more after "
                f"{record.consecutive_failures} failures (last: {record.last_error or 'n/a'})"
            )
        else:
            selection.candidates.append(Candidate(entry, record, probe=circuit == "half_open"))
    static = {
        e.name: selection.excluded[e.name] for e in pool if e.name in unfit or required - e.supports
    }
    if unfit and len(static) == len(pool):
        # Not a matter of health (the input, or a flag the request insists on): no retry
        # helps, and nothing was sent or billed.
        reasons = "; ".join(
            f"{name}: {why}" if name not in unfit else why for name, why in static.items()
        )
        raise InvalidRequest(
            f"No provider this request may use can take this image: {reasons}.",
            param="image",
            code="image_unsupported_by_providers",
        )
    return selection


def priced(entry: ProviderEntry, record: ProviderRecord | None) -> ProviderEntry:
    """The entry at an operator's price (set through the admin API), if one is set."""
    if record is None or record.price_usd is None or record.price_usd == entry.price_usd:
        return entry
    return replace(entry, price_usd=record.price_usd)


def allowed(entries: Sequence[ProviderEntry], prefs: Preferences) -> list[ProviderEntry]:
    """The entries a request's preferences admit (no health or flags considered)."""
    return [
        e
        for e in entries
        if (prefs.only is None or e.name in prefs.only)
        and e.name not in prefs.ignore
        and (prefs.max_price is None or e.price_usd <= prefs.max_price)
    ]


def price_bounds(
    entries: Sequence[ProviderEntry],
    records: Mapping[str, ProviderRecord],
    prefs: Preferences,
    hedge: bool,
) -> tuple[float, float]:
    """What one image may cost under these preferences: at worst the dearest provider (the
    two dearest when a hedge may run beside the first attempt), at least the cheapest."""
    prices = sorted(
        (e.price_usd for e in allowed([priced(e, records.get(e.name)) for e in entries], prefs)),
        reverse=True,
    )
    if not prices:
        return 0.0, 0.0
    return (sum(prices[:2]) if hedge else prices[0]), prices[-1]


def unavailable(
    selection: Selection,
    required: frozenset[str],
    now: float,
    records: Mapping[str, ProviderRecord],
) -> GatewayError:
    """The 503 for a request no provider can serve right now, saying why for each."""
    reasons = "; ".join(f"{name}: {why}" for name, why in selection.excluded.items())
    flags = ", ".join(f"{f}=true" for f in sorted(required))
    lead = (
        f"No healthy provider supports {flags}"
        if flags
        else "No provider can serve the request now"
    )
    waits = [r.open_until - now for r in records.values() if r.open_until > now]
    waits += [r.cooldown_until - now for r in records.values() if r.cooldown_until > now]
    headers = {"retry-after": str(max(1, round(min(waits))))} if waits else {}
    return NoProviderAvailable(f"{lead}: {reasons}.", headers=headers)
