#!/bin/bash
# The venv for compiling Mosaic GPU kernels for the H200 on a machine without a GPU
# (`benchmarks/offline/offline.py`): the project's pins plus jax's CUDA 13 plugin, without its
# NVIDIA wheels (XLA's compile-only CUDA topology needs the plugin; Mosaic GPU runs the
# machine's own ptxas, /usr/local/cuda/bin/ptxas, CUDA 13.0 on the development machine).
# Kept apart from .venv: with the plugin installed, jax starts a CUDA backend unless told not to.
# Usage, from the repo root: bash benchmarks/offline/setup.sh   (about 1.1 GB in .sm90venv)
set -e
PYENV_VERSION=3.12.1 python3.12 -m venv .sm90venv
.sm90venv/bin/python -m pip install -q -r requirements.txt
.sm90venv/bin/python -m pip install -q --no-deps jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2
.sm90venv/bin/python -m pip install -q --no-deps nvidia-cuda-nvdisasm  # SASS for offline/dump.py
