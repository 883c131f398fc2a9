"""`record` and `analyze` of one run on a local disk and on an S3-compatible server (moto's
server mode on 127.0.0.1, started here), side by side in one run: wall time (median of
`--repeats`) and the ratio object storage / local disk.

    .venv/bin/python benchmarks/bench_object_storage.py --epochs 5 --repeats 3

moto keeps objects in memory behind a single-threaded HTTP server, so the ratio measures the
cost of the S3 protocol path (one request per chunk, no rename), not of a real object store's
network.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import s3fs

    from hydra_store.analysis.stored import analyze
    from hydra_store.arguments import AnalyzeConfig, RecordConfig
    from hydra_store.recording.training import record_run

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    timings: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for where, out in (
                ("local", str(Path(scratch) / f"run-{repeat}.zarr")),
                ("s3", f"s3://{bucket}/run-{repeat}.zarr"),
            ):
                config = RecordConfig(
                    dataset=args.dataset, model=args.model, epochs=args.epochs, out=out
                )
                started = time.perf_counter()
                summary = record_run(config)
                timings.setdefault(f"record {where}", []).append(time.perf_counter() - started)
                sizes[where] = summary.store_bytes
                started = time.perf_counter()
                analyze(out, AnalyzeConfig(figures=True))
                timings.setdefault(f"analyze {where}", []).append(time.perf_counter() - started)
    server.stop()

    print(
        f"{args.dataset}/{args.model}, {args.epochs} epochs, median of {args.repeats}; "
        f"store {sizes['local'] / 2**20:.1f} MiB local, {sizes['s3'] / 2**20:.1f} MiB on S3"
    )
    for stage in ("record", "analyze"):
        local = statistics.median(timings[f"{stage} local"])
        remote = statistics.median(timings[f"{stage} s3"])
        print(f"{stage:<8} local {local:7.2f} s   s3 {remote:7.2f} s   ratio {remote / local:5.2f}")


if __name__ == "__main__":
    main()
