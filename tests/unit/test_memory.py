from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from gateway.memory import THRESHOLD, return_large_buffers

# A child that frees a 16 MiB buffer, then allocates and frees another: with glibc's
# dynamic threshold the second comes from the heap and stays resident; with the policy it
# is a mapping of its own, given back on free. Prints resident KiB after the second free.
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
keep = [bytearray(4 << 20) for _ in range(4)]
del keep
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc policy")
def test_the_allocator_gives_image_buffers_back_on_glibc() -> None:
    assert return_large_buffers(THRESHOLD) is True

    def resident_after(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())

    assert resident_after("default") > 8192  # KiB: glibc alone keeps them resident
    assert resident_after("policy") < 2048  # the buffers went back to the system
