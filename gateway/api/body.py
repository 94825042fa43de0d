"""Reading an edit request's body, bounded while it is read: multipart exactly as the OpenAI
SDKs and `curl -F` send it (bracket notation for nested `extra_body` fields), or JSON."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from gateway.errors import (
    BodiesBusy,
    ClientClosedRequest,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)

FIELD_BYTES = 64 * 1024  # one form field
FORM_OVERHEAD = 256 * 1024  # boundaries, headers and the text fields around the image
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_IMAGE_KEYS = ("image", "image[]")


@dataclass(slots=True)
class EditBody:
    fields: dict[str, Any]
    image: bytes | None = None
    image_ref: str | None = None  # an https URL or a data URI, to be loaded
    form: bool = False  # multipart: every field arrived as text
    json_parts: frozenset[str] = frozenset()  # form fields sent as one JSON part each


def unflatten(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """`provider[only][]=a` -> {"provider": {"only": ["a"]}}; repeated plain keys keep the last."""
    out: dict[str, Any] = {}
    for key, value in items:
        match = _KEY.match(key)
        if not match:
            raise InvalidRequest(f"Malformed field name {key[:60]!r}.", param=key[:60])
        path = [match[1], *re.findall(r"\[([^\[\]]*)\]", match[2])]
        node: Any = out
        for part, nxt in zip(path, [*path[1:], None], strict=True):
            if nxt is None:
                if part == "":
                    node.append(value)
                else:
                    node[part] = value
                break
            child: Any = [] if nxt == "" else {}
            if part == "":
                node.append(child)
            else:
                existing = node.get(part)
                if existing is None:
                    node[part] = child
                elif not isinstance(existing, type(child)):
                    raise InvalidRequest(f"Conflicting field {key[:60]!r}.", param=path[0])
                else:
                    child = existing
            node = child
    return out


# A body that came too slowly: the connection is closed, or the client's trickle would hold
# it (uvicorn reads and drops the rest of an unread body, as long as it keeps coming). Other
# early refusals keep it open: a close with the body still arriving resets the connection,
# and the client could lose the answer that says why.
CLOSE = {"connection": "close"}


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than the gateway accepts ({limit} bytes).",
        code="payload_too_large",
    )


class BodyBudget:
    """Bytes of request bodies being read at once in this process, each counted at its
    declared length (or its cap, when chunked): a burst of large uploads is refused with a
    503 before it is read, rather than held whole in memory until the process dies."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        if self.held + size > self.limit and self.held > 0:  # one body always fits
            raise BodiesBusy(
                "The gateway is reading as many large uploads as it holds memory for; retry "
                "in a moment.",
                headers={"retry-after": "1"},
            )
        self.held += size
        try:
            yield
        finally:
            self.held -= size


async def bounded(
    request: Request, limit: int, idle_s: float, total_s: float
) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    total = 0
    chunks = request.stream().__aiter__()
    deadline = time.monotonic() + total_s
    while True:
        # A client that stops sending would hold its worker's memory and a connection for
        # good: each chunk must come within idle_s of the last, and all by total_s (a byte
        # every few seconds is no upload).
        wait = min(idle_s, deadline - time.monotonic())
        late = wait < idle_s  # which bound a timeout here would be (asyncio fires early)
        try:
            if wait <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), wait)
        except StopAsyncIteration:
            return
        except ClientDisconnect:
            raise ClientClosedRequest(
                f"The client closed the connection after {total} bytes of the body."
            ) from None
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {total_s:g} s ({total} bytes in)."
                if late
                else f"The request body stopped arriving ({total} bytes in, nothing for "
                f"{idle_s:g} s).",
                headers=dict(CLOSE),
            ) from None
        total += len(chunk)
        if total > limit:  # also covers chunked bodies with no Content-Length
            raise _too_large(limit)
        yield chunk


def declared_size(request: Request, limit: int) -> int:
    """What a body will take while read: its Content-Length, or the cap when it has none."""
    declared = request.headers.get("content-length", "")
    return min(int(declared), limit) if declared.isascii() and declared.isdigit() else limit


def body_limit(request: Request, max_image_bytes: int) -> int:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return max_image_bytes + FORM_OVERHEAD
    return (max_image_bytes * 4) // 3 + FORM_OVERHEAD  # JSON: a data URI is base64


async def read_edit_body(
    request: Request, max_image_bytes: int, idle_s: float = 15.0, total_s: float = 60.0
) -> EditBody:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = body_limit(request, max_image_bytes)
    if ctype == "multipart/form-data":
        stream = bounded(request, limit, idle_s, total_s)
        return await _read_multipart(request, stream, max_image_bytes)
    if ctype in ("application/json", "") or ctype.endswith("+json"):
        return await _read_json(bounded(request, limit, idle_s, total_s))
    raise UnsupportedMediaType(
        f"Send multipart/form-data or application/json, not {ctype!r}.",
        code="unsupported_content_type",
    )


