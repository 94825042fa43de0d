"""One edit request from parsed inputs to its answer: admitted against its key's limits,
served from the cache or coalesced with an identical request in flight, held under its
Idempotency-Key, upscaled, and billed. No HTTP here: the route and a batch line's runner
both call `EditService.edit` and make their own answer of the `Edited` it returns."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from gateway.accounts import Accounts, Bill
from gateway.cache import CachedResult, ResultCache, cache_key
from gateway.catalog import ModelCatalog
from gateway.config import CacheConfig, OutputConfig
from gateway.errors import (
    IdempotencyGone,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    ResultsUnavailable,
)
from gateway.fetch import ImageFetcher
from gateway.idempotency import Idempotency, Journal, fingerprint
from gateway.params import UpscaleParams
from gateway.results import FileResultStore
from gateway.routing.preferences import Preferences
from gateway.routing.router import Router
from gateway.service.answer import Edited, upscale_headers
from gateway.service.estimate import estimate
from gateway.upscale import Upscaled, UpscaleFailed, Upscaler


class EditInput(Protocol):
    """An edit request's fields and its image: bytes, or a reference (an https URL or a data
    URI) to load. The API's parsed body is one; a batch line is another."""

    @property
    def fields(self) -> Mapping[str, Any]: ...
    @property
    def image(self) -> bytes | None: ...
    @property
    def image_ref(self) -> str | None: ...


def pin_model(catalog: ModelCatalog, params: UpscaleParams, prefs: Preferences) -> Preferences:
    """Check the request's model, and route a model id that pins a provider to it alone."""
    if params.model not in catalog.ids:
        raise NotFound(
            f"The model '{params.model[:100]}' does not exist; this gateway serves "
            f"'{catalog.model.id}'.",
            param="model",
            code="model_not_found",
        )
    pinned = catalog.pinned.get(params.model)
    if pinned is None:
        return prefs
    # As provider.only=[pinned], within what the request allows.
    if (prefs.only is not None and pinned not in prefs.only) or pinned in prefs.ignore:
        raise InvalidRequest(
            f"The model '{params.model}' is served only through {pinned}, which the "
            "request's 'provider' preferences exclude.",
            param="provider",
        )
    return replace(prefs, only=frozenset({pinned}))


