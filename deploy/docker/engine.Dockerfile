# syntax=docker/dockerfile:1
# The engine service on CUDA. The model is NOT in the image: it comes from a volume (ENGINE_MODEL).
#   docker build -f deploy/docker/engine.Dockerfile -t llmserve/engine:0.1.0 .
#   CPU-only torch (the laptop overlay):
#   docker build -f deploy/docker/engine.Dockerfile \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t llmserve/engine:0.1.0-cpu .
# torch's CUDA wheels carry their own CUDA libraries; the node's driver comes in through the NVIDIA
# container toolkit, so the CUDA base image only needs to be a driver-compatible userland.
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CUDA_BASE} AS build
# PyPI's Linux torch wheels are CUDA builds; the CPU build comes from PyTorch's own index.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Not pinned per package: the Ubuntu archive drops superseded versions, so pins break rebuilds; the
# base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (their layer survives code changes), read from pyproject.toml so the versions are
# pinned in one place.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; torch = [d for d in deps if d.startswith('torch')]; open('torch.txt', 'w').write('\n'.join(torch)); open('requirements.txt', 'w').write('\n'.join(d for d in deps if d not in torch))" \
    && pip install --index-url "${TORCH_INDEX_URL}" -r torch.txt \
    && pip install -r requirements.txt
COPY engine_service /app/engine_service
# clients/tls.py is the TLS both services share (the client library imports only grpc and protos).
COPY clients /app/clients
COPY protos /app/protos
# Byte-compile now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app

FROM ${CUDA_BASE}
ENV DEBIAN_FRONTEND=noninteractive
# Triton compiles a small launcher with the system C compiler and Python's headers on first use.
# Not pinned per package: the Ubuntu archive drops superseded versions, so pins break rebuilds; the
# base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llm \
    && useradd --system --uid 10001 --gid llm --home-dir /tmp --no-create-home --shell /usr/sbin/nologin llm
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TRITON_CACHE_DIR=/var/cache/triton \
    HF_HUB_OFFLINE=1
WORKDIR /app
USER 10001:10001
EXPOSE 50051
# Every flag also reads an ENGINE_* variable (the Kubernetes ConfigMap sets those). The package's __main__ holds
# SIGTERM before the imports: as PID 1 a signal without a handler is dropped (clients/stop_signals.py).
ENTRYPOINT ["python", "-m", "engine_service"]
