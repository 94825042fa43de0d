"""The error a request gets when every attempt failed: deadline, nonsense, or unavailable."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from adapters.base import (
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    UpscaleJob,
)
from gateway.errors import DeadlineExceeded, GatewayError, NoProviderAvailable, UpstreamBadResponse
from gateway.routing.entries import ProviderEntry


def restricted_note(job: UpscaleJob, providers: Sequence[ProviderEntry]) -> str:
    """Say so when the request's own flags narrowed the candidates, rather than leave the
    caller to think every provider was tried."""
    flags = [
        f
        for f, v in job.options.items()
        if v is True and any(f not in p.supports for p in providers)
    ]
    if not flags:
        return ""
    return f" Only providers that support {', '.join(f'{f}=true' for f in flags)} were eligible."


def exhausted(
    errors: list[ProviderError],
    job: UpscaleJob,
    providers: Sequence[ProviderEntry],
    skipped: Mapping[str, str] | None = None,
) -> GatewayError:
    said = [str(e) for e in errors] + [
        f"{p}: not tried, {why}" for p, why in (skipped or {}).items()
    ]
    reasons = ("; ".join(said) or "no attempt could start") + "."
    reasons += restricted_note(job, providers)
    if time.monotonic() >= job.deadline and (not errors or isinstance(errors[-1], ProviderTimeout)):
        return DeadlineExceeded(
            f"The request deadline passed before a provider answered: {reasons}"
        )
    if errors and all(isinstance(e, ProviderBadResponse) for e in errors):
        return UpstreamBadResponse(f"Every provider answered unusably: {reasons}")
    headers = {}
    waits = [e.retry_after for e in errors if isinstance(e, ProviderRateLimited) and e.retry_after]
    if waits and len(waits) == len(errors):
        headers["retry-after"] = str(max(1, round(min(waits))))
    return NoProviderAvailable(f"No provider could serve the request: {reasons}", headers=headers)
