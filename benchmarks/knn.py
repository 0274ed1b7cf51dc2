"""kNN at MNIST scale: ``infer.knn_top1`` on 60,000 train x 10,000 test embeddings of size 64.

Embeddings are float32 draws around 10 class centres (so the accuracy is a real number to
check, not chance), made before timing. It reports the wall and CPU seconds of
``infer.knn_top1`` (chunked float32, ``infer.KNN_BLOCK_BYTES`` of scratch per block), the peak
RSS before and after it (``ru_maxrss``, a high-water mark), and what a dense float32 similarity
matrix alone would take. Against it, the same 1-NN computed by brute force in float64 on the first
``--check`` test rows must agree exactly. Usage::

    flock /tmp/jaxes-cpu.lock .venv/bin/python benchmarks/knn.py [--train=60000 --test=10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

from jaxes import infer


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embeddings(count: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, count)
    noise = rng.normal(scale=1.2, size=(count, dim)).astype(np.float32)
    return centres[labels] + noise, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=60_000)
    parser.add_argument("--test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--check", type=int, default=500, help="test rows checked in float64")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    train, train_labels = embeddings(args.train, args.dim, 10, seed=1)
    test, test_labels = embeddings(args.test, args.dim, 10, seed=2)
    before = peak_rss_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    accuracy = infer.knn_top1(train, train_labels, test, test_labels)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = peak_rss_mib()

    def unit(x):
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    expected = np.argmax(unit(test[: args.check]) @ unit(train).T, axis=1)
    got = infer.nearest(train, test[: args.check], 1)[:, 0]
    agree = float(np.mean(expected == got))
    result = {
        "train": args.train,
        "test": args.test,
        "dim": args.dim,
        "knn_top1": accuracy,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_before_mib": round(before, 1),
        "peak_rss_after_mib": round(after, 1),
        "block_mib": infer.KNN_BLOCK_BYTES / 2**20,
        "dense_float32_matrix_mib": round(args.train * args.test * 4 / 2**20, 1),
        "float64_agreement_first_rows": agree,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if agree == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
