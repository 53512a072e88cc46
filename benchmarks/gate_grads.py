"""The gate's backward on one tensor: `gates.gate_grads` against the formula it replaced, on a BERT-base
feed-forward weight (3072 x 768), interleaved, with the same inputs, and how far the two results are apart.

The replaced formula formed `dz/dalpha = (z - l)(r - z) / (r - l)` with its own temporaries, zeroed it where the
sample was clamped (two comparisons, a logical or, a masked fill) and multiplied by the gradient and `w`: about ten
passes over the tensor. `gate_grads` takes four (`_alpha_grad`: the products, `s = (z - l) / (r - l)`,
`sigmoid_backward`, `hardtanh_backward`), plus one for `w`'s gradient.

    python benchmarks/gate_grads.py --threads 2 --output benchmarks/results/gate_grads.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _record import write_record

from peft_diffprune.diff_pruning import gates


STRETCH = (-1.5, 1.5)


def replaced(grad_delta, w, z, stretch):
    """The gradients of `w` and `alpha` as `gates.gate_grads` formed them before (unstructured, both needed)."""
    left, right = stretch
    derivative = (z - left).mul_(right - z).div_(right - left)
    derivative.masked_fill_(torch.logical_or(z <= 0, z >= 1), 0.0)
    grad_alpha = derivative.mul_(grad_delta).mul_(w)
    return grad_delta.mul_(z), grad_alpha


def current(grad_delta, w, z, stretch):
    return gates.gate_grads(grad_delta, w, None, z, stretch, True, True, False)[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--output", default="benchmarks/results/gate_grads.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = (3072, 768)
    w = torch.randn(shape, generator=generator) * 1e-2
    alpha = torch.randn(shape, generator=generator) * 3.0
    grad = torch.randn(shape, generator=generator)
    z = gates.sample_gate_from_noise(alpha, torch.rand(shape, generator=generator), STRETCH)
    functions = {"replaced": replaced, "current": current}
    outputs = {name: f(grad.clone(), w, z, STRETCH) for name, f in functions.items()}
    samples = {name: [] for name in functions}
    for _ in range(args.repeats):
        for name, f in functions.items():
            inputs = grad.clone()
            start = time.perf_counter()
            f(inputs, w, z, STRETCH)
            samples[name].append(1e3 * (time.perf_counter() - start))
    results = {
        name: {"ms_per_tensor": statistics.median(times), "ms_quartiles": statistics.quantiles(times, n=4)}
        for name, times in samples.items()
    }
    results["speedup"] = results["replaced"]["ms_per_tensor"] / results["current"]["ms_per_tensor"]
    results["max_abs_difference"] = {
        label: (a - b).abs().max().item()
        for label, a, b in zip(("w", "alpha"), outputs["current"], outputs["replaced"], strict=True)
    }
    results["gates_at_0_or_1"] = ((z == 0) | (z == 1)).float().mean().item()
    results["entries"] = w.numel()
    results["load_average_1min"] = os.getloadavg()[0]
    print(results)
    write_record(args.output, {"threads": args.threads, "repeats": args.repeats, "shape": list(shape)}, results)


if __name__ == "__main__":
    main()
