# The service with its embedded model (models/pydoc-gpt-mini), CPU by default:
#
#   docker build -t llm-serve .
#   docker run --rm --init --shm-size=2g --memory=6g -p 127.0.0.1:8000:8000 llm-serve
#
# CUDA: a CUDA base image and PyTorch's CUDA wheels (the base needs no Python; one is installed):
#
#   docker build -t llm-serve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --rm --init --gpus all --shm-size=8g -e NUM_GPUS_PER_REPLICA=1 -p 127.0.0.1:8000:8000 llm-serve:cuda
#
# Settings are the service's environment variables (docker run -e NAME=value); see the README.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# wget: KubeRay's default pod probes run it. Python only where the base has none (CUDA images).
# Debian/Ubuntu pin their own versions per release; pinning here would break every point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# Dependencies in their own layer, before the code: editing the code does not reinstall them.
# torch first, from PyTorch's index (CPU or CUDA build), at the version requirements-serve.txt pins.
COPY requirements-serve.txt /tmp/requirements-serve.txt
RUN pip install --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch==' /tmp/requirements-serve.txt)" \
    && pip install -r /tmp/requirements-serve.txt \
    && rm /tmp/requirements-serve.txt

# A non-root user with a home: Ray keeps its auth token in ~/.ray, Hugging Face its cache in ~/.cache.
RUN useradd --create-home --uid "$APP_UID" --shell /usr/sbin/nologin app

WORKDIR /app
COPY settings.py ray_serve_app.py ./
COPY config/ config/
COPY engine/ engine/
COPY serving/ serving/
COPY observability/ observability/
COPY models/pydoc-gpt-mini/ models/pydoc-gpt-mini/
# Bytecode now, not at every replica start (PYTHONDONTWRITEBYTECODE stops writing it at run time).
RUN python -m compileall -q settings.py ray_serve_app.py config engine serving observability

# PYTHONPATH: every Ray process (also on KubeRay worker pods, whatever their working directory)
# imports ray_serve_app from here. RAY_SERVE_DEFAULT_HTTP_HOST: inside the container Serve must
# listen on all interfaces or the published port reaches nothing; outside it stays 127.0.0.1.
# RAY_SERVE_PROXY_USE_GRPC: the proxy takes streamed tokens from the Gateway over gRPC (serving/transport.py).
ENV PYTHONPATH=/app \
    RAY_SERVE_DEFAULT_HTTP_HOST=0.0.0.0 \
    RAY_SERVE_PROXY_USE_GRPC=1 \
    RAY_USAGE_STATS_ENABLED=0

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${APP_UID}
EXPOSE 8000

# /healthz is answered by the Gateway alone: probing never starts a model replica.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

# `serve run` shuts Serve down cleanly on SIGINT (Ctrl-C); docker stop sends this.
STOPSIGNAL SIGINT
CMD ["serve", "run", "ray_serve_app:deployment_graph"]
