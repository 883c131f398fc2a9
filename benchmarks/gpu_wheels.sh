#!/usr/bin/env bash
# Wheels, for the GPU machine, of what hydra-store needs and its image lacks (a Python 3.12 with
# torch, numpy, xarray, typer, numba, scikit-learn and matplotlib, but no zarr, dask or
# numcodecs): run here, where PyPI is reachable, before benchmarks/gpu_check.sh is carried there.
#
#     bash benchmarks/gpu_wheels.sh          # into .whl/ (kept out of git by .git/info/exclude)
#
# The versions are this checkout's .venv's, so that the GPU machine runs what the tests here ran.
# gpu_check.sh installs every wheel in .whl/ with `pip install --no-index --no-deps` first.

set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
mkdir -p .whl
# hydra-store's own needs the image lacks, and theirs (zarr: donfig, google-crc32c, numcodecs;
# dask: partd, locket; distributed: tblib, zict, msgpack, sortedcontainers, tornado;
# universal-pathlib: pathlib-abc).
NEEDED="zarr numcodecs donfig google-crc32c dask distributed partd locket tblib zict msgpack
sortedcontainers tornado universal-pathlib pathlib-abc"
for name in $NEEDED; do
  version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | awk '/^Version:/ { print $2 }')
  if [ -z "$version" ]; then
    echo "$name is not installed in .venv: run scripts/setup.sh first" >&2
    exit 2
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version"
done
ls -l .whl
du -sh .whl
