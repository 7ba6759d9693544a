# syntax=docker/dockerfile:1
# One image for every ModelGrid service; the command picks the service:
#   docker run modelgrid python -m services.registry | services.scheduler | services.worker | services.gateway
#
# CPU (default):  docker build -t modelgrid .
# CUDA workers:   docker build -t modelgrid-cuda \
#                   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# No model weights are baked in: the registry stores uploaded artifacts in its data dir and
# workers fetch the tensors of their stages at run time.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch comes from: the CPU wheel index by default (PyPI's Linux wheel pulls several GB of
# CUDA libraries); a CUDA index (cu126, cu128, ...) matching the base image's CUDA for GPU builds.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Must equal the pin in pyproject.toml (a unit test checks it).
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python:*-slim has Python and venv; CUDA bases (Ubuntu) get them from apt.
ARG DEBIAN_FRONTEND=noninteractive
RUN python3 -m venv /opt/venv 2>/dev/null \
    || (apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/* \
        && python3 -m venv --clear /opt/venv) \
    && python -m pip install --upgrade pip

# torch first, in its own layer: it is by far the largest and changes least often.
# PyPI stays an extra index for torch's plain dependencies; torch itself comes from TORCH_INDEX_URL
# because its local version (2.13.0+cpu, 2.13.0+cu128) sorts above PyPI's 2.13.0.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelgrid ./modelgrid
COPY services ./services
# torch==${TORCH_VERSION} is already satisfied (a local version such as +cpu or +cu128 matches the
# pin), so this installs only the rest of the dependencies and the package itself.
RUN pip install . && rm -rf /src

# Non-root user; its data and cache dirs are created here so named volumes mounted on them
# start out owned by it.
RUN groupadd --gid 10001 modelgrid \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/modelgrid --shell /usr/sbin/nologin modelgrid \
    && mkdir -p /var/lib/modelgrid/data /var/cache/modelgrid \
    && chown -R modelgrid:modelgrid /var/lib/modelgrid /var/cache/modelgrid

USER 10001:10001
WORKDIR /var/lib/modelgrid

# gateway gRPC, future gateway HTTP (OpenAI API), registry, scheduler, worker; metrics 9091-9094.
EXPOSE 50051 8000 50052 50053 50061 9091 9092 9093 9094

CMD ["python", "-m", "services.gateway"]
