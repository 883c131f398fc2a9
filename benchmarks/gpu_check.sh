#!/usr/bin/env bash
# One prepared run on a machine with a CUDA GPU (docs/recording.md, "On a GPU"): the CUDA tests,
# `record --device cuda` against `--device cpu`, the analysers with --device cuda against the
# CPU, and benchmarks/bench_paper_models.py --device cuda. Well under 10 minutes on one H200.
#
#     bash benchmarks/gpu_check.sh                 # writes into $OUT if set, else ./gpu-check-out
#
# Needs no network. Every step runs under its own time limit; a step that fails (a missing
# package, no GPU, a test that fails) is reported in summary.txt and the next one runs. The exit
# status is 1 when any step failed. What it writes (at most 8 files, none in subfolders):
#   summary.txt  the device, each step's status and wall time, the figures
#   log.txt      everything every step printed
#   pytest.txt   the CUDA tests (`pytest -m cuda` on the test files that have them)
#   compare.txt  the analysers' results on CUDA against the CPU's, array by array
#   bench.txt    benchmarks/bench_paper_models.py, per model, CUDA and (LeNet-5) CPU
#
# Python: $PYTHON, else .venv/bin/python where it imports torch, else python3. Wheels of missing
# dependencies put in .whl/ are installed (pip --no-index) into a temporary folder first. The
# package and its CLI are taken from this checkout, installed or not. On the lent H200 (whose
# image has torch but no zarr, dask or numcodecs): `bash benchmarks/gpu_wheels.sh` here first,
# then the device call runs `bash benchmarks/gpu_check.sh` with `.whl` carried (13 MB).
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh: a dry run of the script
# itself on a machine without a GPU (every "cuda" step on the CPU, small sizes).

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
SUMMARY=$OUT/summary.txt
LOG=$OUT/log.txt
: >"$SUMMARY"
: >"$LOG"
: >"$OUT/pytest.txt"
: >"$OUT/compare.txt"
: >"$OUT/bench.txt"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT FILE COMMAND...: run COMMAND under `timeout LIMIT`, its output appended to
# FILE (and to log.txt); one line of status and wall time in summary.txt.
step() {
  local name=$1 limit=$2 file=$3
  shift 3
  local start end rc why="" copies=("$LOG")
  [ "$file" = "$LOG" ] || copies+=("$file")
  echo "=== $name: $*" | tee -a "${copies[@]}" >/dev/null
  start=$(date +%s.%N)
  timeout "$limit" "$@" 2>&1 | tee -a "${copies[@]}" >"$WORK/last.txt"
  rc=${PIPESTATUS[0]}
  end=$(date +%s.%N)
  SECONDS_TAKEN=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then
    note "ok      $name  ${SECONDS_TAKEN} s"
  else
    [ "$rc" -eq 124 ] && why=", stopped at its limit of $limit s"
    note "FAILED  $name  ${SECONDS_TAKEN} s (exit $rc$why)"
    tail -n 3 "$WORK/last.txt" | sed 's/^/          | /' | tee -a "$SUMMARY"
    FAILED=$((FAILED + 1))
  fi
  return "$rc"
}

# -- the Python that runs it -------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PY=$ROOT/.venv/bin/python
  else
    PY=python3
  fi
fi
if compgen -G ".whl/*.whl" >/dev/null \
  && ! "$PY" -c "import zarr, numcodecs, dask, distributed, upath" 2>/dev/null; then
  step "install .whl/ wheels" 300 "$LOG" "$PY" -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import hydra_store, hydra_store_cli" 2>/dev/null; then
  # The checkout itself: hydra_store from its root, the CLI (cli/) as hydra_store_cli.
  mkdir -p "$WORK/shim" && ln -s "$ROOT/cli" "$WORK/shim/hydra_store_cli"
  export PYTHONPATH="$ROOT:$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
HS=("$PY" -m hydra_store_cli.main)

note "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)'), device $DEVICE, quick $QUICK"
if command -v nvidia-smi >/dev/null; then
  note "$(nvidia-smi -L 2>&1 | head -4)"
else
  note "nvidia-smi: not found"
fi
note "$(nproc) CPU cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 2^20 }' /proc/meminfo) memory"
note "$("$PY" - <<'EOF' 2>&1
import importlib
import sys

print(f"python {sys.version.split()[0]} ({sys.executable})")
try:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible"
    print(f"torch {torch.__version__}, {gpu}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
          f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
except ImportError as error:
    print(f"torch missing: {error}")
names = "zarr numcodecs dask distributed xarray typer sklearn matplotlib tqdm numba "
names += "threadpoolctl pandas upath pytest"
missing = []
for name in names.split():
    try:
        importlib.import_module(name)
    except ImportError as error:
        missing.append(f"{name} ({error})")
print("missing packages: " + (", ".join(missing) if missing else "none"))
EOF
)"

