#!/usr/bin/env bash
# The main job on its embedded default: the whole recipe on the demo world (recipes/demo.yaml).
# Extra arguments go to `fusechat run` (e.g. --run-dir /tmp/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
exec .venv/bin/fusechat run recipes/demo.yaml "$@"
