"""Wire helpers every adapter shares: deadlines, data URIs, error mapping, bounded downloads,
and the PARAMS-table mapping of provider-neutral options onto a provider's input fields."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import orjson

from adapters.base import (
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    UpscaleJob,
)

T = TypeVar("T")
log = logging.getLogger("adapters.wire")

# Provider outputs are at most 4096x4096; 64 MiB bounds even an uncompressed 4096^2 RGBA PNG.
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
# The longest a rate-limited provider is believed about its wait (see retry_after_seconds).
MAX_RETRY_AFTER_S = 300.0


@dataclass(frozen=True, slots=True)
class Param:
    """One row of an adapter's parameter table (Portkey-style): which neutral option maps to
    which provider field, and how its value is transformed."""

    option: str
    field: str
    transform: Callable[[Any], Any] = lambda v: v


def map_params(table: Iterable[Param], options: Mapping[str, object]) -> dict[str, Any]:
    """Apply a PARAMS table: only options the caller set are sent, so provider defaults hold."""
    return {
        p.field: p.transform(options[p.option]) for p in table if options.get(p.option) is not None
    }


def remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def json_body(value: Any, headers: Mapping[str, str]) -> dict[str, Any]:
    """Request kwargs for a JSON body encoded by orjson (httpx's `json=` uses the standard
    library, several times slower on a data URI of a megabyte)."""
    return {
        "content": orjson.dumps(value),
        "headers": {**headers, "Content-Type": "application/json"},
    }


OFF_LOOP_BYTES = 256 * 1024  # base64 of more than this goes to a thread (about 0.3 ms)


def _with_data_uri(fields: dict[str, Any], name: str, data: bytes, mime: str) -> bytes:
    # Base64 needs no JSON escaping: the URI is spliced in as bytes, not run through the
    # encoder, which would scan and copy the megabytes once more.
    rest = orjson.dumps(fields)
    head = orjson.dumps(f"data:{mime};base64,")[:-1]  # the opening quote, escaped as JSON
    tail = b"," + rest[1:] if len(rest) > 2 else b"}"
    # One join: the megabytes are copied once more, not once per concatenation.
    return b"".join((b"{", orjson.dumps(name), b":", head, base64.b64encode(data), b'"', tail))


async def data_uri_body(
    fields: dict[str, Any], name: str, data: bytes, mime: str, headers: Mapping[str, str]
) -> dict[str, Any]:
    """Request kwargs for a JSON object with `name` set to `data` as a data URI beside
    `fields`: built in a worker thread when large, so the event loop never encodes an image."""
    if len(data) > OFF_LOOP_BYTES:
        content = await asyncio.to_thread(_with_data_uri, fields, name, data, mime)
    else:
        content = _with_data_uri(fields, name, data, mime)
    return {"content": content, "headers": {**headers, "Content-Type": "application/json"}}


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def decode_data_uri(provider: str, uri: str) -> tuple[bytes, str]:
    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ProviderBadResponse(provider, "output data URI is not base64")
    try:
        return base64.b64decode(payload, validate=True), head[5:-7] or "application/octet-stream"
    except (binascii.Error, ValueError) as exc:
        raise ProviderBadResponse(provider, "output data URI does not decode") from exc


def same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def parse_json(provider: str, response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise ProviderBadResponse(
            provider, "answered with a body that is not JSON", upstream_status=response.status_code
        ) from exc


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The wait a 429 names in `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    value = response.headers.get("retry-after-ms")
    if value:
        with contextlib.suppress(ValueError):
            return _bounded_wait(float(value) / 1000)
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return _bounded_wait(float(value))
    except ValueError:
        pass
    try:
        return _bounded_wait(parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# "resets in ~30s", "Expected available in 5 second.", "in 1m30s": the wait Replicate's
# documented 429 states in its prose (no header is promised).
_UNIT = r"(?:ms|milliseconds?|s|secs?|seconds?|m|mins?|minutes?|h|hours?)(?![a-z])"
_PROSE_WAIT = re.compile(rf"\bin\s*~?\s*((?:\d+(?:\.\d+)?\s*{_UNIT}\s*)+)", re.IGNORECASE)
_PROSE_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)", re.IGNORECASE)


def wait_in_text(text: str) -> float | None:
    """The wait a rate-limit message states in words, in seconds; None if it names none."""
    found = _PROSE_WAIT.search(text)
    if found is None:
        return None
    total = 0.0
    for number, unit in _PROSE_PART.findall(found[1]):
        unit = unit.lower()
        if unit == "ms" or unit.startswith("milli"):
            scale = 0.001
        else:
            scale = {"s": 1.0, "m": 60.0, "h": 3600.0}[unit[0]]
        total += float(number) * scale
    return _bounded_wait(total)


def _bounded_wait(seconds: float) -> float | None:
    """A provider's wait, within reason: the router cools the whole provider down for it, so a
    misread or absurd figure must not take it out of rotation for hours (the breaker and its
    probes handle a longer outage)."""
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def error_detail(response: httpx.Response) -> str:
    """A short, human message from fal's `{"detail"}` or Replicate's problem+json."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title") or body.get("error")
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            detail = detail[0].get("msg")
        if detail:
            return str(detail)[:300]
    return response.reason_phrase


# What a provider answers when it refuses the request the gateway built (bad parameters or
# headers, a JSON body it cannot read, a data URI over its limit), as opposed to refusing the
# caller's image, which only its own classifier can tell from the body.
_REFUSED_REQUEST = frozenset({400, 413, 422})


