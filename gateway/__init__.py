"""upscale-gateway: an OpenAI-compatible gateway for Recraft Crisp Upscale."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("upscale-gateway")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0"
