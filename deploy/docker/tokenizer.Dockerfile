# syntax=docker/dockerfile:1
# The tokenizer service and the Python clients, on CPU, without torch.
#   docker build -f deploy/docker/tokenizer.Dockerfile -t llmserve/tokenizer:0.1.0 .
# Run a client from it: docker run --rm --entrypoint python llmserve/tokenizer:0.1.0 -m clients.<module> ...
ARG PYTHON_BASE=python:3.12-slim-bookworm

FROM ${PYTHON_BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The project's dependencies from pyproject.toml minus the engine's (torch) and the code generator;
# jinja2 renders chat templates and otherwise arrives only with torch.
COPY pyproject.toml ./
RUN python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; skip = {'torch', 'grpcio-tools'}; print('\n'.join([d for d in deps if re.match(r'[A-Za-z0-9_.-]+', d).group(0).lower() not in skip] + ['jinja2>=3.1']))" \
        > requirements.txt \
    && pip install -r requirements.txt
COPY tokenizer_service /app/tokenizer_service
COPY clients /app/clients
COPY protos /app/protos
RUN python -m compileall -q /app

FROM ${PYTHON_BASE}
RUN groupadd --system --gid 10001 llm \
    && useradd --system --uid 10001 --gid llm --home-dir /tmp --no-create-home --shell /usr/sbin/nologin llm
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1
WORKDIR /app
USER 10001:10001
EXPOSE 50052
# Every flag also reads a TOKENIZER_* variable (the Kubernetes ConfigMap sets those). The package's __main__
# holds SIGTERM before the imports: as PID 1 a signal without a handler is dropped (clients/stop_signals.py).
ENTRYPOINT ["python", "-m", "tokenizer_service"]
