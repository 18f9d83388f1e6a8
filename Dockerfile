# syntax=docker/dockerfile:1
#
# tta-serve container image. See docs/deploy.md.
#
#   GPU (default): docker build -t tta-serve:0.1.0-gpu .
#   CPU:           docker build --build-arg VARIANT=cpu -t tta-serve:0.1.0-cpu .
#
# Build arguments:
#   VARIANT          gpu | cpu
#   GPU_BASE_IMAGE   base of the gpu variant. PyPI's torch 2.13.0 Linux wheel is the CUDA 13.0 build
#                    (it brings its own CUDA libraries; the host needs an NVIDIA driver >= 580 and the
#                    NVIDIA Container Toolkit). The base image matches that CUDA version.
#   CPU_BASE_IMAGE   base of the cpu variant.
#   TORCH_INDEX      where torch comes from. Default: PyPI (CUDA build) for gpu, the PyTorch CPU index
#                    for cpu. Override for another CUDA build, e.g. https://download.pytorch.org/whl/cu126
#                    (then also pick a matching GPU_BASE_IMAGE).
#
# Configuration is by environment (TTA_* variables, service/settings.py) and a mounted config directory
# (/config/models.yaml) plus a model directory (/models) for weights, Fisher files and TorchScript.

ARG VARIANT=gpu
ARG GPU_BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG CPU_BASE_IMAGE=python:3.12-slim

# ------------------------------------------------------------------ the Python base of each variant
FROM ${GPU_BASE_IMAGE} AS python-gpu
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM ${CPU_BASE_IMAGE} AS python-cpu

# The variant's stage, not an image from a registry: hadolint's DL3006 (tag your images) does not apply.
# hadolint ignore=DL3006
FROM python-${VARIANT} AS base

# ------------------------------------------------------------------ builder: a virtual environment with the project
FROM base AS builder
ARG VARIANT
ARG TORCH_INDEX=
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's Python needs python3-venv to create environments; the python:*-slim images have it.
RUN if ! python3 -c "import ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the variant's index, in its own layer (most of the image, and it rarely changes).
# The pin is the one in pyproject.toml (tests/test_deploy.py checks they agree).
RUN case "${VARIANT}" in \
      gpu) index="${TORCH_INDEX:-https://pypi.org/simple}" ;; \
      cpu) index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;; \
      *) echo "VARIANT must be gpu or cpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && pip install --index-url "$index" "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY service ./service
COPY benchmarks ./benchmarks
# The project exactly as the README installs it (torch==2.13.0 is already satisfied by the build above),
# then fail the build, not the first start, if the server cannot import.
RUN pip install . \
 && python -c "import service.http.app, service.cli"

# ------------------------------------------------------------------ runtime: the environment and nothing else
FROM base AS runtime
LABEL org.opencontainers.image.title="tta-serve" \
      org.opencontainers.image.description="Vision models that adapt online, without labels, when their input drifts" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric uid/gid, so Kubernetes can verify runAsNonRoot (deploy/k8s uses the same numbers).
RUN groupadd --gid 10001 tta \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/tta --shell /usr/sbin/nologin tta \
 && mkdir -p /config /models /cache \
 && chown 10001:10001 /cache
COPY --from=builder /opt/venv /opt/venv
# The default configuration: the built-in digits model, no files needed. Mount your own directory at
# /config (with models.yaml) and your model files at /models to replace it.
COPY deploy/image/models.yaml /config/models.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TTA_HOST=0.0.0.0 \
    TTA_PORT=8000 \
    TTA_DEVICE=auto \
    TTA_CONFIG=/config/models.yaml \
    TTA_CACHE_DIR=/cache
USER 10001:10001
WORKDIR /home/tta
# Train the built-in digits model into the cache now (seconds), so a container is ready at once and
# also starts with a read-only root file system.
RUN python -c "from adapters.models.digits import load_digits_model; load_digits_model()"
VOLUME ["/config", "/models"]
EXPOSE 8000
# Liveness only: readiness (/v2/health/ready) is for load balancers. Python, since slim images have no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('TTA_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tta-serve", "serve"]
