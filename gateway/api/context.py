"""What the routes share: the services built by app.py, handed to each handler through
FastAPI's dependency injection as the few parts it uses, and the request's id and account."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends
from starlette.requests import Request

from gateway.accounts import OPEN_ACCOUNT, Accounts
from gateway.api.body import BodyBudget
from gateway.batch.service import BatchService
from gateway.cache import ResultCache
from gateway.catalog import ModelCatalog
from gateway.config import GatewayConfig, ModelConfig
from gateway.fetch import ImageFetcher
from gateway.idempotency import Idempotency
from gateway.metrics import Metrics
from gateway.results import Delivery, ResultStore, UrlSigner
from gateway.routing.router import Router
from gateway.service.edits import EditService
from gateway.state.base import StateStore
from gateway.upscale import Upscaler


@dataclass(slots=True)
class Services:
    config: GatewayConfig
    router: Router
    upscaler: Upscaler
    fetcher: ImageFetcher
    results: ResultStore
    signer: UrlSigner
    public_url: str | None
    sandbox: bool
    store: StateStore
    metrics: Metrics
    idempotency: Idempotency
    accounts: Accounts
    cache: ResultCache
    edits: EditService
    admin_key: str | None = None
    metrics_key: str | None = None  # GET /metrics asks for it when set
    client_keys: bool = False  # /v1 asks for a client key
    bodies: BodyBudget = field(default_factory=lambda: BodyBudget(512 * 1024 * 1024))
    status_open: bool = False  # /status without a key: development with no admin key only
    provider_status: list[dict[str, Any]] = field(default_factory=list)
    catalog: ModelCatalog = field(default_factory=lambda: ModelCatalog(ModelConfig(), {}))
    delivery: Delivery | None = None  # presigned URLs from the store; None: proxied only
    batches: BatchService | None = None  # the Files and Batches APIs

    def base_url(self, request: Request) -> str:
        """The public URL; without one, the address the request's connection arrived at
        (the socket's, which the client cannot forge), never its Host header: that would
        hand out, and let caches keep, links to whatever host a client named. Behind a proxy
        or a port mapping that address is an inner one: GATEWAY_PUBLIC_URL names the outer.
        "" for a Unix socket (no address to name)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        server = request.scope.get("server")
        if not server or server[1] is None:
            return ""
        host, port = str(server[0]).split("%")[0], int(server[1])
        scheme = str(request.scope.get("scheme", "http"))  # a trusted proxy's, per uvicorn
        shown = f"[{host}]" if ":" in host else host
        default = {"http": 80, "https": 443}.get(scheme)
        return f"{scheme}://{shown}{'' if port == default else f':{port}'}"

    def signed_url(self, request: Request, file_id: str) -> str:
        return self._signed(self.base_url(request), file_id)

    def _signed(self, base: str, file_id: str) -> str:
        expires = int(time.time()) + self.config.results.ttl_s
        query = urlencode(
            {"expires": expires, "signature": self.signer.signature(file_id, expires)}
        )
        return f"{base}/v1/files/{file_id}/content?{query}"

    def result_url(self, request: Request, file_id: str) -> str:
        """A `url` answer's link: the store's presigned URL (made while the answer was
        prepared), else the gateway's own signed URL, which every replica serves."""
        return self.result_url_at(self.base_url(request), file_id)

    def result_url_at(self, base: str, file_id: str) -> str:
        """The same for an answer made away from its request (a batch line), on `base`."""
        presigned = self.delivery.url(file_id) if self.delivery else None
        return presigned or self._signed(base, file_id)


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def _config(request: Request) -> GatewayConfig:
    return services(request).config


async def _catalog(request: Request) -> ModelCatalog:
    return services(request).catalog


async def _bodies(request: Request) -> BodyBudget:
    return services(request).bodies


async def _accounts(request: Request) -> Accounts:
    return services(request).accounts


async def _router(request: Request) -> Router:
    return services(request).router


async def _store(request: Request) -> StateStore:
    return services(request).store


async def _sandbox(request: Request) -> bool:
    return services(request).sandbox


async def _metrics(request: Request) -> Metrics:
    return services(request).metrics


async def _edits(request: Request) -> EditService:
    return services(request).edits


async def _batches(request: Request) -> BatchService:
    batches = services(request).batches
    assert batches is not None  # built by app.py with every other part
    return batches


async def _file_urls(request: Request) -> Callable[[str], str]:
    """A result file's URL: presigned on the store, or signed on the public URL (else the
    request's own base)."""
    svc = services(request)
    return lambda file_id: svc.result_url(request, file_id)


async def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def account_id(request: Request) -> str:
    """The account the request's client key belongs to (the open one when keys are off)."""
    return str(request.scope.get("state", {}).get("key_id") or OPEN_ACCOUNT)


# The dependencies are coroutines: FastAPI runs a plain function on the thread pool, a
# thread hop per dependency per request for what is an attribute read. These two wrap the
# plain helpers that other modules also call directly.
async def _services(request: Request) -> Services:
    return services(request)


async def _account_id(request: Request) -> str:
    return account_id(request)


# What a handler declares it needs; app.py builds the one Services behind them.
AppServices = Annotated[Services, Depends(_services)]
Config = Annotated[GatewayConfig, Depends(_config)]
CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]
BodiesDep = Annotated[BodyBudget, Depends(_bodies)]
AccountsDep = Annotated[Accounts, Depends(_accounts)]
RouterDep = Annotated[Router, Depends(_router)]
StoreDep = Annotated[StateStore, Depends(_store)]
Sandboxed = Annotated[bool, Depends(_sandbox)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
EditsDep = Annotated[EditService, Depends(_edits)]
BatchesDep = Annotated[BatchService, Depends(_batches)]
FileUrls = Annotated[Callable[[str], str], Depends(_file_urls)]  # file id -> signed URL
RequestId = Annotated[str, Depends(request_id)]
AccountId = Annotated[str, Depends(_account_id)]
