# syntax=docker/dockerfile:1
# sparsedeploy images. Two targets:
#   docker build --target cpu -t sparsedeploy:cpu .   (CPU-only torch from PyTorch's CPU wheel index; override TORCH_INDEX_URL)
#   docker build --target gpu -t sparsedeploy:gpu .   (PyPI's torch==2.13.0 Linux wheel is the CUDA build; run with --gpus all)
# Models, caches, evaluation data and outputs live on the /data volume; put WikiText-2's test file at
# data/wikitext-2-raw/wiki.test.raw (or set eval.data in the recipe), then:
#   docker run --rm -v "$PWD/data:/data" sparsedeploy:cpu run examples/quickstart.yaml --output /data/runs/quickstart
# The install steps are scripts/install.sh, the same script CI runs. Everything runs as a non-root user.

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPARSEDEPLOY_VENV=/opt/venv \
    SPARSEDEPLOY_EXTRAS=export,bench \
    SPARSEDEPLOY_CACHE=/data/cache \
    SPARSEDEPLOY_WIKITEXT2=/data/wikitext-2-raw/wiki.test.raw \
    SPARSEDEPLOY_DEEPSPARSE_VENV=/opt/engines/deepsparse \
    HF_HOME=/data/hf \
    MPLCONFIGDIR=/tmp/matplotlib \
    PATH=/opt/venv/bin:$PATH
# A C compiler: pip builds the sparse-cpu kernels (sparsedeploy/kernels/csrc) from source.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 sparse \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin sparse \
    && mkdir -p /data /opt/venv /opt/engines /opt/sparsedeploy \
    && chown 10001:10001 /data /opt/venv /opt/engines /opt/sparsedeploy
WORKDIR /opt/sparsedeploy
COPY --chown=10001:10001 pyproject.toml setup.py README.md ./
COPY --chown=10001:10001 scripts ./scripts
COPY --chown=10001:10001 sparsedeploy ./sparsedeploy
COPY --chown=10001:10001 examples ./examples
USER 10001:10001
VOLUME ["/data"]
ENTRYPOINT ["sparsedeploy"]
CMD ["--help"]

FROM base AS cpu
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
# The CPU image also carries DeepSparse 1.8 in its own venv (evaluation-only licence; see docs/bench.md).
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" SPARSEDEPLOY_DEEPSPARSE=1 bash scripts/install.sh && sparsedeploy --help > /dev/null

FROM base AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN bash scripts/install.sh && sparsedeploy --help > /dev/null
