# syntax=docker/dockerfile:1.7
# SplitLoRA server (split server, aggregator, export, status) on a CUDA runtime base. It uses the GPU when one
# is visible (`--device auto`, run with the NVIDIA container toolkit: see docker-compose.gpu.yml) and the CPU
# otherwise. Build from the repository root:
#   docker build -f docker/server.Dockerfile -t splitlora/server:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# the PyTorch wheel index of the CUDA version of the base image
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
RUN python3 -m venv /opt/splitlora
ENV PATH=/opt/splitlora/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"
COPY docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README.md /src/
COPY common /src/common
COPY splitlora_client /src/splitlora_client
COPY splitlora_server /src/splitlora_server
# torch's C++ headers, CMake files, C++ test binaries and bundled protoc are not needed to run
RUN pip install --constraint /tmp/constraints.txt /src \
 && find /opt/splitlora -name "__pycache__" -prune -exec rm -rf {} + \
 && cd /opt/splitlora/lib/python*/site-packages/torch \
 && rm -rf include share test bin/test_* bin/*Test bin/protoc*

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="splitlora-server" \
      org.opencontainers.image.description="SplitLoRA split server and aggregator (CUDA when present, else CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY --from=build /opt/splitlora /opt/splitlora
ENV PATH=/opt/splitlora/bin:$PATH PYTHONUNBUFFERED=1 SPLITLORA_HOME=/model HF_HUB_OFFLINE=1 \
    SPLITLORA_HEALTH_ARGS="--tls-ca /certs/ca.pem --tls-cert /certs/admin.pem --tls-key /certs/admin.key"
RUN groupadd --gid 10001 splitlora \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin splitlora \
 && mkdir -p /out /model /certs && chown splitlora:splitlora /out /model /certs
USER splitlora
WORKDIR /home/splitlora
EXPOSE 50051 50052 9100
# SERVING on the standard grpc.health.v1 service; SPLITLORA_HEALTH_ARGS says how to connect (TLS files, or
# --insecure), SPLITLORA_HEALTH_PORT which port (50051: serve, 50052: aggregate)
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD python -m splitlora_server.healthcheck --server "localhost:${SPLITLORA_HEALTH_PORT:-50051}" $SPLITLORA_HEALTH_ARGS
CMD ["splitlora-server", "serve", "--help"]
