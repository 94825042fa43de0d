"""fal.ai queue protocol: submit, poll the status URL, fetch the result, cancel on give-up.

We speak the queue protocol with our own pooled httpx client instead of fal-client 1.0.3:
fal-client reads its host at import time, always uses https, takes no custom client and
retries a submit POST on 409/429/timeouts, which can start a second paid job. The protocol
is four calls; data URIs are one base64 call, so the dependency buys nothing here.

Money: a job bills when its result URL answers 2xx (it succeeded, whatever its output turns
out to be). A job given up before that (deadline, failover, hedge loser, client gone) is
cancelled, then followed until it ends, so a job that finished anyway is billed too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson

from adapters.base import (
    AdapterSettings,
    ProviderBadResponse,
    ProviderError,
    ProviderRejected,
    ProviderResult,
    ProviderTimeout,
    ProviderUnavailable,
    UpscaleJob,
)
from adapters.pace import JobPace, run_time
from adapters.wire import (
    Cleanup,
    Param,
    data_uri_body,
    download,
    error_detail,
    error_for_status,
    follow_to_end,
    map_params,
    parse_json,
    refused_request,
    remaining,
    same_origin,
    submit_once,
    transport_error,
    unreadable_job,
)

PARAMS: tuple[Param, ...] = (
    Param("sync_mode", "sync_mode", bool),
    Param("enable_safety_checker", "enable_safety_checker", bool),
)
SUPPORTS: frozenset[str] = frozenset({"sync_mode", "enable_safety_checker"})
_HANDLE_KEYS = ("request_id", "status_url", "response_url", "cancel_url")


class FalAdapter:
    def __init__(self, settings: AdapterSettings, client: httpx.AsyncClient):
        self.name = settings.name
        self._s = settings
        self._client = client
        self._auth = {"Authorization": f"Key {settings.api_key}"}
        self._cleanup = Cleanup()
        self._pace = JobPace()

    async def upscale(self, job: UpscaleJob) -> ProviderResult:
        resumed = job.resume_handle(self.name)  # a job accepted before: follow it
        if resumed is not None:
            handle = self._handle(dict(resumed))
        else:
            handle = await submit_once(
                job, self._cleanup, self._submit(job), lambda h: self._abandon(h, job)
            )
        ended = False  # the job's result was read: billed or failed, nothing to cancel
        journaled = resumed is not None
        try:
            if resumed is None:
                journaled = await job.submitted(self.name, handle)
                if not journaled and job.claim_lost():  # its result can go nowhere: give up
                    raise ProviderUnavailable(self.name, "a retry of the request took it over")
            waiting_since = time.monotonic()
            status = await self._wait_completed(handle["status_url"], job, resumed is None)
            response = await self._send("GET", handle["response_url"], job)
            if _infrastructure(response):  # the job may have succeeded: follow it to its end
                raise fal_error(self.name, response)
            ended = True
            if response.status_code >= 300:  # the job failed (or was cancelled): its answer
                raise fal_error(self.name, response)
            job.billed(self.name, handle["request_id"])
            if resumed is None:  # how long it existed is known: it was submitted just now
                existed = time.monotonic() - waiting_since
                self._pace.ran((job.width, job.height), run_time(status, "inference_time"), existed)
            return await self._read_output(parse_json(self.name, response), handle, job)
        except BaseException:
            if not ended and not job.handed_over(journaled):
                job.pending(self._cleanup.spawn(self._abandon(handle, job), None))
            raise

    async def aclose(self) -> None:
        await self._cleanup.drain()

    async def _send(self, method: str, url: str, job: UpscaleJob, **kwargs: Any) -> httpx.Response:
        left = remaining(job.deadline)
        if left <= 0:
            raise ProviderTimeout(self.name, "request deadline passed")
        kwargs.setdefault("headers", self._auth)
        try:
            return await self._client.request(method, url, timeout=left, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc

    async def _submit(self, job: UpscaleJob) -> dict[str, str]:
        fields: dict[str, Any] = map_params(PARAMS, job.options)
        # fal answers 504 if processing has not started by then: a queued job that can no
        # longer meet our deadline is dropped by fal instead of being run and billed.
        timeout = str(max(1, int(remaining(job.deadline))))
        headers = {**self._auth, "X-Fal-Request-Timeout": timeout}
        if job.priority == "low":
            headers["X-Fal-Queue-Priority"] = "low"
        body = await data_uri_body(fields, "image_url", job.image, job.mime, headers)
        response = await self._send("POST", f"{self._s.base_url}/{self._s.model}", job, **body)
        if response.status_code >= 300:
            raise fal_error(self.name, response)
        try:
            return self._handle(parse_json(self.name, response))
        except ProviderBadResponse:
            unreadable_job(self.name, job)
            raise

    def _handle(self, submitted: Any) -> dict[str, str]:
        if not isinstance(submitted, dict) or not all(
            isinstance(submitted.get(k), str) for k in _HANDLE_KEYS
        ):
            raise ProviderBadResponse(self.name, "submit answer lacks the queue URLs")
        handle = {k: str(submitted[k]) for k in _HANDLE_KEYS}
        # The key goes with every call to these URLs: never follow one off the queue host.
        if not all(same_origin(handle[k], self._s.base_url) for k in _HANDLE_KEYS[1:]):
            raise ProviderBadResponse(self.name, "queue URLs point away from the queue host")
        return handle

    async def _wait_completed(self, status_url: str, job: UpscaleJob, paced: bool) -> Any:
        """The job's status once COMPLETED. `paced`: submitted just now, so its first poll
        may wait for most of its run time (adapters/pace.py); a resumed job may be done."""
        wait = (
            self._pace.first_wait((job.width, job.height), remaining(job.deadline))
            if paced
            else 0.0
        )
        if wait:
            await asyncio.sleep(wait)
        delay = self._s.poll_initial_s
        while True:
            response = await self._send("GET", status_url, job)
            if response.status_code >= 300:
                raise fal_error(self.name, response)
            status = parse_json(self.name, response)
            state = status.get("status") if isinstance(status, dict) else None
            if state == "COMPLETED":
                # A failed job's result URL answers with the model's own status and body,
                # which tells the caller's fault (422) from the provider's (5xx): fetch it.
                return status
            if state not in ("IN_QUEUE", "IN_PROGRESS"):
                raise ProviderBadResponse(self.name, f"unknown queue status {state!r}")
            if remaining(job.deadline) <= delay:
                raise ProviderTimeout(self.name, f"job still {state} at the deadline")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self._s.poll_max_s)

    async def _read_output(
        self, result: Any, handle: dict[str, str], job: UpscaleJob
    ) -> ProviderResult:
        image = result.get("image") if isinstance(result, dict) else None
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(image, dict) or not isinstance(url, str) or not url:
            raise ProviderBadResponse(self.name, "job succeeded without an image")
        data, content_type = await download(self._client, self.name, url, deadline=job.deadline)
        return ProviderResult(
            image=data,
            content_type=image.get("content_type") or content_type,
            provider_job_id=handle["request_id"],
        )

    async def _abandon(self, handle: dict[str, str], job: UpscaleJob) -> None:
        """Cancel a job we gave up on and follow it to its end (see `follow_to_end`)."""

        async def cancel(seconds: float) -> None:
            await self._client.put(handle["cancel_url"], headers=self._auth, timeout=seconds)

        await follow_to_end(
            self.name,
            job,
            handle["request_id"],
            cancel,
            lambda seconds: self._ended(handle, seconds),
            (self._s.poll_initial_s, self._s.poll_max_s),
        )

    async def _ended(self, handle: dict[str, str], seconds: float) -> bool | None:
        """Whether the job ended billed (True) or not (False); None while it runs or when
        fal cannot tell us now."""
        status = await self._client.get(handle["status_url"], headers=self._auth, timeout=seconds)
        body = orjson.loads(status.content) if status.status_code == 200 else None
        if not isinstance(body, dict) or body.get("status") != "COMPLETED":
            return None
        result = await self._client.get(handle["response_url"], headers=self._auth, timeout=seconds)
        if _infrastructure(result):
            return None  # fal's own trouble, not the job's answer: ask again
        return result.status_code < 300


def _infrastructure(response: httpx.Response) -> bool:
    """A 5xx of fal's infrastructure (it names its error type), not the job's answer. The
    start timeout we set (X-Fal-Request-Timeout) is typed too, but it is the job's end: it
    never started, fal bills nothing, and there is nothing left to follow."""
    if response.headers.get("x-fal-request-timeout-type", "").lower() == "user":
        return False
    return response.status_code >= 500 and "x-fal-error-type" in response.headers


# Where fal's model errors point at the caller's image: `loc` ["body", "image_url"].
_IMAGE_FIELD = "image_url"
# Error types at the image's location that say nothing against the image itself: the field
# missing or of the wrong JSON type (the gateway always sends a data URI string), or fal
# failing to fetch it (a data URI needs no fetch: fal's trouble).
_NOT_THE_IMAGE = frozenset(
    {"missing", "value_error.missing", "string_type", "type_error.str", "file_download_error"}
)


def fal_error(provider: str, response: httpx.Response) -> ProviderError:
    """Classify a non-2xx fal answer. Model errors are `{"detail": [{loc, msg, type, url}]}`;
    request errors `{"detail": "...", "error_type"}` with `X-Fal-Error-Type`; either may carry
    `X-Fal-Retryable: true|false` (whether the same request may succeed). Only a model error
    located at the image input, or a refusal typed `content_policy_violation`, is the caller's:
    decided by `type` and `loc`, never by words in `msg` (which may name any field)."""
    status = response.status_code
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    retryable = response.headers.get("x-fal-retryable", "").strip().lower()
    entries = [e for e in detail if isinstance(e, dict)] if isinstance(detail, list) else []
    policy = [e for e in entries if e.get("type") == "content_policy_violation"]
    if 400 <= status < 500 and policy:
        # The caller's content, whatever fal says of retrying: another provider would refuse
        # it too (and bill for trying).
        return ProviderRejected(
            provider, _msg(policy[0]), upstream_status=status, code="content_policy_violation"
        )
    if 400 <= status < 500 and status != 429 and retryable == "true":
        # fal says the same request may succeed: whatever it refused, not the input for good.
        message = f"{error_detail(response)} (fal: a retry may succeed)"
        return ProviderUnavailable(provider, message, upstream_status=status)
    if 400 <= status < 500 and entries:
        if entries and all(_about_the_image(e) for e in entries):
            return ProviderRejected(provider, _msg(entries[0]), upstream_status=status)
        # Some entry is about a field, header or query parameter the gateway chose.
        why = "; ".join(f"{_where(e)}: {_msg(e)} ({e.get('type')})" for e in entries)
        return refused_request(provider, status, why or error_detail(response))
    error_type = body.get("error_type") if isinstance(body, dict) else None
    error_type = error_type or response.headers.get("x-fal-error-type")
    cancelled = error_type in ("client_cancelled", "client_disconnected") or (
        # The result URL of a cancelled job (fal names no type for it): someone cancelled it,
        # e.g. a stalled run of this request giving up on it. The job's state, not our input.
        status == 400 and isinstance(detail, str) and "cancel" in detail.lower()
    )
    if cancelled:
        return ProviderUnavailable(provider, "the job was cancelled", upstream_status=status)
    error = error_for_status(provider, response)
    if retryable == "false" and error.retryable:
        # Retrying it at fal will not help; another provider still may.
        error.message += " (fal: not retryable there)"
    return error


def _about_the_image(entry: dict[str, Any]) -> bool:
    loc = entry.get("loc")
    if not isinstance(loc, list) or not loc or loc[-1] != _IMAGE_FIELD:
        return False
    return loc[0] in ("body", _IMAGE_FIELD) and entry.get("type") not in _NOT_THE_IMAGE


def _where(entry: dict[str, Any]) -> str:
    loc = entry.get("loc")
    return ".".join(str(part) for part in loc) if isinstance(loc, list) else "?"


def _msg(entry: dict[str, Any]) -> str:
    return str(entry.get("msg") or entry.get("type") or "refused")[:300]
