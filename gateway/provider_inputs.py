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

from PIL import Image, ImageChops

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LOSSLESS = frozenset({"png", "gif"})
JPEG_QUALITY = 95  # only for photos whose lossless PNG is over a provider's limit
# A PNG at zlib level 1 this close to a limit gets one more try at level 6 (about 25 %
# smaller on photos, four times slower; level 9 is 60 times slower for 8 % more), before a
# photo falls back to a lossy JPEG.
PNG_RETRY_SHARE = 1.35

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ancillary PNG chunks that say how to show the pixels (the colour profile among them, as a
# re-encode keeps it too); the rest (text, EXIF, time) are metadata the provider has no
# need of.
_PNG_KEEP = frozenset(
    {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"iCCP"}
)


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
    decoded: list[Image.Image] = []

    def once() -> Image.Image:  # decoded at most once, and only if an encoding needs it
        if not decoded:
            decoded.append(pixels())
        return decoded[0]

    def encoding(kind: str) -> Encoded | None:
        if kind not in made:
            made[kind] = _make(kind, original, source_fmt, once)
        return made[kind]

    inputs: dict[str, Encoded] = {}
    unfit: dict[str, str] = {}
    lossless = source_fmt in LOSSLESS or (
        source_fmt == "webp" and _webp_bitstream(original) == b"VP8L"
    )
    for provider, rule in rules.items():
        kinds = ["as_sent"] if as_sent and source_fmt in rule.formats else []
        kinds += [f for f in ("png", "jpeg") if f in rule.formats]
        smallest: Encoded | None = None
        for kind in kinds:
            if kind == "jpeg" and lossless:
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
        return encoding("png6") or found
    return found


def _why(provider: str, rule: InputRule, smallest: Encoded | None) -> str:
    takes = "/".join(f.upper() for f in rule.formats)
    limit = f"{provider} takes {takes} up to {_size(rule.max_bytes)}"
    if smallest is None:
        return f"{limit}: this image cannot be sent in any of them"
    size = _size(len(smallest.data))
    return f"{limit}: this image is {size} at its smallest ({smallest.fmt.upper()})"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _make(
    kind: str, original: bytes, source_fmt: str, pixels: Callable[[], Image.Image]
) -> Encoded | None:
    if kind == "as_sent":
        stripped = strip_metadata(original, source_fmt)
        if stripped is None:
            return None
        if source_fmt == "jpeg" and not _same_pixels(stripped, pixels()):
            return None  # the walk and the decoder read it differently: send what we checked
        return Encoded(stripped, source_fmt)
    buf = io.BytesIO()
    img = pixels()
    icc = _rgb_profile(img)
    if kind in ("png", "png6"):
        img.save(buf, format="PNG", compress_level=1 if kind == "png" else 6, icc_profile=icc)
        return Encoded(buf.getvalue(), "png")
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, icc_profile=icc)
    return Encoded(buf.getvalue(), "jpeg")


def _rgb_profile(img: Image.Image) -> bytes | None:
    """The decoded image's ICC profile if it describes RGB, as the re-encoded pixels are; a
    CMYK or grey source's profile would misdescribe them."""
    icc = img.info.get("icc_profile")
    return icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None


