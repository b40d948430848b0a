# The gateway: a slim image with no torch (aiohttp, uvloop, pydantic, prometheus-client,
# dnspython). Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t infergate-gateway .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# `pip install .` with no extra: the gateway's dependencies only (torch is in the `replica` extra).
RUN pip install . && rm -rf /src

WORKDIR /
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["infergate", "gateway"]
# The config is mounted here (a Kubernetes ConfigMap or a compose bind mount); editing it
# hot-reloads the gateway.
CMD ["-c", "/etc/infergate/gateway.yaml", "--host", "0.0.0.0"]
