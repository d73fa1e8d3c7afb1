# syntax=docker/dockerfile:1
# The simulated vLLM worker (`prefix-worker sim`, docs/simulator.md) for clusters without GPUs:
# vLLM's OpenAI API, metrics and KV events over a simulated paged prefix cache.
# Build from the repository root:
#   docker build -f deploy/sim.Dockerfile -t prefix-router/sim:0.1.0 .
#
# The base is pinned by tag; pin the digest too in a release pipeline:
#   FROM python:3.11.14-slim-bookworm@sha256:<digest>

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/prefix-router
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY worker ./worker
RUN /opt/prefix-router/bin/pip install --no-cache-dir . \
    && /opt/prefix-router/bin/python -m compileall -q /opt/prefix-router/lib

FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/prefix-router /opt/prefix-router
ENV PATH=/opt/prefix-router/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 10001 prefix \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin prefix
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["prefix-worker", "sim"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--worker-id", "sim"]
