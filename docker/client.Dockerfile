# syntax=docker/dockerfile:1.7
# SplitLoRA client: a slim, CPU-only image for edge devices (linux/amd64 and linux/arm64: Raspberry Pi 4/5,
# Jetson (CPU), NUC-class boxes). Build for both from the repository root:
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/client.Dockerfile -t splitlora/client:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/splitlora
ENV PATH=/opt/splitlora/bin:$PATH
# the CPU build of torch first (the same index serves amd64 and arm64 wheels), then the project, pinned
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README.md /src/
COPY common /src/common
COPY splitlora_client /src/splitlora_client
COPY splitlora_server /src/splitlora_server
# torch's C++ headers, CMake files, C++ test binaries and bundled protoc are not needed to run: 0.14 GB less
RUN pip install --constraint /tmp/constraints.txt "/src[tensorboard]" \
 && find /opt/splitlora -name "__pycache__" -prune -exec rm -rf {} + \
 && cd /opt/splitlora/lib/python*/site-packages/torch \
 && rm -rf include share test bin/test_* bin/*Test bin/protoc*

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="splitlora-client" \
      org.opencontainers.image.description="SplitLoRA client: embeddings and first blocks on private data" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/splitlora /opt/splitlora
ENV PATH=/opt/splitlora/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 \
    SPLITLORA_HOME=/model HF_HUB_OFFLINE=1
# a non-root user; the mount points belong to it so that named volumes start out writable by it
RUN groupadd --gid 10001 splitlora \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin splitlora \
 && mkdir -p /out /model /certs /data && chown splitlora:splitlora /out /model /certs /data
USER splitlora
WORKDIR /home/splitlora
# healthy while the client writes metrics: at least one record every 15 minutes once training started
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
  CMD ["python", "-m", "splitlora_client.healthcheck", "--metrics", "/out/metrics.jsonl", "--max-age", "900"]
CMD ["splitlora-client", "train", "--help"]
