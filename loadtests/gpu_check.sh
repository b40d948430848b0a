#!/usr/bin/env bash
# The batching benchmark on a CUDA GPU: the torch engine with a larger tiny-gpt (8 layers x 512),
# static vs dynamic vs continuous at equal P99, the same tables as on the CPU. About 3 minutes.
#
#   loadtests/gpu_check.sh [OUT_DIR]        # default: $OUT/batching-cuda, else /tmp/batching-cuda
#
# Needs a python3 with CUDA torch (PYTHON=... to pick another) and the replica's other imports.
# Where pydantic is missing (the device machines' image has the rest), carry its wheels in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types \
#       typing-inspection
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=${1:-${OUT:-/tmp}/batching-cuda}
if ! "$PYTHON" -c 'import pydantic' 2>/dev/null && compgen -G '.whl/*.whl' >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
exec timeout 280 "$PYTHON" -m loadtests.batching_bench --engines torch --device cuda \
    --gen-layers 8 --gen-width 512 --context 1024 --clients 4,16,32,64 --batch-size 16 \
    --max-batch-tokens 512 --duration-s 5 --seeds 1 --out "$out"
