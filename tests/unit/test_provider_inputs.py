"""Each provider gets a format it takes, within its size limit, at the smallest faithful size;
one that cannot take the image is named with the reason."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageChops, ImageCms, PngImagePlugin

from gateway.config import Limits
from gateway.errors import ImageRejected
from gateway.imaging import prepare_source
from gateway.provider_inputs import InputRule, strip_metadata
from tests.conftest import make_image

LIMITS = Limits()
BIG = 10**9
FAL = InputRule(("png", "jpeg"), 9_999_999)
REPLICATE = InputRule(("png", "jpeg", "webp"), 9_999_999)


def photo(width: int, height: int, quality: int = 90, **save: object) -> bytes:
    """Noise over gradients: compresses like a photo (badly as PNG)."""
    noise = Image.effect_noise((width, height), 60)
    ramp = Image.linear_gradient("L").resize((width, height))
    img = Image.merge("RGB", (noise, ramp, ImageChops.add(noise, ramp, scale=2)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **save)
    return buf.getvalue()


def pixels(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def same_pixels(a: bytes, b: bytes) -> bool:
    return ImageChops.difference(pixels(a), pixels(b)).getbbox() is None


def test_jpeg_goes_as_sent_without_its_metadata() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    data = photo(300, 200, exif=exif.tobytes(), comment=b"private note")
    src = prepare_source(data, LIMITS, {"fal": FAL, "replicate": REPLICATE})
    sent = src.prepared.inputs["replicate"]
    assert sent.fmt == "jpeg" and sent.mime == "image/jpeg"
    assert b"SecretCam" not in sent.data and b"private note" not in sent.data
    assert len(sent.data) < len(data) and same_pixels(sent.data, data)  # the same scan data
    assert src.prepared.inputs["fal"] is sent  # made once, shared


def test_an_input_with_nothing_to_strip_is_sent_as_the_same_object() -> None:
    # A second copy of every upload, held while the provider works, was 1x the input of
    # RSS per request in flight (bench/scale.py); what goes as sent is the caller's object.
    clean = make_image(90, 60)
    src = prepare_source(clean, LIMITS, {"fal": FAL, "replicate": REPLICATE})
    assert src.prepared.inputs["fal"].data is clean
    assert src.prepared.inputs["replicate"].data is clean
    simple_webp = io.BytesIO()
    Image.open(io.BytesIO(clean)).save(simple_webp, format="WEBP", lossless=True)
    webp = simple_webp.getvalue()
    assert strip_metadata(webp, "webp") is webp
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "SecretAuthor")
    tagged = make_image(90, 60, pnginfo=info)
    stripped = strip_metadata(tagged, "png")
    assert stripped is not None and stripped != tagged and b"SecretAuthor" not in stripped


def test_png_text_chunks_are_dropped_losslessly() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "SecretAuthor")
    data = make_image(90, 60, pnginfo=info)
    src = prepare_source(data, LIMITS, {"fal": FAL})
    sent = src.prepared.inputs["fal"].data
    assert b"SecretAuthor" not in sent and same_pixels(sent, data)


def test_a_rotated_jpeg_is_sent_upright_as_png() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    data = photo(120, 80, exif=exif.tobytes())
    src = prepare_source(data, LIMITS, {"fal": FAL})
    sent = src.prepared.inputs["fal"]
    assert sent.fmt == "png" and pixels(sent.data).size == (80, 120) == (src.width, src.height)


def test_a_photo_too_large_as_png_goes_as_its_jpeg() -> None:
    # The case: a 3000x3000 photo of 1.4 MB became a 13.9 MB PNG, over the limit.
    data = photo(3000, 3000, quality=75)
    assert len(data) < 9_999_999
    src = prepare_source(data, LIMITS, {"fal": FAL, "replicate": REPLICATE})
    for provider in ("fal", "replicate"):
        sent = src.prepared.inputs[provider]
        assert sent.fmt == "jpeg" and len(sent.data) <= 9_999_999
    assert not src.prepared.unfit


def test_a_provider_that_takes_only_png_is_unfit_for_a_big_photo() -> None:
    data = photo(3000, 3000, quality=75)
    src = prepare_source(data, LIMITS, {"png-only": InputRule(("png",), 9_999_999)})
    assert src.prepared.inputs == {}
    why = src.prepared.unfit["png-only"]
    assert "png-only takes PNG up to 10.0 MB" in why and "MB at its smallest (PNG)" in why


def test_a_rotated_photo_over_the_png_limit_becomes_a_fine_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down
    data = photo(2000, 1500, exif=exif.tobytes())
    src = prepare_source(data, LIMITS, {"fal": InputRule(("png", "jpeg"), 3_000_000)})
    sent = src.prepared.inputs["fal"]
    assert sent.fmt == "jpeg" and len(sent.data) <= 3_000_000
    assert pixels(sent.data).size == (2000, 1500)


def test_a_drawing_is_never_made_lossy_for_size() -> None:
    data = make_image(400, 400)
    src = prepare_source(data, LIMITS, {"small": InputRule(("png", "jpeg"), len(data) // 3)})
    assert src.prepared.inputs == {} and "small takes PNG/JPEG" in src.prepared.unfit["small"]


def test_a_format_the_provider_does_not_take_is_converted() -> None:
    data = make_image(64, 48, fmt="WEBP")
    src = prepare_source(data, LIMITS, {"fal": FAL, "replicate": REPLICATE})
    assert src.prepared.inputs["replicate"].fmt == "webp"  # as sent
    assert src.prepared.inputs["fal"].fmt == "png" and same_pixels(
        src.prepared.inputs["fal"].data, src.prepared.inputs["replicate"].data
    )


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_strip_metadata_refuses_what_it_cannot_walk(fmt: str) -> None:
    data = make_image(32, 32, fmt=fmt.upper())
    assert strip_metadata(data[:40], fmt) is None  # cut inside the headers
    assert strip_metadata(b"not an image", fmt) is None
    assert strip_metadata(data, fmt) is not None


def jpeg_of(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **save)
    return buf.getvalue()


def test_a_crafted_jpeg_cannot_send_other_pixels_than_were_checked() -> None:
    # A restart marker before the first scan has no length to libjpeg but had one to the
    # walk: a COM that hides a fake APP1 swallows the checked 64x64 decoy, and a second,
    # 6000x3000 image after the decoy's end would have been what the provider got.
    decoy = jpeg_of(Image.new("RGB", (64, 64), (128, 128, 128)))[2:]
    other = jpeg_of(Image.new("RGB", (6000, 3000), (255, 0, 0)), quality=50)[2:]
    app1 = (2 + 6 + len(decoy)).to_bytes(2, "big")
    com = b"\xff\xfe\x00\x10abcd\xff\xe1" + app1 + b"\x00" * 6
    hostile = b"\xff\xd8\xff\xd0\x00\x0a" + com + decoy + b"\xff\xe0\x00\x08" + bytes(6) + other
    src = prepare_source(hostile, LIMITS, {"fal": FAL, "replicate": REPLICATE})
    assert (src.width, src.height) == (64, 64)
    for sent in src.prepared.inputs.values():
        assert pixels(sent.data).size == (64, 64) and same_pixels(sent.data, hostile)


def test_what_follows_the_image_and_thumbnails_are_not_sent() -> None:
    exif = Image.Exif()
    exif[0x8825] = {0x0002: (51.0, 30.0, 0.0)}  # a GPS latitude
    second = photo(64, 64, exif=exif.tobytes())
    jfxx = b"\xff\xe0\x00\x10JFXX\x00\x10" + b"THUMB" + bytes(3)
    data = photo(120, 80)
    hostile = data[:2] + jfxx + data[2:] + second + b"trailing-secret"
    sent = prepare_source(hostile, LIMITS, {"replicate": REPLICATE}).prepared.inputs["replicate"]
    assert sent.fmt == "jpeg" and sent.data.endswith(b"\xff\xd9")
    assert b"trailing-secret" not in sent.data and b"THUMB" not in sent.data
    assert len(sent.data) <= len(data) and same_pixels(sent.data, data)


def test_a_webp_with_metadata_chunks_is_re_encoded_and_icc_is_kept() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    webp = io.BytesIO()
    Image.open(io.BytesIO(photo(64, 48))).save(webp, format="WEBP", exif=exif.tobytes())
    src = prepare_source(webp.getvalue(), LIMITS, {"replicate": REPLICATE})
    assert b"SecretCam" not in src.prepared.inputs["replicate"].data
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    jpeg = photo(64, 48, icc_profile=srgb)
    sent = prepare_source(jpeg, LIMITS, {"replicate": REPLICATE}).prepared.inputs["replicate"]
    assert sent.fmt == "jpeg" and Image.open(io.BytesIO(sent.data)).info["icc_profile"] == srgb
    # A profile that is not one (here: text in an ICC segment) does not travel.
    fake = b"\x00" * 128 + b"acsp" + b"GPS 48.85N 2.29E" * 10
    sent = prepare_source(photo(64, 48, icc_profile=fake), LIMITS, {"replicate": REPLICATE})
    assert b"GPS 48.85N" not in sent.prepared.inputs["replicate"].data


def test_payloads_in_the_kept_segments_do_not_travel() -> None:
    secret = b"owner=alice@example.com GPS 48.8583N"
    base = photo(64, 48)
    length = int.from_bytes(base[4:6], "big")
    jfif = b"JFIF\x00\x01\x02\x00\x00\x01\x00\x01\x02\x02" + bytes(12) + secret
    adobe = b"Adobe\x00\x64\x00\x00\x00\x00\x01" + secret
    segment = [
        b"\xff" + bytes([m]) + (len(p) + 2).to_bytes(2, "big") + p
        for m, p in ((0xE0, jfif), (0xEE, adobe))
    ]
    data = b"\xff\xd8" + b"".join(segment) + base[4 + length :]
    sent = prepare_source(data, LIMITS, {"replicate": REPLICATE}).prepared.inputs["replicate"]
    assert secret not in sent.data and same_pixels(sent.data, data)


def test_thousands_of_scans_are_refused_before_decoding() -> None:
    progressive = photo(64, 48, progressive=True)
    sos = progressive.index(b"\xff\xda")
    assert 1 < progressive.count(b"\xff\xda") <= 20
    hostile = progressive[:-2] + progressive[sos:-2] * 20 + b"\xff\xd9"  # its scans, 21 times
    with pytest.raises(ImageRejected) as err:
        prepare_source(hostile, LIMITS, {"replicate": REPLICATE})
    assert "scans" in str(err.value)


def test_a_16_bit_grey_png_keeps_its_tones_when_re_encoded() -> None:
    grey = ImageChops.add(Image.effect_noise((64, 64), 30), Image.new("L", (64, 64), 60))
    deep = grey.convert("I").point(lambda v: v * 257).convert("I;16")
    buf = io.BytesIO()
    deep.save(buf, format="PNG")  # 16-bit greyscale
    # Too large to go as sent: the provider gets a PNG of its pixels, not a white square.
    src = prepare_source(
        buf.getvalue(), LIMITS, {"p": InputRule(("png",), len(buf.getvalue()) - 1)}
    )
    sent = pixels(src.prepared.inputs["p"].data)
    assert ImageChops.difference(sent, grey.convert("RGB")).getextrema()[0][1] <= 1


def test_a_lossless_webp_is_not_made_a_jpeg_for_size() -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo(300, 200))).save(buf, format="WEBP", lossless=True)
    small = InputRule(("png", "jpeg"), 100_000)  # under its PNG: only a JPEG would fit
    src = prepare_source(buf.getvalue(), LIMITS, {"fal": small})
    assert src.prepared.inputs == {} and "fal takes PNG/JPEG" in src.prepared.unfit["fal"]
    lossy = io.BytesIO()
    Image.open(io.BytesIO(photo(300, 200))).save(lossy, format="WEBP", quality=80)
    assert (
        prepare_source(lossy.getvalue(), LIMITS, {"fal": small}).prepared.inputs["fal"].fmt
        == "jpeg"
    )