class EditService:
    def __init__(
        self,
        *,
        router: Router,
        upscaler: Upscaler,
        fetcher: ImageFetcher,
        results: FileResultStore,
        cache: ResultCache,
        idempotency: Idempotency,
        accounts: Accounts,
        cache_config: CacheConfig,
        output: OutputConfig,
        replay_ttl_s: float,  # how long a replay may come: its result files are kept so long
    ):
        self._router = router
        self._upscaler = upscaler
        self._fetcher = fetcher
        self._results = results
        self._cache = cache
        self._idempotency = idempotency
        self._accounts = accounts
        self._cache_config = cache_config
        self._output = output
        self._replay_ttl_s = replay_ttl_s

    @property
    def providers(self) -> tuple[str, ...]:
        """The provider names a request's `provider` preferences may use."""
        return self._router.names

    def result_path(self, file_id: str) -> Path | None:
        """A result file, from the results store or the cache's."""
        return self._results.path(file_id) or self._cache.files.path(file_id)

    async def edit(
        self,
        body: EditInput,
        params: UpscaleParams,
        prefs: Preferences,
        account: str,
        request_id: str,
        idempotency_key: str | None = None,
    ) -> Edited:
        if idempotency_key is None:
            return await self._serve(body, params, prefs, account, request_id)
        return await self._idempotent(idempotency_key, body, params, prefs, account, request_id)

    async def estimate(
        self,
        body: EditInput,
        params: UpscaleParams,
        prefs: Preferences,
        request_id: str,
        account: str = "",
    ) -> dict[str, Any]:
        """The dryRun answer: the request validated and planned as a real one would be, and
        what it would cost, without calling a provider, holding budget or spending."""
        data = await self._load(body)  # its image work waits in its key's queue
        source = await self._upscaler.prepare(data, prefs, params, account=account)
        plan = await self._router.plan(
            prefs, params.required_flags(), request_id, source.prepared.unfit
        )
        return estimate(params.model, params.n, [(c.entry.name, c.entry.price_usd) for c in plan])

    async def _load(self, body: EditInput) -> bytes:
        return (
            body.image if body.image is not None else await self._fetcher.load(body.image_ref or "")
        )

    async def _idempotent(
        self,
        header: str,
        body: EditInput,
        params: UpscaleParams,
        prefs: Preferences,
        account: str,
        request_id: str,
    ) -> Edited:
        key = self._idempotency.scoped(header, account)
        print_ = fingerprint(
            body.image if body.image is not None else body.image_ref or "", body.fields
        )
        claimed = await self._idempotency.claim(key, print_)
        stored = claimed.stored
        if stored is not None:
            # Already served (and billed) once: the same images, costing nothing more (the
            # caller signs their URLs afresh: the first ones may have expired).
            if any(self.result_path(f) is None for f in stored.result.files):
                if stored.result.disk not in ("", self._cache.disk):
                    raise ResultsUnavailable(  # retryable: a balancer may send it to that replica
                        "This request's result is on another replica's disk; retry (give the "
                        "replicas a shared results directory to serve it from any).",
                        code="results_storage_unavailable",
                    )
                raise IdempotencyGone(
                    "The request with this Idempotency-Key was served, but its result has "
                    "since expired; send it with a new key.",
                    param="Idempotency-Key",
                )
            headers = {
                **stored.headers,
                "x-upscale-cost-usd": f"{0:.6f}",
                "idempotent-replayed": "true",
            }
            return await self._answer(params, stored.result, None, headers)
        journal = claimed.journal
        assert journal is not None
        try:
            async with self._idempotency.held(journal):
                edited = await self._serve(body, params, prefs, account, request_id, journal)
        except BaseException:
            # Failed: nothing to replay, so the client's retry may run.
            await asyncio.shield(self._idempotency.release(journal))
            raise
        for file_id in edited.files:  # a replay may come after the results' own lifetime
            await self._results.keep(file_id, self._replay_ttl_s)
            await self._cache.files.keep(file_id, self._replay_ttl_s)
        kept = {k: v for k, v in edited.headers.items() if k.startswith("x-upscale-")}
        await self._idempotency.finish(journal, edited.stored, kept.items())
        return edited

    async def _serve(
        self,
        body: EditInput,
        params: UpscaleParams,
        prefs: Preferences,
        account: str,
        request_id: str,
        journal: Journal | None = None,
    ) -> Edited:
        """Admit the request against its key's limits, then answer it from the cache or run it."""
        worst, cheapest = await self._router.prices(prefs)
        n = params.n
        async with self._accounts.admitted(account, worst * n, cheapest * n) as bill:
            if bill.cheapest_only:  # near the budget: only what the lease holds may be spent
                prefs = replace(prefs, max_price=cheapest, hedge=False)
            data = await self._load(body)
            if not (self._cache_config.enabled and params.cache is not False):
                result = await self._upscale(
                    data, params, prefs, bill, request_id, journal, account=account
                )
                # A file only where a URL will name it, or a replay will read it.
                keep = params.response_format == "url" or journal is not None
                files = (
                    [await self._results.put(i.data, i.output_format) for i in result.images]
                    if keep
                    else []
                )
                stored = CachedResult.of(files, result.images, result.providers, self._cache.disk)
                headers = upscale_headers(result, "bypass")
                return await self._answer(params, stored, result, headers)
            scope = account if self._cache_config.scope == "key" else ""
            key = cache_key(data, params, self._output, scope)
            async with self._cache.slot(key, prefs) as slot:
                if slot.entry is not None:
                    bill.counts["cache_hits"] += 1
                    headers = upscale_headers(None, slot.kind, slot.entry.providers)
                    return await self._answer(params, slot.entry, None, headers)
                result = await self._upscale(
                    data, params, prefs, bill, request_id, journal, account=account
                )
                entry = await self._cache.fill(slot, result.images, result.providers)
                return await self._answer(params, entry, result, upscale_headers(result, slot.kind))

    async def _upscale(
        self,
        data: bytes,
        params: UpscaleParams,
        prefs: Preferences,
        bill: Bill,
        request_id: str,
        journal: Journal | None,
        *,
        account: str,  # whose image work it is: the workers share their slots fairly
    ) -> Upscaled:
        source = await self._upscaler.prepare(data, prefs, params, account=account)
        try:
            result = await self._upscaler.run(
                source, params, prefs, request_id, bill.spend, journal, account=account
            )
        except InvalidRequest as exc:
            if exc.code == "image_unsupported_by_providers" and bill.cheapest_only:
                # The budget left the cheapest provider only, and it cannot take this image: a
                # dearer one that can was held back by the budget, not by the image.
                required = params.required_flags()
                fit = ", ".join(
                    e.name
                    for e in self._router.providers
                    if e.name in source.prepared.inputs and required <= e.supports
                )
                if fit:
                    raise QuotaExceeded(
                        f"The budget left covers only the cheapest provider, which cannot take "
                        f"this image ({exc}); {fit} could, at a higher price.",
                    ) from None
            raise
        except UpscaleFailed as failed:
            error = copy.copy(failed.error)  # this request's headers on its own error
            error.headers = {
                **failed.error.headers,
                "x-upscale-attempts": ",".join(a.header() for a in failed.attempts),
                "x-upscale-cost-usd": f"{failed.spend.usd:.6f}",
            }
            raise error from None
        for provider in result.providers:
            bill.served(provider)
        return result

    async def _answer(
        self,
        params: UpscaleParams,
        stored: CachedResult,
        result: Upscaled | None,
        headers: dict[str, str],
    ) -> Edited:
        """The answer, with the images' bytes when they are inlined: those in hand, or (a
        cache hit, a replay) read back while the request still holds its claims."""
        if params.response_format != "b64_json":
            return Edited(stored, headers)
        if result is not None:
            return Edited(stored, headers, [i.data for i in result.images])
        paths = [self.result_path(f) for f in stored.files]
        if any(p is None for p in paths):
            raise ResultsUnavailable(
                "A stored image was evicted while being served; retry.",
                code="results_storage_unavailable",
            )
        blobs = await asyncio.to_thread(lambda: [p.read_bytes() for p in paths if p])
        return Edited(stored, headers, blobs)
