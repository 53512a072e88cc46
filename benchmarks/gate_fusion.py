"""The gated stage's per-entry work on one tensor: the gate, eager (`gates.py`) against fused
(`diff_pruning/fused.py`, compiled), and AdamW's step, torch's default implementation against its fused kernel.

Per diff entry, the gated stage's step samples a hard-concrete gate, forms `W + z * w` and sums the expected L0
(forward: `gates.gate_forward`), then forms the gradients of `w` and `alpha` with the penalty's (backward:
`gates.gate_backward`). This times both on one BERT-base feed-forward weight (768 x 3072) in each mode of
`fused.set_mode`, with the same noise, and checks that they agree; then times AdamW's step on the same tensor (per
parameter, wall and CPU time: the gated stage steps two tensors, `w` and `alpha`, per base parameter).

    python benchmarks/gate_fusion.py --threads 2 --output benchmarks/results/gate_fusion.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _record import write_record

from peft_diffprune.diff_pruning import fused, gates


STRETCH = (-1.5, 1.5)
L0_LAMBDA = 1.25e-7


def step(w, alpha, weight, grad_delta):
    """The gate's forward and backward work for one tensor in one step, as the gated linear layer does it."""
    z, _, adapted, elements = gates.gate_forward(w, alpha, None, STRETCH, weight, open_sum=True)
    scale = torch.tensor(L0_LAMBDA)
    grads = gates.gate_backward(grad_delta.clone(), w, None, z, STRETCH, (True, True, False), alpha, scale)
    return adapted, elements, *grads[:2]


def adamw_step_ns(like: torch.Tensor, fused_kernel: bool, repeats: int) -> dict:
    """Nanoseconds per parameter of one AdamW step (median), wall and CPU (`time.process_time`, all threads)."""
    param = torch.nn.Parameter(torch.randn_like(like))
    param.grad = torch.randn_like(like)
    optimizer = torch.optim.AdamW([param], lr=1e-3, fused=fused_kernel or None)
    optimizer.step()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {name: 1e9 * statistics.median(times) / like.numel() for name, times in (("wall", wall), ("cpu", cpu))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results/gate_fusion.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = (3072, 768)
    w, alpha, weight, grad_delta = (torch.randn(shape, generator=generator) * s for s in (1e-3, 1.0, 0.02, 1e-4))
    alpha += 3.0
    results, outputs = {}, {}
    for mode in ("off", "compile"):
        fused.set_mode(mode)
        torch.manual_seed(1)
        outputs[mode] = step(w, alpha, weight, grad_delta)  # compiles, in mode "compile"
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(w, alpha, weight, grad_delta)
            samples.append(1e3 * (time.perf_counter() - start))
        results[mode] = {"ms_per_tensor": statistics.median(samples), "ms_spread": [min(samples), max(samples)]}
    results["speedup"] = results["off"]["ms_per_tensor"] / results["compile"]["ms_per_tensor"]
    results["max_relative_difference"] = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(outputs["compile"], outputs["off"], strict=True)
    )
    results["adamw"] = {kind: adamw_step_ns(w, kind == "fused", args.repeats) for kind in ("default", "fused")}
    results["entries"] = w.numel()
    results["load_average_1min"] = os.getloadavg()[0]
    print(results)
    write_record(args.output, {"threads": args.threads, "repeats": args.repeats, "shape": list(shape)}, results)


if __name__ == "__main__":
    main()
