"""One edit request from parsed inputs to its answer: admitted against its key's limits,
served from the cache or coalesced with an identical request in flight, held under its
Idempotency-Key, upscaled, and billed. No HTTP here: the route and a batch line's runner
both call `EditService.edit` and make their own answer of the `Edited` it returns."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
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
from gateway.imaging import FinishedImage
from gateway.params import UpscaleParams
from gateway.results import Blob, Delivery, ResultStore
from gateway.results.base import PAID_PUT_S, put_paid, unavailable
from gateway.routing.preferences import Preferences
from gateway.routing.router import Router
from gateway.service.answer import Edited, upscale_headers
from gateway.service.estimate import estimate
from gateway.upscale import Upscaled, UpscaleFailed, Upscaler

log = logging.getLogger("gateway.service")


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
        results: ResultStore,
        cache: ResultCache,
        idempotency: Idempotency,
        accounts: Accounts,
        cache_config: CacheConfig,
        output: OutputConfig,
        replay_ttl_s: float,  # how long a replay may come: its result files are kept so long
        delivery: Delivery | None = None,  # presigned URLs for `url` answers; None: proxied
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
        self._delivery = delivery

    @property
    def providers(self) -> tuple[str, ...]:
        """The provider names a request's `provider` preferences may use."""
        return self._router.names

    async def _locate(self, file_id: str) -> ResultStore | None:
        """The store a result file is in: the results' or the cache's."""
        for store in (self._results, self._cache.files):
            if await store.exists(file_id):
                return store
        return None

    async def open_result(self, file_id: str, *, body: bool = True) -> Blob | None:
        """A result file to deliver (GET /v1/files/{id}/content), from either store."""
        for store in (self._results, self._cache.files):
            blob = await store.open_blob(file_id, body=body)
            if blob is not None:
                return blob
        return None

    def _refuse_if_store_down(self, params: UpscaleParams, idempotent: bool) -> None:
        """Work whose answer needs the store (a `url`, a replay to keep) is refused while
        the store is known to be down, before a provider is paid for an image that could
        not be kept. b64_json without a key runs on, without the cache."""
        if self._results.health.ok:
            return
        if params.response_format == "url" or idempotent:
            raise unavailable()

    async def edit(
        self,
        body: EditInput,
        params: UpscaleParams,
        prefs: Preferences,
        account: str,
        request_id: str,
        idempotency_key: str | None = None,
    ) -> Edited:
        self._refuse_if_store_down(params, idempotency_key is not None)
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
            located = [await self._locate(f) for f in stored.result.files]
            if any(where is None for where in located):
                if stored.result.disk not in ("", self._cache.disk):
                    raise ResultsUnavailable(  # retryable: a balancer may send it to that replica
                        "This request's result is on another replica's disk; retry (give the "
                        "replicas a shared results store to serve it from any).",
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
                # what the first answer billed (a batch's spend counts it)
                "x-upscale-first-cost-usd": stored.headers.get("x-upscale-cost-usd", "0"),
                "idempotent-replayed": "true",
            }
            return await self._answer(
                params, stored.result, None, headers, located[0] if located else None
            )
        journal = claimed.journal
        assert journal is not None
        try:
            async with self._idempotency.held(journal):
                edited = await self._serve(body, params, prefs, account, request_id, journal)
        except ResultsUnavailable:
            # The provider may have billed an image the store could not keep: the claim is
            # handed over with its journal, so the client's retry (any replica) takes it at
            # once and follows the job already paid for instead of paying for another.
            await asyncio.shield(self._idempotency.hand_over(journal))
            raise
        except asyncio.CancelledError:
            # The client went away, or the request's time ran out, possibly after a provider
            # billed a job (a paid result waiting out a store outage): a noted job is handed
            # over for the retry to follow, not paid for again.
            ending = (
                self._idempotency.hand_over(journal)
                if journal.noted
                else self._idempotency.release(journal)
            )
            await asyncio.shield(ending)
            raise
        except BaseException:
            # Failed: nothing to replay, so the client's retry may run.
            await asyncio.shield(self._idempotency.release(journal))
            raise
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
            # While the store is down a b64_json request runs without it (refused otherwise).
            cached = self._cache_config.enabled and params.cache is not False
            if not (cached and self._results.health.ok):
                result = await self._upscale(
                    data, params, prefs, bill, request_id, journal, account=account
                )
                # A file only where a URL will name it, or a replay will read it.
                keep = params.response_format == "url" or journal is not None
                until = time.monotonic() + PAID_PUT_S  # for all the images together
                pin_s = self._replay_ttl_s if journal is not None else None
                files = (
                    [
                        await self._keep_paid(self._results, i, request_id, until, pin_s)
                        for i in result.images
                    ]
                    if keep
                    else []
                )
                stored = CachedResult.of(files, result.images, result.providers, self._cache.disk)
                headers = upscale_headers(result, "bypass")
                return await self._answer(params, stored, result, headers, self._results)
            scope = account if self._cache_config.scope == "key" else ""
            key = cache_key(data, params, self._output, scope)
            async with self._cache.slot(key, prefs) as slot:
                if slot.entry is not None:
                    if journal is not None:  # a replay may come after the entry's lifetime
                        for file_id in slot.entry.files:  # (a miss pins its files at the put)
                            await self._cache.files.pin(file_id, self._replay_ttl_s)
                    bill.counts["cache_hits"] += 1
                    headers = upscale_headers(None, slot.kind, slot.entry.providers)
                    return await self._answer(params, slot.entry, None, headers, self._cache.files)
                result = await self._upscale(
                    data, params, prefs, bill, request_id, journal, account=account
                )
                # A b64_json answer without a key needs no file: it is answered inline at
                # once if the store fails; any other waits out a short outage.
                inline = params.response_format == "b64_json" and journal is None
                try:
                    entry = await self._cache.fill(
                        slot,
                        result.images,
                        result.providers,
                        0.0 if inline else PAID_PUT_S,
                        self._replay_ttl_s if journal is not None else None,
                    )
                except ResultsUnavailable:
                    if not inline:
                        log.error(
                            "request %s: a result the provider billed could not be stored",
                            request_id,
                        )
                        raise
                    # Paid for and in hand: answered inline rather than a 503 whose retry
                    # (no Idempotency-Key to follow the job) would pay again.
                    slot.unfilled = True
                    entry = CachedResult.of([], result.images, result.providers, self._cache.disk)
                    return await self._answer(
                        params, entry, result, upscale_headers(result, "bypass")
                    )
                headers = upscale_headers(result, slot.kind)
                return await self._answer(params, entry, result, headers, self._cache.files)

    @staticmethod
    async def _keep_paid(
        store: ResultStore,
        image: FinishedImage,
        request_id: str,
        until: float,
        pin_s: float | None,
    ) -> str:
        try:
            return await put_paid(store, image.data, image.output_format, until, pin_s)
        except ResultsUnavailable:
            log.error("request %s: a result the provider billed could not be stored", request_id)
            raise

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
        store: ResultStore | None = None,  # where `stored`'s files are
    ) -> Edited:
        """The answer, with the images' bytes when they are inlined: those in hand, or (a
        cache hit, a replay) read back while the request still holds its claims."""
        if params.response_format != "b64_json":
            if self._delivery is not None and store is not None:
                await self._delivery.prepare(store, stored.files)
            return Edited(stored, headers)
        if result is not None:
            return Edited(stored, headers, [i.data for i in result.images])
        blobs = [await store.read(f) if store else None for f in stored.files]
        if any(b is None for b in blobs):
            raise ResultsUnavailable(
                "A stored image was evicted while being served; retry.",
                code="results_storage_unavailable",
            )
        return Edited(stored, headers, [b for b in blobs if b is not None])
