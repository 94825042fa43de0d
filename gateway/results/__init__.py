"""Where result images, cache blobs and idempotent replays are kept: a local directory (the
embedded default, `GATEWAY_RESULTS_DIR`) or an S3-compatible bucket (`GATEWAY_RESULTS_URL`),
behind one protocol (`base.ResultStore`), and how `url` answers deliver them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.results.base import Blob, ResultStore, StoreHealth, recover_forever
from gateway.results.delivery import Delivery
from gateway.results.files import BatchBlobs, LocalBatchBlobs, S3BatchBlobs
from gateway.results.local import FileResultStore
from gateway.results.signing import UrlSigner

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.settings import Settings

__all__ = [
    "Blob",
    "Delivery",
    "FileResultStore",
    "ResultStore",
    "StoreHealth",
    "Stores",
    "UrlSigner",
    "build_stores",
    "recover_forever",
]

log = logging.getLogger("gateway.results")
# A proxied download that a client reads slowly holds one store request open this long at
# most; every other store call is bounded by results.timeout_s.
STREAM_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Stores:
    results: ResultStore  # result images and replays' files
    cache: ResultStore  # the result cache's blobs, under their own cap
    delivery: Delivery
    batch: BatchBlobs  # batch input, output and error files, beside the results

    @property
    def health(self) -> StoreHealth:
        return self.results.health  # one backend: both stores share it


def build_stores(settings: Settings, config: GatewayConfig) -> Stores:
    results = config.results
    if not settings.results_url:
        if results.delivery == "presigned":
            log.warning("results.delivery presigned needs GATEWAY_RESULTS_URL: proxying")
        health = StoreHealth("local")
        return Stores(
            FileResultStore(settings.results_dir, results.ttl_s, results.max_bytes, health),
            FileResultStore(
                Path(settings.results_dir) / "cache",
                config.cache.ttl_s,
                config.cache.max_bytes,
                health,
            ),
            Delivery("proxy", results.ttl_s),
            LocalBatchBlobs(Path(settings.results_dir) / "batch"),
        )
    # obstore is loaded only for a bucket
    from obstore.store import S3Store

    from gateway.results.s3 import S3ResultStore, parse_url, s3_client

    bucket, prefix = parse_url(settings.results_url)
    endpoint = settings.aws_endpoint_url

    def client(at: str | None) -> S3Store:
        return s3_client(
            bucket,
            prefix,
            endpoint=at,
            region=settings.aws_region,
            timeout_s=results.timeout_s,
            stream_timeout_s=STREAM_TIMEOUT_S,
        )

    inner = client(endpoint)
    public = settings.results_public_endpoint
    # Presigned URLs name the host they are signed for: the one clients reach.
    signer = client(public) if public and public != endpoint else inner
    health = StoreHealth("s3")
    location = f"{bucket}/{prefix}"

    def store(base: str, ttl_s: int, max_bytes: int) -> S3ResultStore:
        return S3ResultStore(
            inner,
            base,
            ttl_s,
            max_bytes,
            timeout_s=results.timeout_s,
            health=health,
            signer=signer,
            location=location,
        )

    return Stores(
        store("results", results.ttl_s, results.max_bytes),
        store("cache", config.cache.ttl_s, config.cache.max_bytes),
        Delivery(results.delivery or "presigned", results.ttl_s),
        S3BatchBlobs(inner, "batch", results.timeout_s, health),
    )
