"""The one place that maps an adapter name from config onto its implementation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx

from adapters import fal, replicate
from adapters.base import Adapter, AdapterSettings


@dataclass(frozen=True, slots=True)
class AdapterKind:
    build: Callable[[AdapterSettings, httpx.AsyncClient], Adapter]
    supports: frozenset[str]  # request flags this provider can honour
    key_env: str
    url_env: str
    default_url: str
    emulator: str  # factory in adapters.emulators, for sandbox mode


ADAPTERS: dict[str, AdapterKind] = {
    "fal": AdapterKind(
        fal.FalAdapter,
        fal.SUPPORTS,
        "FAL_KEY",
        "GATEWAY_FAL_URL",
        "https://queue.fal.run",
        "create_fal_app",
    ),
    "replicate": AdapterKind(
        replicate.ReplicateAdapter,
        replicate.SUPPORTS,
        "REPLICATE_API_TOKEN",
        "GATEWAY_REPLICATE_URL",
        "https://api.replicate.com",
        "create_replicate_app",
    ),
}
