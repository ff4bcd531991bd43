# syntax=docker/dockerfile:1
# sparsedeploy images. Two targets:
#   docker build --target cpu -t sparsedeploy:cpu .   (add --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index> for a small CPU-only torch)
#   docker build --target gpu -t sparsedeploy:gpu .   (PyPI's torch==2.13.0 Linux wheel is the CUDA build; run with --gpus all)
# Models, caches and outputs live on the /data volume:
#   docker run --rm -v "$PWD/data:/data" sparsedeploy:cpu run examples/quickstart.yaml --output /data/runs/quickstart
# The install steps are scripts/install.sh, the same script CI runs.

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPARSEDEPLOY_CACHE=/data/cache \
    HF_HOME=/data/hf \
    MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --gid 10001 sparse && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin sparse \
    && mkdir -p /data && chown 10001:10001 /data
WORKDIR /opt/sparsedeploy
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY sparsedeploy ./sparsedeploy
COPY examples ./examples

FROM base AS cpu
ARG TORCH_INDEX_URL=""
ENV SPARSEDEPLOY_VENV=/opt/venv \
    SPARSEDEPLOY_EXTRAS=export,bench
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" bash scripts/install.sh \
    && /opt/venv/bin/sparsedeploy --help > /dev/null
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
VOLUME ["/data"]
ENTRYPOINT ["sparsedeploy"]
CMD ["--help"]

FROM base AS gpu
ENV SPARSEDEPLOY_VENV=/opt/venv \
    SPARSEDEPLOY_EXTRAS=export,bench \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN bash scripts/install.sh \
    && /opt/venv/bin/sparsedeploy --help > /dev/null
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
VOLUME ["/data"]
ENTRYPOINT ["sparsedeploy"]
CMD ["--help"]
