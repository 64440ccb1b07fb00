#!/usr/bin/env bash
# SD1.5-shaped training benchmark on a lent CUDA machine that has torch, transformers and peft but
# no diffusers and no network. Fill .whl/ here first (bash bench/device_wheels.sh: diffusers, whose
# other requirements are already there on Python 3.12), carry it, and run from the repository root:
#     bash bench/device_train.sh [extra bench/train.py arguments, e.g. --trial lean_lora]
# The log lands in $OUT (or /tmp); the table and the summary line are printed last.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 300 python3 bench/train.py --shapes sd15 --device cuda "$@" 2>&1 \
  | grep -v -e "should be kept in float32" -e "torchvision" -e "DeprecationWarning" -e "sigmas = np" \
  | tee "${OUT:-/tmp}/bench_sd15.log"
