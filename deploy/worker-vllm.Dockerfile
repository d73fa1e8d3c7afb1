# syntax=docker/dockerfile:1
# A vLLM GPU worker: vLLM's official OpenAI server image plus `prefix-worker`, which runs vLLM
# set up for the router (`prefix-worker vllm`, docs/vllm.md) and the KV-event sidecar
# (`prefix-worker kv-events`, docs/kv-events.md) from the same image.
# Build from the repository root:
#   docker build -f deploy/worker-vllm.Dockerfile -t prefix-router/worker-vllm:0.1.0 .
#
# vLLM's version is pinned by tag and must stay in the 0.32 series (the exact hasher is checked
# against it; pyproject's `vllm` extra). Pin the digest too in a release pipeline:
#   FROM vllm/vllm-openai:v0.32.0@sha256:<digest>

FROM vllm/vllm-openai:v0.32.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/prefix-router-src
COPY pyproject.toml README.md ./
COPY router ./router
COPY worker ./worker
# Install next to vLLM without changing any package vLLM already has: everything installed is a
# constraint, so only missing dependencies are added (and a conflict fails the build).
RUN uv pip freeze --system | grep -E '^[A-Za-z0-9_.-]+==' > /tmp/vllm-constraints.txt \
    && uv pip install --system --no-cache --constraint /tmp/vllm-constraints.txt . \
    && rm -rf /tmp/vllm-constraints.txt /opt/prefix-router-src \
    && groupadd --system --gid 10001 prefix \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/vllm \
        --shell /usr/sbin/nologin prefix
WORKDIR /home/vllm
ENV HOME=/home/vllm \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
EXPOSE 8000 5557 5558 9102
# No HEALTHCHECK: Kubernetes probes vLLM's /health and the sidecar's /health.
ENTRYPOINT ["prefix-worker"]
CMD ["vllm", "--help"]
