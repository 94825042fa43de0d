"""fal.ai queue protocol: submit, poll the status URL, fetch the result, cancel on give-up.

We speak the queue protocol with our own pooled httpx client instead of fal-client 1.0.3:
fal-client reads its host at import time, always uses https, takes no custom client and
retries a submit POST on 409/429/timeouts, which can start a second paid job. The protocol
is four calls; data URIs are one base64 call, so the dependency buys nothing here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from adapters.base import (
    AdapterSettings,
    ProviderBadResponse,
    ProviderResult,
    ProviderTimeout,
    UpscaleJob,
)
from adapters.wire import (
    Cleanup,
    Param,
    data_uri,
    download,
    error_for_status,
    json_body,
    map_params,
    parse_json,
    remaining,
    same_origin,
    transport_error,
)

PARAMS: tuple[Param, ...] = (
    Param("sync_mode", "sync_mode", bool),
    Param("enable_safety_checker", "enable_safety_checker", bool),
)
SUPPORTS: frozenset[str] = frozenset({"sync_mode", "enable_safety_checker"})


class FalAdapter:
    def __init__(self, settings: AdapterSettings, client: httpx.AsyncClient):
        self.name = settings.name
        self._s = settings
        self._client = client
        self._auth = {"Authorization": f"Key {settings.api_key}"}
        self._cleanup = Cleanup()

    async def upscale(self, job: UpscaleJob) -> ProviderResult:
        submitted = job.resume_handle(self.name)  # a job accepted before: follow it
        if submitted is None:
            body: dict[str, Any] = {
                "image_url": data_uri(job.png),
                **map_params(PARAMS, job.options),
            }
            # fal answers 504 if processing has not started by then: a queued job that can
            # no longer meet our deadline is dropped by fal instead of being run and billed.
            timeout = str(max(1, int(remaining(job.deadline))))
            headers = {**self._auth, "X-Fal-Request-Timeout": timeout}
            submitted = await self._call(
                "POST", f"{self._s.base_url}/{self._s.model}", job, **json_body(body, headers)
            )
        urls = self._queue_urls(submitted)
        if job.resume_handle(self.name) is None:
            await job.submitted(self.name, {"request_id": str(submitted["request_id"]), **urls})
        try:
            await self._wait_completed(urls["status_url"], job)
            result = await self._call("GET", urls["response_url"], job, headers=self._auth)
            return await self._read_output(result, str(submitted["request_id"]), job)
        except (ProviderTimeout, asyncio.CancelledError):
            self._cleanup.spawn(self._cancel(urls["cancel_url"]))
            raise

    async def aclose(self) -> None:
        await self._cleanup.drain()

    async def _call(self, method: str, url: str, job: UpscaleJob, **kwargs: Any) -> Any:
        left = remaining(job.deadline)
        if left <= 0:
            raise ProviderTimeout(self.name, "request deadline passed")
        try:
            response = await self._client.request(method, url, timeout=left, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        if response.status_code >= 300:
            raise error_for_status(self.name, response)
        return parse_json(self.name, response)

    def _queue_urls(self, submitted: Any) -> dict[str, str]:
        keys = ("request_id", "status_url", "response_url", "cancel_url")
        if not isinstance(submitted, dict) or not all(
            isinstance(submitted.get(k), str) for k in keys
        ):
            raise ProviderBadResponse(self.name, "submit answer lacks the queue URLs")
        urls = {k: submitted[k] for k in keys[1:]}
        # The key goes with every call to these URLs: never follow one off the queue host.
        if not all(same_origin(u, self._s.base_url) for u in urls.values()):
            raise ProviderBadResponse(self.name, "queue URLs point away from the queue host")
        return urls

    async def _wait_completed(self, status_url: str, job: UpscaleJob) -> None:
        delay = self._s.poll_initial_s
        while True:
            status = await self._call("GET", status_url, job, headers=self._auth)
            state = status.get("status") if isinstance(status, dict) else None
            if state == "COMPLETED":
                # A failed job's result URL answers with the model's own status and body,
                # which tells the caller's fault (422) from the provider's (5xx): fetch it.
                return
            if state not in ("IN_QUEUE", "IN_PROGRESS"):
                raise ProviderBadResponse(self.name, f"unknown queue status {state!r}")
            if remaining(job.deadline) <= delay:
                raise ProviderTimeout(self.name, f"job still {state} at the deadline")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self._s.poll_max_s)

    async def _read_output(self, result: Any, job_id: str, job: UpscaleJob) -> ProviderResult:
        image = result.get("image") if isinstance(result, dict) else None
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str) or not url:
            raise ProviderBadResponse(self.name, "job succeeded without an image")
        data, content_type = await download(self._client, self.name, url, deadline=job.deadline)
        return ProviderResult(
            image=data,
            content_type=image.get("content_type") or content_type,
            provider_job_id=job_id,
        )

    async def _cancel(self, cancel_url: str) -> None:
        await self._client.put(cancel_url, headers=self._auth, timeout=5.0)