if [ "$QUICK" = 1 ]; then
  DIGITS=(--epochs 2)
  LENET_DATA="synthetic:n=300,size=28"
  SAMPLES=3
  BENCH=(--steps 2)
  BENCH_RUNS=("lenet5 64")
else
  DIGITS=()
  LENET_DATA="synthetic:n=5000,size=28"
  SAMPLES=10
  BENCH=(--steps 5)
  # MobileNetV2 (2.2M parameters) with 10,000 tracked would need an 89 GB store: not here.
  BENCH_RUNS=("lenet5 400,2000,10000" "densenet40 400,2000,10000" "mobilenetv2 400,2000")
fi
# LeNet-5 with its state in host memory (staged), beside the same run with it on the GPU.
STAGED_RUN="lenet5 2000,10000"

# -- 1. the CUDA tests ---------------------------------------------------------------------------
mapfile -t CUDA_TESTS < <(grep -rl "pytest.mark.cuda" tests --include "test_*.py" | sort)
step "pytest -m cuda (${#CUDA_TESTS[@]} files)" 420 "$OUT/pytest.txt" \
  "$PY" -m pytest -m cuda -q -rA -p no:cacheprovider --durations=15 \
  --continue-on-collection-errors "${CUDA_TESTS[@]}"
note "        $(grep -E '(passed|failed|error|skipped)' "$OUT/pytest.txt" | tail -1)"

# -- 2. record on the GPU against the CPU --------------------------------------------------------
record() {  # record NAME DEVICE ARGS...: the store is $WORK/NAME.zarr; the CLI's time line noted
  local name=$1 device=$2
  shift 2
  step "record $name (--device $device)" 300 "$LOG" \
    "${HS[@]}" record --out "$WORK/$name.zarr" --device "$device" "$@" &&
    note "        $(grep -E '^ +time ' "$LOG" | tail -1 | sed 's/^ *//')"
}
record digits-gpu "$DEVICE" "${DIGITS[@]}"
record digits-cpu cpu "${DIGITS[@]}"
LENET=(--dataset "$LENET_DATA" --model lenet5 --epochs 1)
record lenet-gpu "$DEVICE" "${LENET[@]}"
record lenet-cpu cpu "${LENET[@]}"
# The tracked state kept in host memory, each batch's rows staged to the GPU and back (what a
# state larger than the GPU's budget gets): the same hypergradients as the state on the GPU.
if [ "$DEVICE" = cuda ]; then
  record lenet-gpu-host "$DEVICE" "${LENET[@]}" --device-memory-budget 1MiB
fi

# -- 3. the analysers with --device cuda against the CPU, on the GPU-recorded digits store ------
analysers() {  # analysers STORE DEVICE RESULTS: analyze, hydra-exact and validate into RESULTS
  local store=$1 device=$2 results=$3
  step "analyze $(basename "$store") --device $device" 240 "$LOG" \
    "${HS[@]}" analyze "$store" --no-figures --device "$device" --out "$results"
  step "analyze $(basename "$store") --method hydra-exact --device $device" 300 "$LOG" \
    "${HS[@]}" analyze "$store" --method hydra-exact --device "$device" --out "$results"
  step "validate $(basename "$store") --samples $SAMPLES --device $device" 240 "$LOG" \
    "${HS[@]}" validate "$store" --samples "$SAMPLES" --device "$device" --out "$results"
}
if [ -d "$WORK/digits-gpu.zarr" ]; then
  analysers "$WORK/digits-gpu.zarr" "$DEVICE" "$WORK/digits-gpu-on-gpu.zarr"
  analysers "$WORK/digits-gpu.zarr" cpu "$WORK/digits-gpu-on-cpu.zarr"
fi
# LeNet-5 (convolutions): reverse mode of the GPU-recorded run on the GPU, and of the
# CPU-recorded run on both (the replay of a CPU recording on the GPU is checked against every
# stored checkpoint at 1e-5).
for pair in "lenet-gpu $DEVICE" "lenet-cpu $DEVICE" "lenet-cpu cpu"; do
  read -r name device <<<"$pair"
  [ -d "$WORK/$name.zarr" ] && step "analyze $name --method hydra-exact --device $device" 300 \
    "$LOG" "${HS[@]}" analyze "$WORK/$name.zarr" --method hydra-exact --device "$device" \
    --out "$WORK/$name-on-$device.zarr"
done

