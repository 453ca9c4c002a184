# fusechat for GPU machines: CUDA 13 (what requirements/gpu.lock's torch 2.13.0 is built for),
# CPython 3.11 (what the lock was resolved for), the pinned stack, `fusechat` as entry point.
#   docker build -t fusechat .
#   docker run --gpus all --ipc=host -v $PWD/runs:/app/runs -v ~/.cache/huggingface:/root/.cache/huggingface \
#       fusechat run recipes/llama-3.1-8b.yaml
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git make ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, so code changes do not reinstall the stack. The whole lock, vllm, DeepSpeed
# (zero3) and bitsandbytes (QLoRA) included; deepspeed, an sdist, builds into a pure-Python wheel in
# pip's isolated build environment (DS_BUILD_OPS=0: its CUDA ops compile on first use with this
# image's nvcc). The import check proves the set loads together.
COPY requirements/gpu.lock requirements/gpu.lock
RUN python3.11 -m venv /app/.venv \
 && /app/.venv/bin/pip install --upgrade "pip>=24" \
 && DS_BUILD_OPS=0 /app/.venv/bin/pip install --no-deps -r requirements/gpu.lock \
 && /app/.venv/bin/python -c "import torch, vllm, trl, deepspeed, bitsandbytes"
COPY . .
RUN /app/.venv/bin/pip install --no-deps --no-build-isolation -e . \
 && /app/.venv/bin/fusechat --help >/dev/null
ENV PATH=/app/.venv/bin:$PATH
ENTRYPOINT ["fusechat"]
CMD ["--help"]
