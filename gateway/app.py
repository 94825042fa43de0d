"""create_app(settings): the one place that knows every part and wires them together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI

from adapters.base import Adapter, AdapterSettings
from adapters.registry import ADAPTERS
from gateway import __version__
from gateway.accounts import Accounts
from gateway.api import (
    admin,
    batches,
    docs,
    files,
    health,
    images,
    landing,
    models,
    openapi,
    playground,
    status,
    usage,
)
from gateway.api.body import BodyBudget
from gateway.api.context import Services
from gateway.auth import ClientKeyMiddleware, ClientKeys
from gateway.batch.build import Batches, build_batches
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.config import GatewayConfig
from gateway.errors import EXCEPTION_HANDLERS
from gateway.fetch import ImageFetcher
from gateway.idempotency import Idempotency
from gateway.intake import BodyIntake
from gateway.looplag import LoopLagProbe
from gateway.memory import return_large_buffers
from gateway.metrics import Metrics, multiprocess_dir
from gateway.middleware import RequestIdMiddleware
from gateway.results import ResultStore, UrlSigner, build_stores, recover_forever
from gateway.routing.entries import ProviderEntry
from gateway.routing.router import Router
from gateway.sandbox import SANDBOX_KEY, Sandbox, start_sandbox
from gateway.service import EditService
from gateway.settings import Settings, get_settings
from gateway.state.base import StateStore
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from gateway.state.resilient import ResilientStore
from gateway.transport import ProviderClient, ProviderTransport
from gateway.upscale import ImageWorkers, Upscaler

log = logging.getLogger("gateway")
_DESCRIPTION = (
    "Point any OpenAI SDK at this gateway (`base_url`) and call `images.edit`: it upscales "
    "through the cheapest healthy provider, fails over, and bills each request once. "
    'Errors are OpenAI\'s envelope, `{"error": {"message", "type", "param", '
    '"code"}}`.'
)


# In the order they are matched (and listed in the OpenAPI document).
ROUTE_MODULES = (
    images,
    files,
    batches,
    models,
    usage,
    health,
    admin,
    status,
    docs,
    landing,
    playground,
)


def _provider_client() -> httpx.AsyncClient:
    # One pooled client per provider; per-call timeouts come from the request's deadline.
    # The adapters speak httpx; the wire underneath is aiohttp, whose C parser and pool
    # cost a fraction of httpcore's per call and per megabyte (bench/overhead.py).
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    return ProviderClient(
        transport=ProviderTransport(limits=limits),
        timeout=httpx.Timeout(30.0, connect=5.0),
        limits=limits,
        headers={"User-Agent": "upscale-gateway/0.1"},
        follow_redirects=False,
    )


@dataclass(slots=True)
class _Runtime:
    clients: list[httpx.AsyncClient] = field(default_factory=list)
    adapters: list[Adapter] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    sandbox: Sandbox | None = None
    store: StateStore | None = None
    accounts: Accounts | None = None
    results: list[ResultStore] = field(default_factory=list)
    batches: Batches | None = None

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for adapter in self.adapters:
            await adapter.aclose()  # follow-ups of abandoned jobs end, and report charges
        if self.batches:
            await self.batches.aclose()
        if self.accounts:
            await self.accounts.drain()  # then the bills they belong to settle
        for results in self.results:
            await results.aclose()
        if any(r.kind == "s3" for r in self.results):
            # The S3 client's native threads hand their last answers to this loop a moment
            # after a call returns; one caught mid-handover at interpreter exit aborts it.
            await asyncio.sleep(0.1)
        for client in self.clients:
            await client.aclose()
        if self.sandbox:
            await self.sandbox.stop()
        if self.store:
            await self.store.aclose()


def _has_credentials(settings: Settings, config: GatewayConfig) -> bool:
    return any(
        settings.env_value(ADAPTERS[p.adapter].key_env)
        for p in config.providers.values()
        if p.enabled
    )


def _build_providers(
    settings: Settings, config: GatewayConfig, runtime: _Runtime
) -> tuple[list[ProviderEntry], list[dict[str, Any]]]:
    entries: list[ProviderEntry] = []
    status: list[dict[str, Any]] = []
    for name, provider in config.providers.items():
        kind = ADAPTERS.get(provider.adapter)
        if kind is None:
            raise ValueError(f"provider {name}: unknown adapter {provider.adapter!r}")
        sandbox_url = runtime.sandbox.urls.get(name) if runtime.sandbox else None
        key = SANDBOX_KEY if sandbox_url else settings.env_value(kind.key_env)
        base_url = sandbox_url or settings.env_value(kind.url_env) or kind.default_url
        info: dict[str, Any] = {
            "name": name,
            "adapter": provider.adapter,
            "model": provider.model,
            "price_usd": provider.price_usd,
            "base_url": base_url,
            "credentials": bool(key),
            "emulated": bool(sandbox_url),
            "enabled": bool(provider.enabled and key),
        }
        status.append(info)
        if not info["enabled"]:
            info["reason"] = (
                "disabled in config" if not provider.enabled else f"{kind.key_env} unset"
            )
            continue
        client = _provider_client()
        runtime.clients.append(client)
        adapter = kind.build(
            AdapterSettings(
                name=name,
                model=provider.model,
                base_url=base_url.rstrip("/"),
                api_key=key or "",
                poll_initial_s=provider.poll_initial_s,
                poll_max_s=provider.poll_max_s,
                extra=provider.extras(),
            ),
            client,
        )
        runtime.adapters.append(adapter)
        entries.append(
            ProviderEntry(
                name, adapter, provider.price_usd, kind.supports, provider.attempt_timeout_s
            )
        )
    return entries, status


def _build_store(settings: Settings, config: GatewayConfig, metrics: Metrics) -> StateStore:
    if not settings.redis_url:
        log.warning("REDIS_URL unset: routing state is in-process (one replica only)")
        return MemoryStore()
    store = ResilientStore(RedisStore(settings.redis_url, prefix=config.routing.redis_prefix))
    store.on_change = lambda degraded: metrics.store_degraded.set(int(degraded))
    return store


def _tune_collector() -> None:
    """Modules, config and services live as long as the process: frozen out of the
    collector's view once, so no later collection walks them again. And a full collection
    comes after 100 of the middle generation's instead of 10: a thousand requests in flight
    are a few hundred thousand live objects, each full pass over them stalls the event loop
    for hundreds of milliseconds, and they were made in a ramp that set one off every 25 %
    of growth (bench/scale.py prints the collector's pauses). Cyclic garbage is rare on the
    request path (gateway/transport.py ProviderClient), so what waits longer is small."""
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)
        _frozen = True


FULL_COLLECTION_AFTER = 100  # middle-generation collections (CPython's default: 10)
_frozen = False


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.configure_logging()
    return_large_buffers()
    config = settings.load_config()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = _Runtime()
        try:
            # Production never emulates: without a credential it serves nothing (/readyz 503)
            # rather than emulated images (python -m gateway refuses to start before this).
            sandbox = settings.environment == "development" and (
                settings.sandbox or not _has_credentials(settings, config)
            )
            if sandbox:
                runtime.sandbox = await start_sandbox(config)
            entries, status = _build_providers(settings, config, runtime)
            fetch_client = httpx.AsyncClient(timeout=config.fetch.timeout_s)
            runtime.clients.append(fetch_client)
            stores = build_stores(settings, config)
            results, cache_files = stores.results, stores.cache
            runtime.results += [results, cache_files]
            for part in (results, cache_files):
                await part.start()
                runtime.tasks.append(asyncio.create_task(part.sweep_forever()))
            runtime.tasks.append(asyncio.create_task(recover_forever(results)))
            metrics = Metrics(multiprocess_dir())  # files, when one of several workers
            probe = LoopLagProbe([metrics.loop_lag.observe, *getattr(app.state, "lag_sinks", [])])
            runtime.tasks.append(asyncio.create_task(probe.run_forever()))
            metrics.results_store_degraded.set(0)
            stores.health.on_change = lambda ok: metrics.results_store_degraded.set(int(not ok))
            runtime.store = store = _build_store(settings, config, metrics)
            router = Router(entries, config.routing, store, metrics)
            # A request that cannot still run frees what it holds (a claim, a budget lease).
            lease_s = config.limits.request_timeout_s + 30
            runtime.accounts = accounts = Accounts(store, config.clients, lease_s, metrics)
            upscaler = Upscaler(config, router, ImageWorkers(config.limits.image_workers))
            fetcher = ImageFetcher(config.fetch, fetch_client, config.limits.max_image_bytes)
            idempotency = Idempotency(
                store,
                ttl_s=config.idempotency.ttl_s,
                lease_s=config.idempotency.lease_s,
                wait_s=config.limits.request_timeout_s + 5,
            )
            cache = ResultCache(
                store,
                cache_files,
                config.cache.ttl_s,
                lease_s=config.idempotency.lease_s,  # renewed while the leader runs
                wait_s=config.limits.request_timeout_s + 5,
            )
            app.state.services = services = Services(
                config=config,
                router=router,
                upscaler=upscaler,
                fetcher=fetcher,
                results=results,
                signer=UrlSigner(settings.signing_secret()),
                public_url=settings.public_url,
                sandbox=sandbox,
                store=store,
                metrics=metrics,
                idempotency=idempotency,
                accounts=accounts,
                cache=cache,
                edits=EditService(
                    router=router,
                    upscaler=upscaler,
                    fetcher=fetcher,
                    results=results,
                    cache=cache,
                    idempotency=idempotency,
                    accounts=accounts,
                    cache_config=config.cache,
                    output=config.output,
                    replay_ttl_s=config.idempotency.ttl_s,
                    delivery=stores.delivery,
                ),
                admin_key=settings.admin_key,
                metrics_key=settings.metrics_key,
                status_open=settings.environment == "development",
                client_keys=bool(settings.client_keys() or config.clients.keys),
                bodies=BodyBudget(config.limits.bodies_in_flight_bytes),
                provider_status=status,
                catalog=ModelCatalog.of(config, router.names),
                delivery=stores.delivery,
            )
            runtime.batches = await build_batches(
                settings,
                config,
                stores.batch,
                services.edits,
                services.catalog,
                metrics,
                lambda base: lambda file_id: services.result_url_at(base, file_id),
            )
            services.batches = runtime.batches.service
            runtime.tasks.append(asyncio.create_task(runtime.batches.worker.run_forever()))
            if not settings.client_keys() and not config.clients.keys:
                log.warning("GATEWAY_API_KEYS unset: the gateway accepts every client (dev only)")
            log.info(
                "serving %s through %s%s",
                config.model.id,
                ", ".join(e.name for e in entries) or "no provider",
                " (emulated)" if sandbox else "",
            )
            _tune_collector()
            yield
        finally:
            await runtime.close()

    app = FastAPI(
        title="upscale-gateway",
        version=__version__,
        summary="OpenAI-compatible gateway for Recraft Crisp Upscale over fal.ai and Replicate",
        description=_DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,  # served from the package's own assets (api/docs.py), not a CDN
        redoc_url=None,
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # openapi.py adds the method
        # No OpenTelemetry of FastAPI's own: it would trace and log exception messages to any
        # global provider a library sets up; the gateway has its own logs and metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    for module in ROUTE_MODULES:
        app.include_router(module.router)
    app.mount("/static", docs.static_files(), name="static")

    def document() -> dict[str, Any]:
        services = getattr(app.state, "services", None)  # set once the lifespan has run
        names = list(services.router.names) if services else sorted(config.providers)
        return openapi.build(app, config, names)

    app.openapi = document  # type: ignore[method-assign]
    keys = ClientKeys(
        settings.client_keys(), {name: k.sha256 for name, k in config.clients.keys.items()}
    )
    app.add_middleware(ClientKeyMiddleware, keys=keys)
    # Added after the rest, so outside them: a refused request still gets an id and an
    # access line.
    app.add_middleware(RequestIdMiddleware)
    # Outermost: a body waiting its turn costs the loop nothing more than its arrival.
    app.add_middleware(
        BodyIntake, slots=config.limits.bodies_reading, door_s=config.limits.body_idle_timeout_s
    )
    return app
