# syntax=docker/dockerfile:1
# upscale-gateway: build a virtualenv in one stage, run it as a non-root user in a slim one.
# Both stages must use the same base image: the venv's python is a link to the base's
# /usr/local/bin/python3.11, which the runtime stage has to provide at the same path.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY adapters ./adapters
# Runtime dependencies only (no [dev] extra). There is no lock file: versions are bounded in
# pyproject.toml, and every dependency installs from a wheel or a pure-Python sdist (pyvips
# runs in cffi ABI mode against the libvips that pyvips-binary ships), so no compiler is needed.
# pip compiles the bytecode here, since the runtime's root file system may be read-only.
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="upscale-gateway" \
      org.opencontainers.image.description="OpenAI-compatible gateway for Recraft Crisp Upscale over fal.ai and Replicate" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_CONFIG=/app/config/gateway.yaml \
    GATEWAY_RESULTS_DIR=/var/lib/upscale-gateway/results
# A fixed UID/GID, so that volumes and orchestrators (runAsUser) can rely on it.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --no-log-init --uid 10001 --gid gateway --home-dir /app \
      --shell /usr/sbin/nologin gateway \
 && install -d -o gateway -g gateway -m 0750 /var/lib/upscale-gateway \
      /var/lib/upscale-gateway/results
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Code and config stay root-owned: the gateway writes only to its results volume and /tmp.
COPY config ./config
USER 10001:10001
EXPOSE 8080
# Result images live here; a named volume mounted at this path starts with the ownership above.
VOLUME ["/var/lib/upscale-gateway"]
# slim has no curl: probe with the venv's python instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '8080')}/healthz\", timeout=2)"]
# uvicorn drains in-flight requests on SIGTERM (DRAIN_S = 30 s in gateway.__main__):
# give the container a stop timeout above that (compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "gateway"]
