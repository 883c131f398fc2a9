"""The cost of the crc32c checksum on every chunk: `record` and `analyze` of one run with the
store's codecs as they are and with the checksum left out, alternated, side by side in one run
(median of `--repeats`), and the checksum's own throughput.

    .venv/bin/python benchmarks/bench_checksums.py --dataset digits --model mlp --epochs 20
    .venv/bin/python benchmarks/bench_checksums.py --dataset synthetic:n=5000,size=28 \\
        --model lenet5 --epochs 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import google_crc32c

    from hydra_store.analysis.stored import analyze
    from hydra_store.arguments import AnalyzeConfig, RecordConfig
    from hydra_store.recording.training import record_run
    from hydra_store.store import arrays

    block = np.random.default_rng(0).integers(0, 255, size=64 * 2**20, dtype=np.uint8).tobytes()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        google_crc32c.value(block)
        times.append(time.perf_counter() - started)
    print(f"crc32c alone: {len(block) / statistics.median(times) / 1e9:.1f} GB/s")

    with_checksum = arrays.compressors_for

    def without_checksum(dtype):
        return with_checksum(dtype)[:-1]

    timings: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for label, checksum in (("with checksums", True), ("without", False)):
                arrays.compressors_for = with_checksum if checksum else without_checksum
                out = str(Path(scratch) / f"{label}-{repeat}.zarr".replace(" ", "-"))
                config = RecordConfig(
                    dataset=args.dataset, model=args.model, epochs=args.epochs, out=out
                )
                started = time.perf_counter()
                record_run(config)
                timings.setdefault(f"record {label}", []).append(time.perf_counter() - started)
                started = time.perf_counter()
                analyze(out, AnalyzeConfig(figures=False))
                timings.setdefault(f"analyze {label}", []).append(time.perf_counter() - started)
    arrays.compressors_for = with_checksum
    print(f"{args.dataset}/{args.model}, {args.epochs} epochs, median of {args.repeats}")
    for stage in ("record", "analyze"):
        on = statistics.median(timings[f"{stage} with checksums"])
        off = statistics.median(timings[f"{stage} without"])
        print(f"{stage:<8} with {on:7.2f} s   without {off:7.2f} s   ratio {on / off:5.3f}")


if __name__ == "__main__":
    main()
