"""Batch events to GATEWAY_WEBHOOK_URL in OpenAI's event shape, signed by the Standard
Webhooks scheme (what `openai.OpenAI(webhook_secret=...).webhooks.unwrap` verifies): the
headers `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">` with the key the `whsec_` secret encodes. Each event is retried
with backoff until the receiver answers 2xx; the URL obeys the image fetcher's network
policy (no loopback or private targets unless `fetch.allow_private_networks`)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from gateway.errors import InvalidRequest
from gateway.fetch import UrlPolicy

log = logging.getLogger("gateway.batch")
EVENTS = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}


def secret_key(secret: str) -> bytes:
    """The HMAC key a `whsec_<base64>` secret holds."""
    if not secret.startswith("whsec_"):
        raise ValueError("GATEWAY_WEBHOOK_SECRET must start with whsec_")
    try:
        key = base64.b64decode(secret[6:], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("GATEWAY_WEBHOOK_SECRET is not whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("GATEWAY_WEBHOOK_SECRET holds fewer than 16 bytes of key")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    payload = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, payload, hashlib.sha256).digest()).decode()


def event(kind: str, batch_id: str, at: int) -> dict[str, Any]:
    return {
        "id": f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "type": EVENTS[kind],
        "created_at": at,
        "data": {"id": batch_id},
    }


class WebhookSender:
    def __init__(
        self,
        url: str,
        secret: str,
        client: httpx.AsyncClient,
        policy: UrlPolicy,
        *,
        attempts: int = 8,
        first_delay_s: float = 1.0,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        self._url = url
        self._key = secret_key(secret)
        self._client = client
        self._policy = policy
        self._attempts = attempts
        self._first_delay_s = first_delay_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._tasks: set[asyncio.Task[bool]] = set()
        self.sent = 0
        self.failed = 0

    def send(self, kind: str, batch_id: str) -> None:
        """Deliver the event in the background, retried; never blocks the batch."""
        if kind not in EVENTS:
            return
        task = asyncio.create_task(self.deliver(event(kind, batch_id, int(self._clock()))))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, payload: dict[str, Any]) -> bool:
        body = orjson.dumps(payload)
        delay = self._first_delay_s
        for attempt in range(1, self._attempts + 1):
            try:
                if await self._post(payload["id"], body):
                    self.sent += 1
                    return True
            except InvalidRequest as exc:  # the policy refused the target: no retry helps
                log.error("webhook %s not sent: %s", payload["type"], exc.message)
                break
            if attempt < self._attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 300.0)
        self.failed += 1
        log.error("webhook %s for %s not delivered", payload["type"], payload["data"]["id"])
        return False

    async def _post(self, webhook_id: str, body: bytes) -> bool:
        target, host = await self._policy.vet(self._url, what="webhook URL", param=None)
        timestamp = int(self._clock())  # signed at each attempt: receivers bound its age
        headers = {
            "Host": host,
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, webhook_id, timestamp, body),
            "user-agent": "upscale-gateway-webhooks",
        }
        try:
            response = await self._client.post(
                target,
                content=body,
                headers=headers,
                timeout=self._timeout_s,
                extensions={"sni_hostname": urlsplit(self._url).hostname or ""},
            )
        except httpx.HTTPError as exc:
            log.warning("webhook to %s failed: %s", host, type(exc).__name__)
            return False
        if 200 <= response.status_code < 300:
            return True
        log.warning("webhook to %s answered %d", host, response.status_code)
        return False

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
