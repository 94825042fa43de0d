"""What the routes share: the services built by app.py, and the request id."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request

from gateway.accounts import Accounts
from gateway.cache import ResultCache
from gateway.config import GatewayConfig
from gateway.fetch import ImageFetcher
from gateway.idempotency import Idempotency
from gateway.metrics import Metrics
from gateway.results import FileResultStore, UrlSigner
from gateway.routing.router import Router
from gateway.state.base import StateStore
from gateway.upscale import Upscaler


@dataclass(slots=True)
class Services:
    config: GatewayConfig
    router: Router
    upscaler: Upscaler
    fetcher: ImageFetcher
    results: FileResultStore
    signer: UrlSigner
    public_url: str | None
    sandbox: bool
    store: StateStore
    metrics: Metrics
    idempotency: Idempotency
    accounts: Accounts
    cache: ResultCache
    admin_key: str | None = None
    status_open: bool = False  # /status without a key: development with no admin key only
    provider_status: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_ids(self) -> frozenset[str]:
        return frozenset((self.config.model.id, *self.config.model.aliases, *self.pinned_models))

    @property
    def pinned_models(self) -> dict[str, str]:
        """Model ids that name one provider (the model card's convention): `<provider>/<our
        id>` and the provider's own model id, each served only through that provider."""
        pinned: dict[str, str] = {}
        for name in self.router.names:
            pinned[f"{name}/{self.config.model.id}"] = name
            provider = self.config.providers.get(name)
            if provider is not None:
                pinned[provider.model] = name
        return pinned

    def result_path(self, file_id: str) -> Path | None:
        """A result file, from the results store or the cache's."""
        return self.results.path(file_id) or self.cache.files.path(file_id)

    def signed_url(self, request: Request, file_id: str) -> str:
        expires = int(time.time()) + self.config.results.ttl_s
        query = urlencode(
            {"expires": expires, "signature": self.signer.signature(file_id, expires)}
        )
        base = (self.public_url or str(request.base_url)).rstrip("/")
        return f"{base}/v1/files/{file_id}/content?{query}"


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))
