"""Streaming throughput: the full Fashion-MNIST train set through a teacher's prefix.

Measures images/s of the jitted, batched prefix (the block input of ``--cut``) and of the
patch rows, counts the prefix's FLOPs from XLA's cost analysis, and measures a large f32
matmul's GFLOP/s with JAX in the same process, so throughput can be read as a fraction of
the machine's matmul roofline. Writes JSON to ``benchmarks/results/streaming.json``.

    python -m benchmarks.streaming [--teacher fashion-resnet20] [--cut stage3]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_description, write_json
from cvxdist.data import load_dataset
from cvxdist.streaming import stream_rows
from cvxdist.teachers import batched_apply, load_teacher


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` f32 GFLOP/s of an n×n by n×n matmul."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def flops_per_image(fn, variables, batch: np.ndarray) -> float:
    """XLA's FLOP count of ``fn(variables, batch)`` divided by the batch size."""
    cost = jax.jit(fn).lower(variables, batch).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="fashion-resnet20")
    parser.add_argument("--cut", default="stage3", help="block whose input is streamed")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "streaming.json"))
    args = parser.parse_args()

    teacher = load_teacher(args.teacher)
    train = load_dataset(teacher.dataset, "train")
    images = train.images if args.limit is None else train.images[: args.limit]
    fns = teacher.cut_functions(args.cut)
    v = teacher.variables

    gflops_matmul = matmul_gflops()
    prefix_flops = flops_per_image(fns.prefix, v, images[: args.batch_size])

    # warm-up compile, then the timed full pass (host copies included)
    next(iter(batched_apply(fns.prefix, v, images[: args.batch_size], args.batch_size)))
    tic = time.perf_counter()
    shapes = None
    for z in batched_apply(fns.prefix, v, images, args.batch_size):
        shapes = z.shape
    prefix_s = time.perf_counter() - tic
    prefix_ips = len(images) / prefix_s
    achieved = prefix_ips * prefix_flops / 1e9

    # patch rows of the block (prefix + block + patch extraction), streamed in chunks
    list(stream_rows(teacher, images[: args.batch_size], args.cut, progress=False,
                     batch_size=args.batch_size))  # fmt: skip
    tic = time.perf_counter()
    rows = 0
    for chunk in stream_rows(teacher, images, args.cut, batch_size=args.batch_size, progress=False):
        rows += len(chunk.rows)
        row_dim = chunk.rows.shape[1]
    rows_s = time.perf_counter() - tic

    result = {
        "benchmark": "streaming",
        "teacher": teacher.name,
        "model": teacher.config.model,
        "width": teacher.config.width,
        "dataset": teacher.dataset,
        "cut": args.cut,
        "images": len(images),
        "batch_size": args.batch_size,
        "block_input_shape": list(shapes[1:]) if shapes else None,
        "prefix_flops_per_image": prefix_flops,
        "prefix_seconds": round(prefix_s, 3),
        "prefix_images_per_s": round(prefix_ips, 1),
        "prefix_gflops_achieved": round(achieved, 3),
        "matmul_gflops": round(gflops_matmul, 2),
        "fraction_of_matmul": round(achieved / gflops_matmul, 4),
        "patch_rows": rows,
        "patch_row_dim": row_dim,
        "patch_rows_seconds": round(rows_s, 3),
        "patch_rows_images_per_s": round(len(images) / rows_s, 1),
        # all patch rows would take rows·dim·4 bytes; the peak stays near one chunk's worth
        "patch_rows_total_mib": round(rows * row_dim * 4 / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": machine_description(),
    }
    write_json(Path(args.out), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
