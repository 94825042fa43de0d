"""Emulators of the fal.ai queue API and the Replicate predictions API, with fault scripts:
used by the tests, `python -m gateway --sandbox` and the benchmarks."""

from adapters.emulators.config import EmulatorConfig
from adapters.emulators.fal import create_fal_app
from adapters.emulators.faults import FaultScript
from adapters.emulators.replicate import create_replicate_app
from adapters.emulators.server import BackgroundServer, serve_in_loop

__all__ = [
    "BackgroundServer",
    "EmulatorConfig",
    "FaultScript",
    "create_fal_app",
    "create_replicate_app",
    "serve_in_loop",
]
