"""Image work: sniff and bound the input, prepare what each provider gets, and turn the
provider's output into the exact size and format asked for.

Every function here is synchronous and CPU-bound: callers run them in a worker thread
(`ImageWorkers`), never on the event loop.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image, ImageOps

from gateway import vips
from gateway.config import Limits, OutputConfig
from gateway.errors import ImageRejected, InvalidRequest, UnsupportedMediaType
from gateway.provider_inputs import InputRule, ProviderInputs, choose

# Encoders write at most a few dozen scans (libjpeg's progressive default is 10); 0xFFDA
# cannot occur inside entropy-coded data (a 0xFF there is always stuffed or a restart).
MAX_JPEG_SCANS = 100
# Tests and tools that prepare an input for no provider in particular.
ANY_PROVIDER: Mapping[str, InputRule] = {"any": InputRule(("png", "jpeg", "webp"), 10**9)}

CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "avif": "image/avif",
}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "avif": "AVIF"}
_AVIF_BRANDS = (b"avif", b"avis")


class OutputUnusable(Exception):
    """The provider's output does not decode: the router treats it as a provider fault."""


def sniff(data: bytes) -> str | None:
    """The real type from magic bytes only: filenames and part content types are unreliable."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        box_size = int.from_bytes(data[:4], "big")
        brands = data[8 : min(max(box_size, 16), 64)]
        if any(brands[i : i + 4] in _AVIF_BRANDS for i in range(0, len(brands) - 3, 4)):
            return "avif"
    return None


@dataclass(frozen=True, slots=True)
class SourceImage:
    prepared: ProviderInputs  # what each provider is sent, and which cannot take it
    width: int
    height: int
    source_format: str
    alpha: Image.Image | None  # the input's alpha plane, restored on the output


@dataclass(frozen=True, slots=True)
class FinishedImage:
    data: bytes
    width: int
    height: int
    output_format: str

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.output_format]


def _open(data: bytes, fmt: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(exc) from exc
    except Exception as exc:  # a codec fed hostile bytes may raise anything: a bad image
        raise ImageRejected(
            f"The {fmt.upper()} image could not be read: {_said(exc)}", param="image"
        ) from exc


def _too_many_pixels(exc: Exception) -> InvalidRequest:
    return InvalidRequest(
        f"The image declares too many pixels: {exc}", param="image", code="image_too_many_pixels"
    )


def _said(exc: Exception) -> str:
    return (str(exc) or type(exc).__name__)[:200]


def check_bounds(width: int, height: int, limits: Limits) -> None:
    if not (
        limits.min_side <= width <= limits.max_side and limits.min_side <= height <= limits.max_side
    ):
        raise InvalidRequest(
            f"The image is {width}x{height}; each side must be between {limits.min_side} and "
            f"{limits.max_side} pixels.",
            param="image",
            code="image_dimensions_out_of_range",
        )
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"The image has {width * height} pixels; the limit is {limits.max_pixels}.",
            param="image",
            code="image_too_many_pixels",
        )


@dataclass(frozen=True, slots=True)
class Header:
    """An image's size as its header declares it, and as `prepare_source` turns it upright."""

    width: int
    height: int
    upright: tuple[int, int]


