"""What preparing a provider's input costs: the gateway's `prepare_source` for both
providers' rules against the former path (an opaque PNG as sent; anything else decoded,
then a PNG at zlib level 1), on a 4000x3000 photo JPEG and a 2048x2048 opaque PNG; seconds
and bytes sent are printed with their ratio to the former path in the same run.

    python -m bench.inputs [--repeat 3]
"""

from __future__ import annotations

import argparse
import io

from PIL import Image, ImageChops

from bench.imaging import interleaved
from gateway.config import load_config
from gateway.imaging import prepare_source
from gateway.provider_inputs import InputRule


def photo(width: int, height: int, fmt: str) -> bytes:
    noise = Image.effect_noise((width, height), 60)
    ramp = Image.linear_gradient("L").resize((width, height))
    img = Image.merge("RGB", (noise, ramp, ImageChops.add(noise, ramp, scale=2)))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 80} if fmt == "JPEG" else {"compress_level": 6}))
    return buf.getvalue()


def former(data: bytes) -> bytes:
    """Before issue 12: an opaque PNG went as sent (its chunks verified), every other input
    was decoded and sent as a lightly compressed PNG."""
    img = Image.open(io.BytesIO(data))
    if img.format == "PNG":
        img.verify()
        return data
    img.load()
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    config = load_config("config/gateway.yaml")
    rules: dict[str, InputRule] = {n: p.input.rule() for n, p in config.providers.items()}
    print("input preparation, both providers' rules (median of runs, same run as the former)")
    print(
        f"{'input':22} {'now s':>7} {'former s':>9} {'ratio':>6} {'sent MB':>8} {'former MB':>10}"
    )
    for name, data in (
        ("4000x3000 JPEG", photo(4000, 3000, "JPEG")),
        ("2048x2048 PNG", photo(2048, 2048, "PNG")),
    ):
        sent = max(
            len(e.data) for e in prepare_source(data, config.limits, rules).prepared.inputs.values()
        )
        before = len(former(data))
        now_s, former_s = interleaved(
            lambda d=data: prepare_source(d, config.limits, rules).width.to_bytes(4, "big"),  # type: ignore[misc]
            lambda d=data: former(d),  # type: ignore[misc]
            args.repeat,
        )
        print(
            f"{name + f' {len(data) / 1e6:.1f} MB':22} {now_s:7.3f} {former_s:9.3f} "
            f"{now_s / former_s:6.2f} {sent / 1e6:8.1f} {before / 1e6:10.1f}"
        )


if __name__ == "__main__":
    main()
