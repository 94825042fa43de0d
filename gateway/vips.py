"""libvips for the paths where it beats Pillow (bench/imaging.py): PNG, where its streaming
decode-resample-encode pipeline is about 2x faster for a smaller file (every PNG filter is
tried per row), and JPEG, where it is level. Pillow stays for WebP, AVIF and GIF, where it is
faster. Optional: without pyvips (or libvips) the Pillow path does everything."""

from __future__ import annotations

from typing import Any

from PIL import Image

try:
    import pyvips as _pyvips

    vips: Any = _pyvips
except (ImportError, OSError):  # no wheel, or no libvips shared library
    vips = None

_BANDS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_SUFFIX = {"png": ".png", "jpeg": ".jpg"}


def available() -> bool:
    return vips is not None


class VipsFailed(Exception):
    """libvips could not read the provider's output."""


def finish(
    output: bytes,
    target: tuple[int, int] | None,
    alpha: Image.Image | None,
    output_format: str,
    options: str,
) -> tuple[bytes, int, int] | None:
    """Decode, resample to exactly `target` and encode (PNG or JPEG, with saver `options`)
    in one streaming libvips pipeline. None: use the Pillow path."""
    if vips is None or output_format not in _SUFFIX:
        return None
    try:
        image = vips.Image.new_from_buffer(output, "", access="sequential", fail=True)
        if image.bands > 3 or image.bands == 2:  # providers' output is opaque: drop alpha
            image = image.extract_band(0, n=image.bands - 1)
        if image.bands == 1:
            image = image.colourspace("srgb")
        if image.format != "uchar":
            image = image.cast("uchar")
        if target is not None and target != (image.width, image.height):
            image = image.resize(
                target[0] / image.width, vscale=target[1] / image.height, kernel="lanczos3"
            )
            if (image.width, image.height) != target:
                return None  # rounding disagreed: let Pillow produce the exact size
        if alpha is not None:
            plane = vips.Image.new_from_memory(
                alpha.tobytes(), alpha.width, alpha.height, 1, "uchar"
            )
            plane = plane.resize(
                image.width / plane.width, vscale=image.height / plane.height, kernel="lanczos3"
            )
            if (plane.width, plane.height) != (image.width, image.height):
                return None
            image = image.bandjoin(plane)
            if output_format == "jpeg":  # JPEG has no alpha: flatten onto white
                image = image.flatten(background=[255, 255, 255])
        data = image.write_to_buffer(f"{_SUFFIX[output_format]}[{options},strip]")
    except vips.Error as exc:
        raise VipsFailed(str(exc)) from exc
    return bytes(data), image.width, image.height
