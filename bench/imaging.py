"""The gateway's image path (decode + resample + encode) against the same work in libvips,
at 1024 -> 4096 px, for each output format; figures are ratios to libvips in the same run.

    python -m bench.imaging [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

from PIL import Image

from gateway.config import OutputConfig
from gateway.imaging import finish

FORMATS = ("png", "jpeg", "webp", "avif", "gif")
SOURCE, TARGET = 1024, 4096


def sample_png(side: int = SOURCE, noise: float = 48, compress_level: int = 1) -> bytes:
    """A photo-like test image: smooth gradients plus noise, so codecs do real work."""
    base = Image.linear_gradient("L").resize((side, side))
    grain = Image.effect_noise((side, side), noise)
    img = Image.merge("RGB", (base, grain, base.rotate(90)))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def gateway_path(data: bytes, fmt: str, config: OutputConfig) -> bytes:
    return finish(data, (TARGET, TARGET), fmt, None, None, config).data


def vips_path(data: bytes, fmt: str, config: OutputConfig) -> bytes:
    import pyvips

    img = pyvips.Image.new_from_buffer(data, "", access="sequential")
    img = img.resize(TARGET / img.width, kernel="lanczos3")
    options = {
        "png": f".png[compression={config.png_compress_level},filter=all,strip]",
        "jpeg": f".jpg[Q={config.jpeg_quality},strip]",
        "webp": f".webp[Q={config.webp_quality},effort=4,strip]",
        "avif": f".avif[Q={config.avif_quality},effort=2,strip]",
        "gif": ".gif[effort=1,strip]",  # its fastest palette search; the default takes 30 s
    }[fmt]
    return bytes(img.write_to_buffer(options))


def interleaved(a: Callable[[], bytes], b: Callable[[], bytes], repeat: int) -> tuple[float, float]:
    """Medians of a and b run turn about, so that drift in the machine's load hits both."""
    runs: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, out in ((a, runs[0]), (b, runs[1])):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return statistics.median(runs[0]), statistics.median(runs[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data, config = sample_png(), OutputConfig()
    print(
        f"decode {SOURCE}x{SOURCE} PNG -> resample to {TARGET}x{TARGET} -> encode "
        f"(median of {args.repeat})"
    )
    print(f"{'format':6} {'gateway s':>10} {'libvips s':>10} {'ratio':>6}")
    for fmt in FORMATS:
        ours, vips = interleaved(
            lambda fmt=fmt: gateway_path(data, fmt, config),
            lambda fmt=fmt: vips_path(data, fmt, config),
            args.repeat,
        )
        print(f"{fmt:6} {ours:10.3f} {vips:10.3f} {ours / vips:6.2f}")


if __name__ == "__main__":
    main()