def read_header(data: bytes) -> Header | None:
    """The sizes `prepare_source` will find, from the header alone (no pixel decoded); None
    when the header cannot tell (not an image, unreadable, broken EXIF): `prepare_source`
    then refuses it or measures it itself."""
    fmt = sniff(data)
    if fmt is None:
        return None
    try:
        img = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except Exception:  # a bomb or bad bytes: prepare_source answers with its own error
        return None
    width, height = img.size
    upright = (width, height)
    if fmt in ("jpeg", "webp", "avif"):  # the formats prepare_source turns upright
        orientation = _orientation(img)
        if orientation == -1:
            return None
        if orientation in (5, 6, 7, 8):  # a quarter turn: the sides swap
            upright = (height, width)
    return Header(width, height, upright)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def prepare_source(
    data: bytes, limits: Limits, rules: Mapping[str, InputRule] = ANY_PROVIDER
) -> SourceImage:
    """Sniff, bound (from the header, before any pixel is decoded), and make each provider's
    input (`rules`: what each provider takes; see gateway/provider_inputs.py)."""
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedMediaType(
            "The image must be PNG, JPEG, WebP, GIF or AVIF (decided from its bytes).",
            param="image",
            code="unsupported_image_type",
        )
    img = _open(data, fmt)
    width, height = img.size
    check_bounds(width, height, limits)
    if fmt == "jpeg" and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        # Each scan of a progressive JPEG is decoded over the whole frame: a small file of
        # thousands of scans would hold an image worker for a minute.
        raise ImageRejected(
            f"The JPEG has more than {MAX_JPEG_SCANS} scans; re-save it.", param="image"
        )
    try:
        still = not getattr(img, "is_animated", False)
        if fmt == "png" and not _has_alpha(img) and still:
            # An opaque still PNG may go as sent: verify() walks every chunk's CRC (catching
            # truncation) without decoding pixels, which only a re-encode needs.
            img.verify()
            return SourceImage(
                choose(data, fmt, True, lambda: _rgb(_open(data, fmt)), rules),
                width,
                height,
                fmt,
                None,
            )
        img.seek(0)  # GIF / APNG / animated WebP: the first frame
        rotated = _orientation(img) not in (None, 1)
        as_sent = fmt in ("jpeg", "webp") and still and not rotated and img.mode in ("RGB", "L")
        img = ImageOps.exif_transpose(img) if fmt in ("jpeg", "webp", "avif") else img
        img.load()  # decoded even when sent as is: a truncated or corrupt file is refused here
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(exc) from exc
    except Exception as exc:  # AVIF's decoder raises RuntimeError on corrupt planes, ...
        raise ImageRejected(f"The image could not be decoded: {_said(exc)}", param="image") from exc
    width, height = img.size
    alpha = None
    if _has_alpha(img):
        rgba = _eight_bit(img).convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() == (255, 255):
            alpha = None  # declared but fully opaque: nothing to restore
        rgb = rgba.convert("RGB")
    else:
        rgb = _rgb(img)
    inputs = choose(data, fmt, as_sent and alpha is None, lambda: rgb, rules)
    return SourceImage(inputs, width, height, fmt, alpha)


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else _eight_bit(img).convert("RGB")


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit greys (PNG's, which Pillow opens as I or I;16) scaled to 8 bits: Pillow's own
    conversion clips them, and a 16-bit grey photo would turn white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return img.convert("I").point(lambda v: v / 256).convert("L")
    return img


def _orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block: treat as rotated, so the pixels are re-encoded
        return -1
    return value if isinstance(value, int) else None


def finish(
    output: bytes,
    target: tuple[int, int] | None,
    output_format: str,
    quality: int | None,
    alpha: Image.Image | None,
    config: OutputConfig,
) -> FinishedImage:
    """The provider's output at exactly `target` (None: as it came) in `output_format`."""
    fmt = sniff(output)
    if fmt is None:
        raise OutputUnusable("the provider's output is not an image")
    try:
        img = Image.open(io.BytesIO(output), formats=[_PIL_FORMATS[fmt]])
        size = img.size
        if (target is None or target == size) and fmt == output_format and alpha is None:
            # Pass-through: the size came from the header; a look at the end of the file
            # catches a cut-short download, the damage a TLS transport can leave. Formats
            # with no end marker are decoded instead.
            whole = _ends_whole(output, fmt)
            if whole is None:
                img.load()
            elif not whole:
                raise OutputUnusable("the provider's output is cut short")
            return FinishedImage(output, size[0], size[1], fmt)
        fast = vips.finish(
            output, target, alpha, output_format, _vips_options(output_format, quality, config)
        )
        if fast is not None:
            return FinishedImage(fast[0], fast[1], fast[2], output_format)
        img.load()
    except OutputUnusable:
        raise
    except Exception as exc:  # whatever a codec raises on it, the output is unusable
        raise OutputUnusable(f"the provider's output does not decode: {_said(exc)}") from exc
    img = img.convert("RGB")
    if target is not None and target != img.size:
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if alpha is not None:
        img.putalpha(alpha.resize(img.size, Image.Resampling.LANCZOS))
    data = encode(img, output_format, quality, config)
    return FinishedImage(data, img.size[0], img.size[1], output_format)


def _ends_whole(data: bytes, fmt: str) -> bool | None:
    """Whether the file ends where its format says it does; None for formats without an
    end marker."""
    if fmt == "png":
        return data.endswith(b"IEND\xaeB`\x82")  # the IEND chunk and its CRC
    if fmt == "jpeg":
        return data.endswith(b"\xff\xd9")  # EOI
    if fmt == "webp":  # the RIFF header gives the length
        return len(data) == int.from_bytes(data[4:8], "little") + 8
    return None


def _vips_options(fmt: str, quality: int | None, config: OutputConfig) -> str:
    if fmt == "png":
        return f"compression={config.png_compress_level},filter=all"
    return f"Q={config.jpeg_quality if quality is None else quality}"


def encode(img: Image.Image, fmt: str, quality: int | None, config: OutputConfig) -> bytes:
    """Encode with no metadata carried over (no EXIF, ICC or text chunks are passed)."""
    buf = io.BytesIO()
    if fmt == "png":  # lossless: output_compression does not apply (as with OpenAI)
        img.save(buf, format="PNG", compress_level=config.png_compress_level)
    elif fmt == "jpeg":
        if img.mode == "RGBA":  # JPEG has no alpha: flatten onto white
            flat = Image.new("RGB", img.size, (255, 255, 255))
            flat.paste(img, mask=img.getchannel("A"))
            img = flat
        img.save(buf, format="JPEG", quality=config.jpeg_quality if quality is None else quality)
    elif fmt == "webp":
        img.save(
            buf,
            format="WEBP",
            quality=config.webp_quality if quality is None else quality,
            method=4,
        )
    elif fmt == "avif":
        img.save(
            buf, format="AVIF", quality=config.avif_quality if quality is None else quality, speed=8
        )
    elif fmt == "gif":
        # Fast octree: 256 colours for 16 MP in a quarter second; median cut took 17 s
        # (bench/imaging.py) for no better a GIF.
        if img.mode == "RGBA":
            mask = img.getchannel("A").point(lambda a: 255 if a < 128 else 0)
            pal = img.convert("RGB").quantize(255, method=Image.Quantize.FASTOCTREE)
            pal.paste(255, mask=mask)  # palette index 255 is the transparent one
            pal.save(buf, format="GIF", transparency=255)
        else:
            img.quantize(256, method=Image.Quantize.FASTOCTREE).save(buf, format="GIF")
    else:
        raise ValueError(f"unknown output format {fmt}")
    return buf.getvalue()
