#!/usr/bin/env bash
# SD1.5-shaped portrait benchmark on a lent CUDA machine that has torch, transformers, peft and
# opencv but no diffusers and no network. Fill .whl/ here first (bash bench/device_wheels.sh:
# diffusers, and pillow_heif, which pipeline.preprocess imports), carry it, and run from the
# repository root:
#     bash bench/device_generate.sh [extra bench/generate.py arguments]
# About 2-3 minutes, and each --trial adds a variant (compiled_models adds its compile, a minute or
# more): random SD1.5 weights + 4 ControlNets are built on the GPU, then the plain diffusers
# two-pass, ours eager and ours with CUDA graphs run at batch 1 and batch 4, then the trials.
# The log lands in $OUT (or /tmp); the table and the summary line are printed last.
set -euo pipefail
ls .whl/pillow_heif-*.whl >/dev/null 2>&1 || echo "warning: no pillow_heif wheel in .whl/: importing pipeline.preprocess will fail" >&2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft, cv2; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'opencv', cv2.__version__)"
# Issue 27: a CUDA-graph capture replays (the CPU suite cannot capture); the benchmark runs either way.
timeout 120 python3 bench/cuda_graph_check.py 2>&1 | tee "${OUT:-/tmp}/cuda_graph_check.log" \
  || echo "cuda_graph_check FAILED (above); the benchmark goes on" >&2
timeout 300 python3 bench/generate.py --engine diffusion --shapes sd15 --device cuda "$@" 2>&1 \
  | grep -v -e "should be kept in float32" -e "torchvision" -e "DeprecationWarning" -e "sigmas = np" \
            -e "ControlNets and you have passed" -e "truncated because CLIP" \
  | tee "${OUT:-/tmp}/bench_generate_sd15.log"
