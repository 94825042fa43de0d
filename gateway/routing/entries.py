"""What routing knows of a provider (never its module), and what it reports per attempt."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.base import Adapter


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    name: str
    adapter: Adapter
    price_usd: float
    supports: frozenset[str]
    attempt_timeout_s: float = 60.0


@dataclass(slots=True)
class Attempt:
    provider: str
    outcome: str  # "ok", "cancelled", or the error class, e.g. "ProviderTimeout"
    seconds: float
    detail: str = ""
    hedge: bool = False
    probe: bool = False

    def header(self) -> str:
        marks = "".join(m for m, on in (("+hedge", self.hedge), ("+probe", self.probe)) if on)
        return f"{self.provider}={self.outcome}{marks}"
