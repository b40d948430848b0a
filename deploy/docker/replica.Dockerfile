# A replica: torch with CUDA from the PyTorch base image, the replica server on top. One replica
# per GPU (Kubernetes: nvidia.com/gpu: 1). Build from the repository root:
#   docker build -f deploy/docker/replica.Dockerfile -t infergate-replica .
# The simulated engine (--engine simulated) runs in the same image without a GPU.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOME=/tmp
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY replica ./replica
# The base's torch satisfies the `replica` extra (torch>=2.2), so pip keeps it: no second torch.
RUN pip install '.[replica]' && python -c "import torch, replica" && rm -rf /src

WORKDIR /
USER 65534:65534
EXPOSE 9001
ENTRYPOINT ["python", "-m", "replica"]
CMD ["--host", "0.0.0.0", "--port", "9001"]