def _same_pixels(data: bytes, expected: Image.Image) -> bool:
    """Whether `data` decodes to exactly the image validated: what a provider is sent must
    be what the gateway measured and bounded, whatever a crafted file's structure says."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            img.load()
            if img.size != expected.size:
                return False
            decoded = img if img.mode == "RGB" else img.convert("RGB")
            return ImageChops.difference(decoded, expected).getbbox() is None
    except Exception:  # anything a decoder may raise on it: not the same image
        return False


def strip_metadata(data: bytes, fmt: str) -> bytes | None:
    """The same image without metadata (EXIF, XMP, comments, text chunks, thumbnails,
    anything after the image's end), losslessly; None where that cannot be done by a strict
    walk of the file's structure (the caller then re-encodes the decoded pixels). The walk
    accepts only what a baseline or progressive JPEG, a PNG or a simple WebP holds: a file
    that a decoder and this walk could read differently is never passed on."""
    walk = {"png": _strip_png, "jpeg": _strip_jpeg, "webp": _simple_webp}.get(fmt)
    stripped = walk(data) if walk is not None else None
    # A file with nothing to strip is sent as the very object the caller's bytes are in: a
    # copy of it would be a second copy of the input held while the provider works.
    return data if stripped == data else stripped


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
            return b"".join(out)  # and nothing after it
    return None


# JPEG markers a baseline, extended or progressive Huffman JPEG may hold between SOI and EOI
# (SOF0/1/2, DHT, DQT, DRI, SOS, APPn, COM). Any other (arithmetic, lossless, hierarchical,
# RSTn or TEM out of a scan, DNL, fill bytes between segments) makes the walk give up.
_SOF = frozenset({0xC0, 0xC1, 0xC2})
_TABLES = frozenset({0xC4, 0xDB, 0xDD})


def _strip_jpeg(data: bytes) -> bytes | None:
    """Keep SOI, a JFIF APP0, Adobe's APP14 (how to read the channels), the ICC profile
    (APP2 ICC_PROFILE: the colours), the frame, tables and scans, and EOI; drop every other
    APPn and COM, before or between scans, and whatever follows EOI."""
    if not data.startswith(b"\xff\xd8"):
        return None
    out = [b"\xff\xd8"]
    icc: list[bytes] = []
    pos, frames = 2, 0
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xD9:
            if frames != 1:
                return None
            profile = _icc_segments(icc, out)
            return b"".join([out[0], *profile, *out[1:], b"\xff\xd9"])
        if pos + 4 > len(data):
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return None
        segment = data[pos:end]
        if marker in _SOF:
            frames += 1
            out.append(segment)
        elif marker in _TABLES:
            out.append(segment)
        elif marker == 0xDA:  # a scan: its header, then entropy-coded data up to a marker
            if frames != 1:
                return None
            scan_end = _scan_end(data, end)
            if scan_end is None:
                return None
            out.append(data[pos:scan_end])
            pos = scan_end
            continue
        elif marker == 0xE0:
            if segment[4:9] == b"JFIF\x00" and length >= 16:
                # Rebuilt: version and density only, no thumbnail, nothing after them.
                out.append(b"\xff\xe0\x00\x10" + segment[4:16] + b"\x00\x00")
        elif marker == 0xE2:
            if segment[4:16] == b"ICC_PROFILE\x00":
                icc.append(segment)
        elif marker == 0xEE:
            if segment[4:9] == b"Adobe" and length >= 14:
                # Rebuilt: only the colour transform byte says anything about the pixels.
                out.append(b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + segment[15:16])
        elif not (0xE1 <= marker <= 0xEF or marker == 0xFE):
            return None
        pos = end
    return None


def _icc_segments(segments: list[bytes], kept: list[bytes]) -> list[bytes]:
    """The ICC profile's APP2 segments if they make one well-formed RGB or grey profile (in
    sequence, complete, the length it declares, the `acsp` signature, a colour space that
    matches the frame's components); none otherwise: the colours then read as sRGB."""
    if not segments:
        return []
    count = len(segments)
    if any(len(s) <= 18 or s[16] != n + 1 or s[17] != count for n, s in enumerate(segments)):
        return []
    profile = b"".join(s[18:] for s in segments)
    frame = next((s for s in kept if s[1] in _SOF), b"")
    components = frame[9] if len(frame) > 9 else 0
    space = {3: b"RGB ", 1: b"GRAY"}.get(components)
    if (
        len(profile) < 128
        or int.from_bytes(profile[:4], "big") != len(profile)
        or profile[36:40] != b"acsp"
        or profile[16:20] != space
    ):
        return []
    return segments


def _scan_end(data: bytes, pos: int) -> int | None:
    """Where the entropy-coded data starting at `pos` ends: the next marker that is not a
    stuffed 0xFF00 or a restart marker (RST0-7), which belong to the scan."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        elif following == 0xFF:
            pos += 1  # fill bytes before a marker
        else:
            return pos


def _webp_bitstream(data: bytes) -> bytes | None:
    """The first bitstream chunk's tag: b"VP8 " (lossy) or b"VP8L" (lossless)."""
    pos = 12
    while pos + 8 <= len(data):
        tag = data[pos : pos + 4]
        if tag in (b"VP8 ", b"VP8L"):
            return tag
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)
    return None


def _simple_webp(data: bytes) -> bytes | None:
    """A simple WebP (one VP8 or VP8L chunk filling the RIFF, no VP8X header, so no room
    for metadata or alpha), cut at the RIFF's end; None for anything else."""
    if len(data) < 20 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    riff_end = int.from_bytes(data[4:8], "little") + 8
    chunk = data[12:16]
    size = int.from_bytes(data[16:20], "little")
    if chunk not in (b"VP8 ", b"VP8L") or riff_end > len(data):
        return None
    if 20 + size + (size & 1) != riff_end:
        return None  # more chunks after the bitstream (EXIF, XMP): re-encode instead
    return data[:riff_end]