def error_for_status(provider: str, response: httpx.Response) -> ProviderError:
    """Map a non-2xx answer onto the taxonomy by its status alone: none of these is the
    caller's fault. A 4xx that may be (a validation error about the image, a content-policy
    refusal) goes first to the provider's own classifier (`fal_error`, `replicate_error` in
    the adapters), which knows its body's shape and hands here whatever is not the caller's."""
    status = response.status_code
    detail = error_detail(response)
    if status == 429:
        wait = retry_after_seconds(response)  # a header, when there is one, wins
        if wait is None:
            wait = wait_in_text(detail)
        return ProviderRateLimited(provider, f"rate limited: {detail}", retry_after=wait)
    if status in (401, 403):
        return ProviderUnavailable(provider, "credentials refused", upstream_status=status)
    if status == 402:
        return ProviderUnavailable(provider, "billing refused (402)", upstream_status=status)
    if status == 504:
        return ProviderTimeout(provider, f"timed out upstream: {detail}", upstream_status=status)
    if status in _REFUSED_REQUEST:
        return refused_request(provider, status, detail)
    return ProviderUnavailable(provider, detail, upstream_status=status)


def refused_request(provider: str, status: int, why: str) -> ProviderUnavailable:
    """The provider refused what the gateway sent (a header, a parameter, the body's shape):
    a gateway bug or a change on the provider's side, never the caller's input. Logged as a
    warning so it is found, and retryable: another provider may serve the request."""
    log.warning("%s refused the gateway's own request (HTTP %s): %s", provider, status, why)
    return ProviderUnavailable(
        provider, f"refused the gateway's request: {why}", upstream_status=status
    )


def transport_error(provider: str, exc: httpx.HTTPError) -> ProviderError:
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(provider, f"no answer in time ({type(exc).__name__})")
    return ProviderUnavailable(provider, f"transport error: {type(exc).__name__}")


async def download(
    client: httpx.AsyncClient,
    provider: str,
    url: str,
    *,
    deadline: float,
    headers: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    """Fetch an output file, bounded in bytes and time; data URIs decode in place."""
    if url.startswith("data:"):
        return decode_data_uri(provider, url)
    if urlsplit(url).scheme not in ("http", "https"):
        raise ProviderBadResponse(provider, "output URL has an unsupported scheme")
    try:
        async with client.stream(
            "GET", url, headers=headers, timeout=max(0.1, remaining(deadline))
        ) as response:
            if response.status_code != 200:
                raise ProviderBadResponse(
                    provider,
                    "output file could not be fetched",
                    upstream_status=response.status_code,
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_OUTPUT_BYTES:
                    raise ProviderBadResponse(provider, "output file is implausibly large")
            data = b"".join(chunks)  # one copy, at the end
            return data, response.headers.get("content-type", "application/octet-stream")
    except httpx.HTTPError as exc:
        raise transport_error(provider, exc) from exc


# How long an abandoned job's follow-up (cancel, then confirm how it ended) may take.
CONFIRM_S = 30.0


class Cleanup:
    """Clean-up calls (cancelling an abandoned provider job) that must finish even when the
    request that started them is cancelled; the owner drains them on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(
        self, coro: Coroutine[Any, Any, Any], timeout: float | None = 5.0
    ) -> asyncio.Task[Any]:
        """Run `coro` to its end, within `timeout` (None: it bounds itself)."""
        task = asyncio.ensure_future(coro if timeout is None else asyncio.wait_for(coro, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a failed cancel is not worth a warning; mark it retrieved

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def submit_once(
    job: UpscaleJob,
    cleanup: Cleanup,
    submit: Coroutine[Any, Any, T],
    abandon: Callable[[T], Coroutine[Any, Any, None]],
) -> T:
    """Await a call that starts a paid job. If the caller is cancelled while it is in flight
    (deadline, hedge loser, client gone), the call still completes in the background and
    `abandon` cancels the job it started: a job nobody knows the id of runs, and is billed."""
    task: asyncio.Future[T] = asyncio.ensure_future(submit)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        async def finish_then_abandon() -> None:
            try:
                started = await task
            except Exception:  # the submit failed: no job, or one already reported
                return
            await abandon(started)

        # No bound here: the submit has its own (the attempt's deadline), and `abandon` too.
        job.pending(cleanup.spawn(finish_then_abandon(), None))
        raise


async def follow_to_end(
    provider: str,
    job: UpscaleJob,
    job_id: str,
    cancel: Callable[[float], Coroutine[Any, Any, Any]],
    ended: Callable[[float], Coroutine[Any, Any, bool | None]],
    poll_s: tuple[float, float],
) -> None:
    """An abandoned job: cancel it (a cancel only asks), then ask how it ended until
    CONFIRM_S has passed. It is billed if it ended billed, and also if its end could not be
    learned (or this follow-up was itself cut short): the ledger may overstate a charge,
    never miss one. `cancel` and `ended` take the seconds they may use; `ended` answers
    True (billed), False (not billed) or None (still running, or no answer now)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONFIRM_S
    billed = True
    try:
        with contextlib.suppress(httpx.HTTPError, TimeoutError):
            await asyncio.wait_for(cancel(5.0), 5.0)
        delay, most = poll_s
        while (left := deadline - loop.time()) > 0:
            try:
                outcome = await asyncio.wait_for(ended(min(5.0, left)), min(5.0, left) + 1)
            except (httpx.HTTPError, TimeoutError, ValueError):
                outcome = None
            if outcome is not None:
                billed = outcome
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, most)
        log.warning("%s job %s: its end could not be learned; counted as billed", provider, job_id)
    finally:
        if billed:
            job.billed(provider, job_id)


def unreadable_job(provider: str, job: UpscaleJob) -> None:
    """A 2xx answer to a submit that we cannot read: the provider took the job, and it runs
    and bills while we can neither follow nor cancel it."""
    job.billed(provider, f"unreadable-{secrets.token_hex(6)}")
