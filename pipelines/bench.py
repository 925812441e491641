"""Read throughput of the shard stream: samples/s and MB/s from local disk and from S3, at 1, 2 and 4 workers.

    python -m pipelines.bench                       # synthetic 4x64x64 float16 latents; local disk vs loopback moto S3
    python -m pipelines.bench --url s3://bucket/x   # an existing dataset instead (then only that source)

Loopback S3 is moto's server in a thread of this process (ENVIRONMENT.md), so it competes with the consumer
for the CPU: a lower bound for a real endpoint, and a measure of the client-side cost. Timing starts after
the first batch of each run (worker start-up excluded) and covers `--epochs` epochs of the rank's data.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from pipelines.shards import read_manifest, write_arrays
from pipelines.stream import ShardDataConfig, ShardStream


def measure(url: str, workers: int, batch_size: int, epochs: float) -> tuple[float, float]:
    manifest = read_manifest(url)
    stream = ShardStream(ShardDataConfig(url=url, num_workers=workers, shuffle_buffer=1000), manifest, batch_size)
    batches = max(1, int(epochs * manifest["total_samples"] / batch_size))
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    bytes_per_sample = sum(s["bytes"] for s in manifest["shards"]) / manifest["total_samples"]
    samples = batches * batch_size
    return samples / seconds, samples * bytes_per_sample / seconds / 1e6


def start_loopback_s3() -> object:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.get_host_and_port()[1]}")
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="benchmark this dataset instead of a synthetic one")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args(argv)
    sources = {}
    if args.url:
        sources[args.url.split("://")[0] if "://" in args.url else "local"] = args.url
    else:
        x = np.random.default_rng(0).standard_normal((args.samples, 4, 64, 64)).astype(np.float16)  # ImageNet-512 latent size
        tmp = tempfile.mkdtemp(prefix="sct-bench-")
        sources["local disk"] = write_arrays(x, None, tmp, args.shard_size) and tmp
        start_loopback_s3()
        from pipelines import s3

        s3.filesystem("s3://bench")[0].mkdir("bench")
        sources["loopback S3 (moto)"] = write_arrays(x, None, "s3://bench/latents", args.shard_size) and "s3://bench/latents"
    rows = []
    for name, url in sources.items():
        for workers in args.workers:
            rate, mb = measure(url, workers, args.batch_size, args.epochs)
            rows.append((name, workers, rate, mb))
            print(f"{name:>20} workers={workers}: {rate:8.0f} samples/s {mb:7.1f} MB/s", file=sys.stderr)
    print("\n| source | workers | samples/s | MB/s |\n|---|---:|---:|---:|")
    for name, workers, rate, mb in rows:
        print(f"| {name} | {workers} | {rate:,.0f} | {mb:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
