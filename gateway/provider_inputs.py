"""What each provider is sent: the input in a format that provider takes, within its size
limit, at the smallest faithful size.

The order of preference, per provider: the caller's own bytes when the provider takes their
format and they need no pixel work (an opaque still image with no rotation to apply), with
their metadata stripped losslessly; else a lossless PNG of the decoded pixels; else, for a
photo whose PNG is over the limit, a JPEG at quality 95. A provider none of these fit is not
a candidate for the request, and the reason says why (the request goes to one that can take
it, or gets a 400 before anything is billed).

Everything here is CPU-bound and synchronous: it runs in an image worker thread. Each
encoding is made at most once per request, whichever providers share it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LOSSLESS = frozenset({"png", "gif"})
JPEG_QUALITY = 95  # only for photos whose lossless PNG is over a provider's limit
# A PNG at zlib level 1 this close to a limit gets one more try at level 9 (about 10 %
# smaller on photos, several times slower), before falling back to a lossy JPEG.
PNG_RETRY_SHARE = 1.35

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ancillary PNG chunks that say how to show the pixels; the rest (text, EXIF, time) are
# metadata the provider has no need of.
_PNG_KEEP = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"sBIT"})


@dataclass(frozen=True, slots=True)
class InputRule:
    """What one provider takes: formats, in order of preference, and its size limit."""

    formats: tuple[str, ...]
    max_bytes: int


@dataclass(frozen=True, slots=True)
class Encoded:
    data: bytes
    fmt: str

    @property
    def mime(self) -> str:
        return MIME[self.fmt]


@dataclass(frozen=True, slots=True)
class ProviderInputs:
    inputs: dict[str, Encoded]  # provider -> what it is sent
    unfit: dict[str, str]  # provider -> why it cannot take this image


def choose(
    original: bytes,
    source_fmt: str,
    as_sent: bool,
    pixels: Callable[[], Image.Image],
    rules: Mapping[str, InputRule],
) -> ProviderInputs:
    """Each provider's input. `as_sent`: the caller's bytes may go as they are (metadata
    aside); `pixels` gives the decoded RGB image, for the encodings that need it."""
    made: dict[str, Encoded | None] = {}

    def encoding(kind: str) -> Encoded | None:
        if kind not in made:
            made[kind] = _make(kind, original, source_fmt, pixels)
        return made[kind]

    inputs: dict[str, Encoded] = {}
    unfit: dict[str, str] = {}
    for provider, rule in rules.items():
        kinds = ["as_sent"] if as_sent and source_fmt in rule.formats else []
        kinds += [f for f in ("png", "jpeg") if f in rule.formats]
        smallest: Encoded | None = None
        for kind in kinds:
            if kind == "jpeg" and source_fmt in LOSSLESS:
                continue  # a drawing or screenshot is not made lossy for size: JPEG smears it
            found = _fitting(encoding, kind, rule.max_bytes)
            if found is not None and len(found.data) <= rule.max_bytes:
                inputs[provider] = found
                break
            if found is not None and (smallest is None or len(found.data) < len(smallest.data)):
                smallest = found
        else:
            unfit[provider] = _why(provider, rule, smallest)
    return ProviderInputs(inputs, unfit)


def _fitting(encoding: Callable[[str], Encoded | None], kind: str, limit: int) -> Encoded | None:
    found = encoding(kind)
    if kind == "png" and found is not None and limit < len(found.data) <= limit * PNG_RETRY_SHARE:
        return encoding("png9") or found
    return found


def _why(provider: str, rule: InputRule, smallest: Encoded | None) -> str:
    takes = "/".join(f.upper() for f in rule.formats)
    limit = f"{provider} takes {takes} up to {rule.max_bytes / 1e6:.1f} MB"
    if smallest is None:
        return f"{limit}: this image cannot be sent in any of them"
    size = len(smallest.data) / 1e6
    return f"{limit}: this image is {size:.1f} MB at its smallest ({smallest.fmt.upper()})"


def _make(
    kind: str, original: bytes, source_fmt: str, pixels: Callable[[], Image.Image]
) -> Encoded | None:
    if kind == "as_sent":
        stripped = strip_metadata(original, source_fmt)
        return Encoded(stripped, source_fmt) if stripped is not None else None
    buf = io.BytesIO()
    if kind in ("png", "png9"):
        pixels().save(buf, format="PNG", compress_level=1 if kind == "png" else 9)
        return Encoded(buf.getvalue(), "png")
    pixels().save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return Encoded(buf.getvalue(), "jpeg")


def strip_metadata(data: bytes, fmt: str) -> bytes | None:
    """The same image without metadata (EXIF, XMP, comments, text chunks), losslessly;
    None where that cannot be done without decoding."""
    if fmt == "png":
        return _strip_png(data)
    if fmt == "jpeg":
        return _strip_jpeg(data)
    if fmt == "webp" and data[12:16] in (b"VP8 ", b"VP8L"):
        return data  # the simple format: one bitstream chunk, no room for metadata
    return None


def _strip_png(data: bytes) -> bytes | None:
    if not data.startswith(_PNG_SIGNATURE):
        return None
    out = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return None
        if kind in _PNG_KEEP:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            return b"".join(out)
    return None


def _strip_jpeg(data: bytes) -> bytes | None:
    """Drop APP1-APP15 (EXIF, XMP, ICC, vendor data) and COM segments; keep JFIF (APP0) and
    Adobe's APP14, which say how to read the colour channels. The ICC profile goes as the
    PNG path has always dropped it: the provider sees the same raw values either way. Stops
    at the first SOS: the entropy-coded data after it is copied as it is."""
    if not data.startswith(b"\xff\xd8"):
        return None
    out = [b"\xff\xd8"]
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return None
        if marker == 0xDA:  # start of scan: the rest is image data
            out.append(data[pos:])
            return b"".join(out)
        drop = marker == 0xFE or (0xE1 <= marker <= 0xEF and marker != 0xEE)
        if not drop:
            out.append(data[pos:end])
        pos = end
    return None
