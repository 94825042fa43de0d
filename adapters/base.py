"""The adapter contract: one provider's wire protocol behind one small interface.

An adapter turns an `UpscaleJob` (an image in a format its provider takes, and the
provider-neutral options) into a
`ProviderResult` (the provider's output image bytes and its native size) or raises a
`ProviderError`. It knows nothing about routing, prices or other providers; the router
decides what to try next from the error's class and its `retryable` flag.

Adapters receive their `httpx.AsyncClient` from outside, so a unit test can pass
`httpx.MockTransport(handler)` and the app can share one pooled client per provider::

    class EchoAdapter:
        name = "echo"

        async def upscale(self, job: UpscaleJob) -> ProviderResult:
            return ProviderResult(image=job.image, content_type=job.mime,
                                  provider_job_id="echo-1")

        async def aclose(self) -> None: ...

Money: a provider bills jobs, not attempts. An adapter calls `job.billed(provider, job_id)`
once a job reached a state its provider charges for (it succeeded, even when its output then
proves unusable, or the provider accepted it in an answer we cannot read), and hands every
follow-up that may still find a charge (cancelling an abandoned job and confirming how it
ended) to `job.pending(task)`, so the request's bill waits for it.

Error taxonomy (what the router does with each)::

    ProviderError                 retryable unless said otherwise: try the next provider
     +-- ProviderTimeout          the provider did not answer in time (job cancelled)
     +-- ProviderRateLimited      429; carries retry_after seconds when the provider says
     +-- ProviderUnavailable      connect errors, 5xx, 402 billing trouble, 401 bad key
     +-- ProviderBadResponse      malformed JSON, a success without a usable image
     +-- ProviderRejected         the caller's own input or content: NOT retryable, never
                                  fails over (another provider would refuse it too)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class Billing(Protocol):
    """Where an adapter reports what its provider bills for one job."""

    def billed(self, provider: str, job_id: str) -> None:
        """The provider charges for this job (reported once per job)."""
        ...

    def pending(self, task: asyncio.Future[Any]) -> None:
        """A follow-up (cancel and confirm) that may still call `billed`."""
        ...


@dataclass(frozen=True, slots=True)
class UpscaleJob:
    """What a provider is asked to do: upscale one image (`image`, of type `mime`: already
    encoded in a format this provider takes, within its size limit)."""

    image: bytes
    width: int
    height: int
    deadline: float  # absolute time.monotonic() by which the adapter must give up
    request_id: str
    # Provider-specific pass-through flags (fal's sync_mode, enable_safety_checker); an
    # adapter sends only the flags its PARAMS table knows and ignores the rest.
    options: dict[str, object] = field(default_factory=dict)
    mime: str = "image/png"
    # The input as each provider is to get it (name -> (bytes, mime)), where it differs
    # from `image`: the router hands each attempt its provider's.
    inputs: Mapping[str, tuple[bytes, str]] = field(default_factory=dict)
    # Jobs providers already accepted for the same request ((provider name, the handle the
    # adapter gave `on_submitted`), at most one per provider): an adapter follows its own
    # instead of submitting, and paying, again.
    resume: tuple[tuple[str, Mapping[str, str]], ...] = ()
    # Called once the provider has accepted the job, with a handle to follow it by.
    on_submitted: Callable[[str, dict[str, str]], Awaitable[bool]] | None = None
    # "low": work that can wait (a batch line); a provider with a queue priority runs it
    # after its live requests, for no change in price.
    priority: str = "normal"
    billing: Billing | None = None
    # False once the request no longer owns its Idempotency-Key's claim (a retry took it
    # over): no new job may be submitted for it, the owner follows the journaled ones.
    may_submit: Callable[[], bool] | None = None

    def billed(self, provider: str, job_id: str) -> None:
        if self.billing is not None:
            self.billing.billed(provider, job_id)

    def pending(self, task: asyncio.Future[Any]) -> None:
        if self.billing is not None:
            self.billing.pending(task)

    def resume_handle(self, provider: str) -> Mapping[str, str] | None:
        return next((handle for name, handle in self.resume if name == provider), None)

    async def submitted(self, provider: str, handle: dict[str, str]) -> bool:
        """Note the accepted job where a retry of the request can follow it; whether it
        was noted (or nothing notes jobs)."""
        if self.on_submitted is None:
            return True
        return await self.on_submitted(provider, handle)

    def claim_lost(self) -> bool:
        """A retry of the request took its Idempotency-Key over: it serves the request now."""
        return self.may_submit is not None and not self.may_submit()

    def handed_over(self, journaled: bool) -> bool:
        """Whether a job given up on is no longer this run's to cancel: it is journaled, and
        the retry that took the request's claim over follows it (and bills it)."""
        return journaled and self.claim_lost()


@dataclass(frozen=True, slots=True)
class ProviderResult:
    image: bytes  # the provider's output file; the gateway reads its real size from it
    content_type: str
    provider_job_id: str
    predict_seconds: float | None = None


class ProviderError(Exception):
    """A provider could not serve the job. `retryable`: another provider may succeed."""

    retryable: bool = True
    status: int = 502

    def __init__(self, provider: str, message: str, *, upstream_status: int | None = None):
        super().__init__(message)
        self.provider = provider
        self.message = message
        self.upstream_status = upstream_status

    def __str__(self) -> str:
        status = f" (HTTP {self.upstream_status})" if self.upstream_status else ""
        return f"{self.provider}: {self.message}{status}"


class ProviderTimeout(ProviderError):
    status = 504


class ProviderRateLimited(ProviderError):
    status = 429

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        upstream_status: int | None = 429,
        retry_after: float | None = None,
    ):
        super().__init__(provider, message, upstream_status=upstream_status)
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    status = 503


class ProviderBadResponse(ProviderError):
    status = 502


class ProviderRejected(ProviderError):
    """The provider refused the input itself (invalid image, content policy)."""

    retryable = False
    status = 400

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        upstream_status: int | None = None,
        code: str = "invalid_image",
    ):
        super().__init__(provider, message, upstream_status=upstream_status)
        self.code = code


@runtime_checkable
class Adapter(Protocol):
    name: str

    async def upscale(self, job: UpscaleJob) -> ProviderResult:
        """Run the job to completion or raise ProviderError. Cancels the provider's job
        itself when it gives up (deadline) or is cancelled."""
        ...

    async def aclose(self) -> None:
        """Release what the adapter owns (not the shared HTTP client)."""
        ...


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    """What an adapter is built from; the gateway fills it from config and environment."""

    name: str
    model: str
    base_url: str
    api_key: str
    poll_initial_s: float = 0.05
    poll_max_s: float = 1.0
    extra: dict[str, object] = field(default_factory=dict)
