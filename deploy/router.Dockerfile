# syntax=docker/dockerfile:1
# The router image: `prefix-router serve`, non-root, read-only friendly, no build tools.
# Build from the repository root:
#   docker build -f deploy/router.Dockerfile -t prefix-router/router:0.1.0 .
#   docker build -f deploy/router.Dockerfile --build-arg EXTRAS=exact -t prefix-router/router:0.1.0-exact .
# (EXTRAS=exact adds the tokenizer stack for routing.hasher: vllm, about 150 MB more.)
#
# The base is pinned by tag. A release pipeline pins the digest too (read it with
# `docker buildx imagetools inspect python:3.11.14-slim-bookworm`) and writes both stages as
#   FROM python:3.11.14-slim-bookworm@sha256:<digest>

FROM python:3.11.14-slim-bookworm AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/prefix-router
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router ./router
COPY worker ./worker
# Every dependency has a binary wheel for this platform: no compiler in this stage either.
RUN /opt/prefix-router/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && /opt/prefix-router/bin/python -m compileall -q /opt/prefix-router/lib

FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/prefix-router /opt/prefix-router
# HOME on /tmp (a volume in the pod): the root filesystem is read-only, and libraries that keep
# a cache under HOME (the tokenizer stack in exact mode) must not fail; nothing is downloaded.
ENV PATH=/opt/prefix-router/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1
RUN groupadd --system --gid 10001 prefix \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin prefix
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# No HEALTHCHECK: Kubernetes probes /health and /ready (compose: the routers' own checks).
ENTRYPOINT ["prefix-router", "serve"]
CMD ["--config", "/etc/prefix-router/router.yaml"]
