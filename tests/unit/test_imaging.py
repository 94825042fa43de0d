from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from gateway.config import Limits, OutputConfig
from gateway.errors import ImageRejected, InvalidRequest, UnsupportedMediaType
from gateway.imaging import OutputUnusable, SourceImage, finish, prepare_source, sniff
from tests.conftest import make_image

LIMITS = Limits()
OUT = OutputConfig()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size in its IHDR and carries a tiny IDAT: a decompression bomb's
    header, which must be refused before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "AVIF"])
def test_sniff_reads_magic_bytes(fmt: str) -> None:
    assert sniff(make_image(fmt=fmt)) == fmt.lower()


def test_sniff_rejects_other_bytes() -> None:
    assert sniff(b"%PDF-1.7 ...") is None
    assert sniff(make_image(fmt="BMP")) is None
    with pytest.raises(UnsupportedMediaType):
        prepare_source(b"<svg xmlns='http://www.w3.org/2000/svg'/>", LIMITS)


def sent(src: SourceImage) -> bytes:
    return src.prepared.inputs["any"].data


def test_opaque_png_passes_through_untouched() -> None:
    data = make_image(80, 40)
    src = prepare_source(data, LIMITS)
    assert sent(src) == data and (src.width, src.height) == (80, 40) and src.alpha is None


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_formats_providers_take_go_as_sent(fmt: str) -> None:
    data = make_image(70, 50, fmt=fmt)
    src = prepare_source(data, LIMITS)
    assert sent(src) == data and sniff(sent(src)) == fmt.lower()


@pytest.mark.parametrize("fmt", ["GIF", "AVIF"])
def test_formats_providers_do_not_take_become_png(fmt: str) -> None:
    src = prepare_source(make_image(70, 50, fmt=fmt), LIMITS)
    assert sniff(sent(src)) == "png"
    assert Image.open(io.BytesIO(sent(src))).size == (70, 50)


def test_alpha_is_kept_aside_and_provider_gets_rgb() -> None:
    src = prepare_source(make_image(64, 64, mode="RGBA"), LIMITS)
    assert src.alpha is not None and src.alpha.size == (64, 64)
    assert Image.open(io.BytesIO(sent(src))).mode == "RGB"


def test_bomb_is_refused_from_the_header() -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare_source(png_header_only(60000, 60000), LIMITS)
    assert err.value.param == "image"


@pytest.mark.parametrize(("w", "h"), [(31, 100), (100, 4097), (5000, 40)])
def test_sides_out_of_range(w: int, h: int) -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare_source(png_header_only(w, h), LIMITS)
    assert err.value.code == "image_dimensions_out_of_range"


def test_pixel_limit() -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare_source(png_header_only(4096, 4096), Limits(max_pixels=1_000_000))
    assert err.value.code == "image_too_many_pixels"


def test_truncated_input_is_400() -> None:
    data = make_image(200, 200, fmt="JPEG")
    with pytest.raises(ImageRejected):
        prepare_source(data[: len(data) // 2], LIMITS)
    png = make_image(200, 200)
    with pytest.raises(ImageRejected):
        prepare_source(png[: len(png) - 20], LIMITS)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "webp", "avif"])
def test_finish_gives_exact_size_and_format(fmt: str) -> None:
    provider_output = make_image(256, 192)
    done = finish(provider_output, (100, 75), fmt, None, None, OUT)
    img = Image.open(io.BytesIO(done.data))
    assert img.format.lower() == fmt and img.size == (100, 75) == (done.width, done.height)
    img.load()


def test_finish_passes_matching_output_through() -> None:
    provider_output = make_image(256, 192)
    done = finish(provider_output, None, "png", None, None, OUT)
    assert done.data is provider_output and (done.width, done.height) == (256, 192)


def test_finish_restores_alpha_and_jpeg_flattens_on_white() -> None:
    src = prepare_source(make_image(32, 32, mode="RGBA"), LIMITS)
    provider_output = make_image(128, 128)
    png = Image.open(io.BytesIO(finish(provider_output, None, "png", None, src.alpha, OUT).data))
    assert (
        png.mode == "RGBA" and png.getpixel((2, 64))[3] == 0 and png.getpixel((120, 64))[3] == 255
    )
    jpeg = Image.open(io.BytesIO(finish(provider_output, None, "jpeg", None, src.alpha, OUT).data))
    assert jpeg.mode == "RGB" and min(jpeg.getpixel((2, 64))) > 245  # white where transparent


def test_compression_changes_lossy_size() -> None:
    out = make_image(256, 256)
    small = finish(out, None, "jpeg", 10, None, OUT).data
    large = finish(out, None, "jpeg", 95, None, OUT).data
    assert len(small) < len(large)


def test_no_metadata_carried_over() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    img = Image.open(io.BytesIO(make_image(64, 64, fmt="JPEG", exif=exif.tobytes())))
    assert img.getexif()
    src = prepare_source(make_image(64, 64, fmt="JPEG", exif=exif.tobytes()), LIMITS)
    done = finish(sent(src), (128, 128), "jpeg", None, None, OUT)
    assert b"SecretCam" not in done.data and b"SecretCam" not in sent(src)


def test_unusable_output_is_the_providers_fault() -> None:
    good = make_image(128, 128)
    with pytest.raises(OutputUnusable):
        finish(good[: len(good) // 2], None, "png", None, None, OUT)
    with pytest.raises(OutputUnusable):
        finish(b"<html>oops</html>", None, "png", None, None, OUT)
    webp = make_image(128, 128, fmt="WEBP")
    with pytest.raises(OutputUnusable):
        finish(webp[: len(webp) // 2], (256, 256), "png", None, None, OUT)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_pass_through_refuses_cut_short_output_of_every_checked_format(fmt: str) -> None:
    """The pass-through path reads only the header; the file's end marker (PNG IEND, JPEG
    EOI, WebP RIFF length) is what tells a cut-short download from a whole one."""
    whole = make_image(128, 128, fmt=fmt)
    assert finish(whole, None, fmt.lower(), None, None, OUT).data is whole
    for cut in (len(whole) - 1, len(whole) * 3 // 4):
        with pytest.raises(OutputUnusable):
            finish(whole[:cut], None, fmt.lower(), None, None, OUT)
