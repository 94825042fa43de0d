# syntax=docker/dockerfile:1
# upscale-gateway: build a virtualenv in one stage, run it as a non-root user in a slim one.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY adapters ./adapters
# Versions are bounded in pyproject.toml; the wheel installs only runtime dependencies.
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_CONFIG=/app/config/gateway.yaml \
    GATEWAY_RESULTS_DIR=/var/lib/upscale-gateway/results
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /app --shell /usr/sbin/nologin gateway \
 && mkdir -p /var/lib/upscale-gateway/results \
 && chown -R gateway:gateway /var/lib/upscale-gateway
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY config ./config
USER 10001:10001
EXPOSE 8080
VOLUME ["/var/lib/upscale-gateway"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '8080')}/healthz\", timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "gateway"]
