"""The sampled weight gradient of the fixed-mask stage and the pool on CPU: `sampled_addmm` against the dense product
and a gather, per weight shape and density, to place `functional.DENSE_PRODUCT_DENSITY`.

For each shape `(out, in)` and density, random sorted positions, and `tokens x out` / `tokens x in` random operands,
the two ways of `functional._sampled_weight_grad` (with its blocked transposes, and the dense product `grad^T @ x`
gathered at the positions) take turns, `--reps` times each; a time is the median. The crossover of a shape is the
density from which the dense product is faster (linear interpolation between the measured densities).

    python benchmarks/weight_grad_kernels.py --tokens 4096 --threads 2 --output benchmarks/results/weight_grad_kernels.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _record import write_record

from peft_diffprune.diff_pruning import functional


SHAPES = ((384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768), (768, 3072))
DENSITIES = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08)


def sampled(grad_out, x, positions, shape):
    density = functional.DENSE_PRODUCT_DENSITY
    functional.DENSE_PRODUCT_DENSITY = 2.0  # never dense
    try:
        return functional._sampled_weight_grad(grad_out, x, positions, shape)
    finally:
        functional.DENSE_PRODUCT_DENSITY = density


def dense(grad_out, x, positions, shape):
    return (grad_out.t() @ x).view(-1).index_select(0, positions)


def crossover(densities, sampled_ms, dense_ms) -> float | None:
    """The density from which the dense product is faster, interpolated; None if it never is in the range."""
    diffs = [s - d for s, d in zip(sampled_ms, dense_ms, strict=True)]
    if diffs[0] >= 0:
        return densities[0]
    for i in range(1, len(diffs)):
        if diffs[i] >= 0:
            return densities[i - 1] + (densities[i] - densities[i - 1]) * -diffs[i - 1] / (diffs[i] - diffs[i - 1])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--output", default="benchmarks/results/weight_grad_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    results = {}
    for out_features, in_features in SHAPES:
        grad_out = torch.randn(args.tokens, out_features, generator=generator)
        x = torch.randn(args.tokens, in_features, generator=generator)
        numel = out_features * in_features
        rows = {"densities": list(DENSITIES), "sampled_ms": [], "dense_ms": []}
        for density in DENSITIES:
            positions = torch.randperm(numel, generator=generator)[: int(density * numel)].sort().values
            times = {"sampled": [], "dense": []}
            for rep in range(args.reps + 1):
                for name, kernel in (("sampled", sampled), ("dense", dense))[:: 1 if rep % 2 else -1]:
                    start = time.perf_counter()
                    kernel(grad_out, x, positions, (out_features, in_features))
                    if rep:  # the first of each is a warm-up
                        times[name].append((time.perf_counter() - start) * 1e3)
            rows["sampled_ms"].append(statistics.median(times["sampled"]))
            rows["dense_ms"].append(statistics.median(times["dense"]))
            print(
                f"{out_features}x{in_features} density {density:.3f}: sampled {rows['sampled_ms'][-1]:.2f} ms, "
                f"dense {rows['dense_ms'][-1]:.2f} ms",
                flush=True,
            )
        rows["crossover_density"] = crossover(DENSITIES, rows["sampled_ms"], rows["dense_ms"])
        results[f"{out_features}x{in_features}"] = rows
        print(f"{out_features}x{in_features}: dense from density {rows['crossover_density']}", flush=True)
    settings = {"tokens": args.tokens, "threads": args.threads, "reps": args.reps}
    write_record(args.output, settings, results)


if __name__ == "__main__":
    main()
