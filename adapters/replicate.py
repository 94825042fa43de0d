"""Replicate predictions protocol: create, poll `urls.get`, cancel on give-up; inputs over
the data-URI limit go through the Files API first.

Creates never send `Prefer: wait`: a create that waits holds the prediction's id until the
output exists, so a request that gives up meanwhile (deadline, failover, hedge loser, client
gone) could not cancel it, and it would run and bill. The create answers at once and the
prediction is polled. Money: a prediction bills when we see it `succeeded`; one given up
before is cancelled, then followed until it ends, so one that finished anyway is billed too.

We speak HTTP directly rather than through `replicate` 1.0.7: its create has no timeout
without `wait`, `predictions.async_create(model=...)` drops `wait`, the `aborted` status
fails its pydantic model, and non-https outputs come back as plain strings. Owning the four
calls keeps deadlines, cancels and error mapping in one place.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any
from urllib.parse import urlsplit

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
    data_uri,
    download,
    error_for_status,
    follow_to_end,
    json_body,
    map_params,
    parse_json,
    remaining,
    same_origin,
    submit_once,
    transport_error,
    unreadable_job,
)

# The crisp model on Replicate takes only the image: no provider-neutral option maps onto it.
PARAMS: tuple[Param, ...] = ()
SUPPORTS: frozenset[str] = frozenset()
DATA_URI_MAX_BYTES = 256 * 1024  # Replicate's spec: data URIs are for files up to 256 KB
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
CANCEL_AFTER_MIN_S = 5  # Replicate refuses a shorter Cancel-After
# A failed prediction's `error` is free text (the model's exception). Replicate's own policy
# refusals read "NSFW content detected..." or "...flagged as sensitive... (E005)"; a word such
# as "safety" is not one (a model's safety checker can fail for its own reasons).
_POLICY = re.compile(r"\bnsfw\b|flagged as sensitive|\(E005\)|content[ _]policy", re.IGNORECASE)
# The image itself cannot be read, or is too large (PIL's and the models' usual wording).
_BAD_IMAGE = re.compile(
    r"cannot identify image|image file is truncated|(invalid|unsupported|corrupt\w*) image"
    r"|image (is )?too (large|big)|image must be under|decompression ?bomb"
    r"|sides must be|at most \d+ ?MP",
    re.IGNORECASE,
)
# Output hosts Replicate owns, which may require the API token (its reference says delivery
# URLs may); https only, so the token never travels in clear text.
_TOKEN_DOMAINS = ("replicate.delivery", "replicate.com")


def _job_id(prediction: dict[str, Any]) -> str:
    """The prediction's id (its get URL ends with it, for an answer that lacks one)."""
    return str(prediction.get("id") or prediction["urls"]["get"].rstrip("/").rsplit("/", 1)[-1])


def _cancel(urls: dict[str, Any]) -> dict[str, str]:
    return {"cancel": str(urls["cancel"])} if urls.get("cancel") else {}


