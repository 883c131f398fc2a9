#!/usr/bin/env bash
# Set up hydra-store in ./.venv: torch (the CPU build on a machine without an NVIDIA GPU, so that
# no multi-gigabyte CUDA wheel is downloaded), then the package with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.3"
  else
    # 2.13.0+cpu where the machine keeps that wheel (find-links); else PyTorch's CPU index.
    "${pip[@]}" "torch==2.13.0" 2>/dev/null \
      || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# (this machine's pip.conf names local indexes that may be absent: drop pip's warnings of them)
"${pip[@]}" -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -c "import hydra_store, torch, zarr, dask, xarray; print('hydra-store', hydra_store.__version__, '| torch', torch.__version__, '| zarr', zarr.__version__)"
