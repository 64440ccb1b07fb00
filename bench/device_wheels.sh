#!/usr/bin/env bash
# Fetches, on this machine, the wheels that bench/device_train.sh and bench/device_generate.sh
# install on a lent CUDA machine (Python 3.12, x86-64, no network there): diffusers and
# pillow_heif, at the versions requirements.txt pins. They land in .whl/ (git-ignored); name it in
# the device call's carry list. Run from the repository root: bash bench/device_wheels.sh
set -euo pipefail
pin() { grep -i "^$1==" requirements.txt; }
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "$(pin diffusers)" "$(pin pillow-heif)"
ls -l .whl
