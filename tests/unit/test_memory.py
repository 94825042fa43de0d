from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from gateway.memory import THRESHOLD, return_large_buffers

# A child that frees a 16 MiB buffer, then allocates and frees 16 MiB more in blocks of
# argv[2] bytes, with small blocks kept between them: with glibc's dynamic threshold they
# come from the heap and stay resident; with the policy each is a mapping of its own,
# given back on free. Prints resident KiB after the second free.
_CHILD = """
import sys
from gateway.memory import return_large_buffers
if sys.argv[1] == "policy":
    return_large_buffers()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
block = bytearray(16 << 20); del block
before = rss()
size = int(sys.argv[2])
keep, pins = [], []
for _ in range((16 << 20) // size):
    keep.append(bytearray(size))
    pins.append(bytes(1024))  # what else a request keeps: the heap's top cannot shrink
del keep
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc policy")
@pytest.mark.parametrize("block", [4 << 20, 400 << 10], ids=["4 MiB output", "400 KB upload"])
def test_the_allocator_gives_image_buffers_back_on_glibc(block: int) -> None:
    assert return_large_buffers(THRESHOLD) is True

    def resident_after(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, mode, str(block)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())

    assert resident_after("default") > 8192  # KiB: glibc alone keeps them resident
    assert resident_after("policy") < 2048  # the buffers went back to the system