step "compare the analysers' results on $DEVICE with the CPU's" 120 "$OUT/compare.txt" \
  "$PY" - "$WORK" "$DEVICE" <<'EOF'
"""Each pair of results stores, array by array: max |a - b| / max |b|, and the Spearman
correlation of the totals (b: the CPU's)."""
import sys
from pathlib import Path

import numpy as np
import zarr
from scipy.stats import spearmanr

work, device = Path(sys.argv[1]), sys.argv[2]
if (work / "lenet-gpu-host.zarr").exists():
    staged = zarr.open_group(work / "lenet-gpu-host.zarr", mode="r")
    resident = zarr.open_group(work / "lenet-gpu.zarr", mode="r")
    a, b = staged["hypergradient"][:], resident["hypergradient"][:]
    error = np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)
    print(f"LeNet-5 hypergradients, state in host memory against on the GPU: {error:.2e}")
pairs = [
    ("digits-gpu-on-gpu.zarr", "digits-gpu-on-cpu.zarr", "digits, recorded on the GPU"),
    (f"lenet-cpu-on-{device}.zarr", "lenet-cpu-on-cpu.zarr", "LeNet-5, recorded on the CPU"),
]
arrays = {
    "analysis/test": ("test_gradient", "test_loss", "total_contribution", "interclass"),
    "reverse/test": ("total_contribution_exact", "total_contribution_approx"),
    "reverse/test/validation": ("loss_change",),
}
failed = False
for gpu_name, cpu_name, what in pairs:
    print(f"{what}: {gpu_name} against {cpu_name}")
    if not (work / gpu_name).exists() or not (work / cpu_name).exists():
        print("  missing (an earlier step failed)")
        failed = True
        continue
    gpu, cpu = zarr.open_group(work / gpu_name, mode="r"), zarr.open_group(work / cpu_name, mode="r")
    for group, names in arrays.items():
        if group not in gpu or group not in cpu:
            continue
        for name in names:
            a, b = np.asarray(gpu[group][name][:], float), np.asarray(cpu[group][name][:], float)
            error = np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)
            line = f"  {group}/{name} {b.shape}: max |gpu - cpu| / max |cpu| = {error:.2e}"
            if name.startswith("total") or name == "loss_change":
                line += f", Spearman {spearmanr(a, b)[0]:.6f}"
                line += f", signs differ {np.mean(np.sign(a) != np.sign(b)):.4f}"
            print(line)
        if group == "reverse/test/validation":
            base = [g[group].attrs["base_test_loss"] for g in (gpu, cpu)]
            print(f"  base test loss gpu {base[0]:.8f} cpu {base[1]:.8f}")
sys.exit(1 if failed else 0)
EOF
grep -E "max \|gpu| against |host memory against" "$OUT/compare.txt" | sed 's/^ */        /' | tee -a "$SUMMARY"

# -- 4. the paper's models: plain SGD steps and HydraRecorder steps, interleaved ----------------
for run in "${BENCH_RUNS[@]}"; do
  read -r model tracked <<<"$run"
  step "bench_paper_models $model --tracked $tracked --device $DEVICE" 240 "$OUT/bench.txt" \
    "$PY" benchmarks/bench_paper_models.py --models "$model" --tracked "$tracked" \
    --device "$DEVICE" "${BENCH[@]}"
done
if [ "$DEVICE" = cuda ]; then
  # The paper's setting: the tracked samples and batches drawn from 50,000 (a few tracked a batch).
  step "bench_paper_models densenet40,mobilenetv2 --tracked 400,2000 --train-size 50000" 240 \
    "$OUT/bench.txt" "$PY" benchmarks/bench_paper_models.py --models densenet40,mobilenetv2 \
    --tracked 400,2000 --train-size 50000 --device cuda "${BENCH[@]}"
  read -r model tracked <<<"$STAGED_RUN"
  step "bench_paper_models $model --tracked $tracked --device cuda --device-memory-budget 1MiB" \
    240 "$OUT/bench.txt" "$PY" benchmarks/bench_paper_models.py --models "$model" \
    --tracked "$tracked" --device cuda --device-memory-budget 1MiB "${BENCH[@]}"
fi
read -r model tracked <<<"${BENCH_RUNS[0]}"
step "bench_paper_models $model --tracked $tracked --device cpu" 240 "$OUT/bench.txt" \
  "$PY" benchmarks/bench_paper_models.py --models "$model" --tracked "$tracked" --device cpu \
  "${BENCH[@]}"
grep -E "^(torch |lenet5 |densenet40 |mobilenetv2 )" "$OUT/bench.txt" | tee -a "$SUMMARY"

note "$FAILED step(s) failed; full output in log.txt"
[ "$FAILED" -eq 0 ]
