"""The process's allocator policy for image-sized buffers.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
which multi-megabyte image buffers come from per-thread heap arenas that fragment and are
seldom given back: over a 10-minute soak the gateway's RSS grew 18 %. Pinning the threshold
at 1 MiB kept every image buffer in its own mapping, returned to the system when freed:
RSS stayed flat (-7 %) and 30 % lower, for about 10 % of throughput (bench/overhead.py
--soak). At 256 KiB a 400 KB upload, its base64 and the parser's spool are mappings too,
so a burst of uploads does not stay in RSS while its requests wait on the provider with one
copy each: RSS per in-flight request went from 3.7 to 2.6 and from 3.0 to 2.0 times the
input at N = 100 and 300 (bench/scale.py). On other C libraries this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("gateway")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 256 << 10


def return_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Whether the policy is in force (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not applied:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: RSS may creep under load")
    return applied