class ReplicateAdapter:
    def __init__(self, settings: AdapterSettings, client: httpx.AsyncClient):
        self.name = settings.name
        self._s = settings
        self._client = client
        self._auth = {"Authorization": f"Bearer {settings.api_key}"}
        self._data_uri_max = int(
            settings.extra.get("data_uri_max_bytes", DATA_URI_MAX_BYTES)  # type: ignore[call-overload]
        )
        # More https hosts an output may be fetched from with the token (provider extras).
        hosts = settings.extra.get("delivery_token_hosts") or ()
        if isinstance(hosts, str):
            hosts = hosts.split(",")
        listed = hosts if isinstance(hosts, list | tuple | set | frozenset) else ()
        self._token_hosts = frozenset(str(h).strip().lower() for h in listed if str(h).strip())
        self._cleanup = Cleanup()
        self._pace = JobPace()

    async def upscale(self, job: UpscaleJob) -> ProviderResult:
        handle = job.resume_handle(self.name)
        if handle is not None:  # a prediction accepted before: follow it
            url = str(handle.get("get", ""))
            if not same_origin(url, self._s.base_url):  # the token goes with the call
                raise ProviderBadResponse(self.name, "the prediction to resume is off the API")
            cancel = _cancel(dict(handle))
            if cancel and not same_origin(cancel["cancel"], self._s.base_url):
                cancel = {}  # never post the token off the API; the follow-up still polls
            # Its id names it in the ledger: billed once, whoever followed it.
            prediction = {"id": handle.get("id", ""), "urls": {"get": url, **cancel}}
            return await self._follow(prediction, job, journaled=True)
        file_url = None
        if len(job.image) > self._data_uri_max:
            file_url = await self._upload(job)
            image: str = file_url
        else:
            image = data_uri(job.image, job.mime)
        try:
            model_input = {"image": image, **map_params(PARAMS, job.options)}
            prediction = await submit_once(
                job, self._cleanup, self._create(job, model_input), lambda p: self._abandon(p, job)
            )
            return await self._follow(prediction, job)
        finally:
            if file_url:
                self._cleanup.spawn(self._client.delete(file_url, headers=self._auth, timeout=5.0))

    async def aclose(self) -> None:
        await self._cleanup.drain()

    async def _follow(
        self, prediction: dict[str, Any], job: UpscaleJob, journaled: bool = False
    ) -> ProviderResult:
        """Poll a prediction to its end and read its output; one given up on is abandoned.
        `journaled`: a resumed prediction, already in the request's journal."""
        try:
            if not journaled:
                urls = prediction["urls"]
                handle = {"id": str(prediction.get("id", "")), "get": urls["get"], **_cancel(urls)}
                journaled = await job.submitted(self.name, handle)
                if not journaled and job.claim_lost():  # its result can go nowhere: give up
                    raise ProviderUnavailable(self.name, "a retry of the request took it over")
            resumed = "status" not in prediction  # only its URLs are known
            if resumed:
                prediction = await self._get(prediction["urls"]["get"], job)
            prediction = await self._wait_terminal(prediction, job, paced=not resumed)
        except BaseException:
            if not job.handed_over(journaled):
                job.pending(self._cleanup.spawn(self._abandon(prediction, job), None))
            raise
        return await self._read_output(prediction, job)

    async def _send(self, method: str, url: str, job: UpscaleJob, **kwargs: Any) -> httpx.Response:
        left = remaining(job.deadline)
        if left <= 0:
            raise ProviderTimeout(self.name, "request deadline passed")
        try:
            response = await self._client.request(method, url, timeout=left, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        if response.status_code >= 300:
            raise replicate_error(self.name, response)
        return response

    async def _upload(self, job: UpscaleJob) -> str:
        extension = job.mime.rsplit("/", 1)[-1]
        files = {"content": (f"input.{extension}", job.image, job.mime)}
        response = await self._send(
            "POST", f"{self._s.base_url}/v1/files", job, files=files, headers=self._auth
        )
        body = parse_json(self.name, response)
        url = body.get("urls", {}).get("get") if isinstance(body, dict) else None
        if not isinstance(url, str) or not same_origin(url, self._s.base_url):
            raise ProviderBadResponse(self.name, "file upload answer lacks urls.get")
        return url

    async def _create(self, job: UpscaleJob, model_input: dict[str, Any]) -> dict[str, Any]:
        left = remaining(job.deadline)
        headers = {
            **self._auth,
            # A prediction still queued when our deadline passes is worthless to us; Replicate
            # marks it `aborted` and does not bill it. Whole seconds with a unit (a valid
            # Replicate duration), rounded up: never before our own deadline, never below 5 s.
            "Cancel-After": f"{max(CANCEL_AFTER_MIN_S, math.ceil(left))}s",
        }
        url = f"{self._s.base_url}/v1/models/{self._s.model}/predictions"
        response = await self._send("POST", url, job, **json_body({"input": model_input}, headers))
        try:
            prediction = self._prediction(parse_json(self.name, response))
        except ProviderBadResponse:
            unreadable_job(self.name, job)
            raise
        self._note_billed(prediction, job)
        return prediction

    async def _get(self, url: str, job: UpscaleJob) -> dict[str, Any]:
        response = await self._send("GET", url, job, headers=self._auth)
        prediction = self._prediction(parse_json(self.name, response))
        self._note_billed(prediction, job)
        return prediction

    def _note_billed(self, prediction: dict[str, Any], job: UpscaleJob) -> None:
        """Report a prediction seen in a billed end. Polling stops at the first terminal
        status, so each prediction is reported here at most once."""
        if _billed(prediction):
            job.billed(self.name, _job_id(prediction))

    def _prediction(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            raise ProviderBadResponse(self.name, "answer is not a prediction")
        urls = body.get("urls")
        if not isinstance(urls, dict) or not isinstance(urls.get("get"), str):
            raise ProviderBadResponse(self.name, "prediction lacks urls.get")
        for key in ("get", "cancel"):
            if key in urls and not same_origin(str(urls[key]), self._s.base_url):
                raise ProviderBadResponse(self.name, "prediction URLs point away from the API")
        return body

    async def _wait_terminal(
        self, prediction: dict[str, Any], job: UpscaleJob, paced: bool
    ) -> dict[str, Any]:
        """`paced`: created just now, so its first poll may wait for most of its run time
        (adapters/pace.py); a resumed prediction may be done."""
        size, since = (job.width, job.height), time.monotonic()
        wait = self._pace.first_wait(size, remaining(job.deadline)) if paced else 0.0
        if wait and prediction["status"] not in TERMINAL:
            await asyncio.sleep(wait)
            prediction = await self._get(prediction["urls"]["get"], job)
        delay = self._s.poll_initial_s
        while prediction["status"] not in TERMINAL:
            if remaining(job.deadline) <= delay:
                raise ProviderTimeout(
                    self.name, f"prediction still {prediction['status']} at the deadline"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self._s.poll_max_s)
            prediction = await self._get(prediction["urls"]["get"], job)
        if paced and prediction["status"] == "succeeded":  # created just now: its age is known
            existed = time.monotonic() - since
            self._pace.ran(size, run_time(prediction, "predict_time"), existed)
        return prediction

    async def _abandon(self, prediction: dict[str, Any], job: UpscaleJob) -> None:
        """Cancel a prediction we gave up on and follow it to its end (see
        `follow_to_end`)."""
        if prediction.get("status") in TERMINAL:
            return  # ended, and already reported if it bills
        urls = prediction["urls"]

        async def cancel(seconds: float) -> None:
            if urls.get("cancel"):
                await self._client.post(urls["cancel"], headers=self._auth, timeout=seconds)

        async def ended(seconds: float) -> bool | None:
            answer = await self._client.get(urls["get"], headers=self._auth, timeout=seconds)
            try:
                seen = self._prediction(orjson.loads(answer.content))
            except (orjson.JSONDecodeError, ProviderBadResponse):
                return None
            return _billed(seen) if seen["status"] in TERMINAL else None

        await follow_to_end(
            self.name,
            job,
            _job_id(prediction),
            cancel,
            ended,
            (self._s.poll_initial_s, self._s.poll_max_s),
        )

    def _failure(self, prediction: dict[str, Any]) -> ProviderError:
        status = prediction["status"]
        message = str(prediction.get("error") or status)[:300]
        if status == "aborted":
            return ProviderTimeout(self.name, "prediction aborted before it started (not billed)")
        if status == "canceled":
            billed = " after it started (billed)" if _billed(prediction) else ""
            return ProviderUnavailable(self.name, f"prediction was canceled{billed}")
        if _POLICY.search(message):
            return ProviderRejected(self.name, message, code="content_policy_violation")
        if _BAD_IMAGE.search(message):
            return ProviderRejected(self.name, message, code="invalid_image")
        return ProviderBadResponse(self.name, f"prediction failed: {message}")

    async def _download(self, url: str, job: UpscaleJob) -> tuple[bytes, str]:
        """Fetch an output. The API's own URLs get the token; delivery URLs are tried without
        it (public today) and once more with it on a 401/403, but only on a host Replicate
        owns: an output URL is data from the provider, and must not be able to send our token
        to whatever host it names."""
        if same_origin(url, self._s.base_url):
            return await download(
                self._client, self.name, url, deadline=job.deadline, headers=self._auth
            )
        try:
            return await download(self._client, self.name, url, deadline=job.deadline)
        except ProviderBadResponse as exc:
            if exc.upstream_status not in (401, 403) or not self._may_get_token(url):
                raise
        return await download(
            self._client, self.name, url, deadline=job.deadline, headers=self._auth
        )

    def _may_get_token(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme != "https" or not host:
            return False
        owned = any(host == d or host.endswith(f".{d}") for d in _TOKEN_DOMAINS)
        return owned or host in self._token_hosts

    async def _read_output(self, prediction: dict[str, Any], job: UpscaleJob) -> ProviderResult:
        if prediction["status"] != "succeeded":
            raise self._failure(prediction)
        output = prediction.get("output")
        if isinstance(output, list):
            output = output[0] if output else None
        if not isinstance(output, str) or not output:
            raise ProviderBadResponse(self.name, "prediction succeeded without an output")
        data, content_type = await self._download(output, job)
        metrics = prediction.get("metrics") or {}
        predict = metrics.get("predict_time") if isinstance(metrics, dict) else None
        return ProviderResult(
            image=data,
            content_type=content_type,
            provider_job_id=str(prediction.get("id", "")),
            predict_seconds=float(predict) if isinstance(predict, int | float) else None,
        )


def _billed(prediction: dict[str, Any]) -> bool:
    """Whether Replicate bills a prediction in this state: it succeeded, or it was canceled
    after it had started running (`started_at` set). One canceled before it started, and an
    `aborted` one (Cancel-After ran out while it was queued), are not billed."""
    status = prediction.get("status")
    return status == "succeeded" or (status == "canceled" and bool(prediction.get("started_at")))


def replicate_error(provider: str, response: httpx.Response) -> ProviderError:
    """Classify a non-2xx Replicate answer: problem+json `{title, detail, status,
    invalid_fields?}`. Only a 422 whose every invalid field is `input.image`, about its value
    (not its absence or JSON type, which the gateway controls), is the caller's; any other
    refusal is of the request the gateway built. 429s carry their wait in `detail`'s prose."""
    if response.status_code == 422:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        fields = body.get("invalid_fields") if isinstance(body, dict) else None
        if isinstance(fields, list) and fields:
            image = [
                f
                for f in fields
                if isinstance(f, dict)
                and f.get("field") == "input.image"
                and f.get("type") not in ("required", "type")
            ]
            if len(image) == len(fields):
                message = str(image[0].get("description") or body.get("detail") or "invalid")
                return ProviderRejected(provider, message[:300], upstream_status=422)
    return error_for_status(provider, response)