async def _read_multipart(
    request: Request, stream: AsyncIterator[bytes], max_image_bytes: int
) -> EditBody:
    parser = MultiPartParser(
        request.headers,
        stream,
        max_files=4,
        max_fields=200,
        max_part_size=FIELD_BYTES,  # text fields; file parts are bounded by the body's limit
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"Malformed multipart body: {exc.message}") from exc
    except (UnicodeError, LookupError) as exc:  # a charset= whose codec fails (Starlette
        # catches UnicodeDecodeError only; "undefined" and "punycode" raise UnicodeError)
        raise InvalidRequest(f"The multipart body's charset cannot be used: {exc}") from exc
    try:
        uploads = [v for k in _IMAGE_KEYS for v in form.getlist(k) if isinstance(v, UploadFile)]
        texts = [
            (k, v if isinstance(v, str) else await _text_part(k, v))
            for k, v in form.multi_items()
            if isinstance(v, str) or k not in _IMAGE_KEYS
        ]
        fields = unflatten((k, v) for k, v in texts if k not in _IMAGE_KEYS)
        parts = frozenset({"provider"} if _json_part(fields, "provider") else ())
        refs = [v for k, v in texts if k in _IMAGE_KEYS]
        if len(uploads) + len(refs) != 1:
            raise InvalidRequest(
                f"Send exactly one image; got {len(uploads) + len(refs)}.", param="image"
            )
        if refs:
            return EditBody(fields, image_ref=refs[0], form=True, json_parts=parts)
        data = await uploads[0].read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise PayloadTooLarge(
                f"The image is larger than {max_image_bytes} bytes.", param="image"
            )
        return EditBody(fields, image=data, form=True, json_parts=parts)
    finally:
        await form.close()


async def _text_part(name: str, part: UploadFile) -> str:
    """A field sent as a file part (`-F provider=@p.json`, a browser's Blob): its text, as
    long as a text field may be. Dropping it would serve the request without what it asked."""
    data = await part.read(FIELD_BYTES + 1)
    if len(data) > FIELD_BYTES:
        raise PayloadTooLarge(f"'{name[:60]}' is longer than {FIELD_BYTES} bytes.", param=name[:60])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"'{name[:60]}' must be UTF-8 text.", param=name[:60]) from None


def _json_part(fields: dict[str, Any], name: str) -> bool:
    """An object field sent as one form part of JSON text (OpenAPI's default encoding for an
    object in a form, and what `curl -F 'provider={"only":["fal"]}'` sends), beside the
    bracket notation (`provider[only][]=fal`)."""
    value = fields.get(name)
    if not (isinstance(value, str) and value.lstrip().startswith("{")):
        return False
    try:
        fields[name] = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"'{name}' is not valid JSON: {exc}", param=name) from None
    return True


async def _read_json(stream: AsyncIterator[bytes]) -> EditBody:
    body = bytearray()
    async for chunk in stream:
        body += chunk
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise InvalidRequest("The JSON body must be an object.")
    return EditBody(fields, image_ref=json_image_ref(fields))


def json_image_ref(fields: dict[str, Any]) -> str:
    """`image` as a string or {"image_url"}; or OpenAI's JSON edits shape `images: [{...}]`."""
    image = fields.pop("image", None)
    images = fields.pop("images", None)
    if image is None and isinstance(images, list) and len(images) == 1:
        image, param = images[0], "images"
    elif image is not None and images is None:
        param = "image"
    else:
        raise InvalidRequest(
            "Send exactly one image as 'image' (or 'images' with one item).", param="image"
        )
    if isinstance(image, dict):  # OpenAI's {"image_url": ...}
        image = image.get("image_url")
    if not isinstance(image, str) or not image:
        raise InvalidRequest("The image must be an https URL or a data URI string.", param=param)
    return image


@dataclass(slots=True)
class Upload:
    """A file uploaded as multipart `file` (spooled to disk by the parser past 1 MiB, never
    held whole) and the form's text fields."""

    file: UploadFile
    fields: dict[str, str]

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.file.read(1 << 20):
            yield chunk


@contextlib.asynccontextmanager
async def read_upload(
    request: Request, limit: int, idle_s: float, total_s: float
) -> AsyncIterator[Upload]:
    """The multipart upload of POST /v1/files, bounded in size and time as it arrives."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Upload a file as multipart/form-data, not {ctype!r}.",
            code="unsupported_content_type",
        )
    parser = MultiPartParser(
        request.headers,
        bounded(request, limit + FORM_OVERHEAD, idle_s, total_s),
        max_files=1,
        max_fields=8,
        max_part_size=FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"Malformed multipart body: {exc.message}") from exc
    except (UnicodeError, LookupError) as exc:
        raise InvalidRequest(f"The multipart body's charset cannot be used: {exc}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Send the file as the multipart part 'file'.", param="file")
        if (upload.size or 0) > limit:
            raise _too_large(limit)
        texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        yield Upload(upload, texts)
    finally:
        await form.close()
