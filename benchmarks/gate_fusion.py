"""Prototype: what fusing the gate's per-entry work with torch.compile (Inductor's CPU backend) would save.

Per diff entry, the gated stage's step samples a hard-concrete gate and forms `z * w` (forward), forms the gradients
of `w` and `alpha` from the sampled gate and adds the expected-L0 penalty's gradient (backward): today about a dozen
elementwise passes in `diff_pruning/gates.py` (`sampled_delta`, `gate_grads`, `_SigmoidSum`), each reading and
writing whole tensors. This times those eager functions against two compiled kernels that do the same math in one
pass each, on one BERT-base feed-forward weight (768 x 3072), and checks that they agree (the compiled kernel draws
its own noise, so the check feeds both the same noise).

    python benchmarks/gate_fusion.py --output benchmarks/results/gate_fusion.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _record import write_record

from peft_diffprune.diff_pruning import gates


STRETCH = (-1.5, 1.5)
L0_LAMBDA = 1.25e-7


def eager_step(w, alpha, grad_delta):
    """What the gated stage does per tensor today: sample and scale, then the gradients and the penalty's."""
    z, delta = gates.sampled_delta(w, alpha, None, STRETCH)
    penalty = gates._SigmoidSum.apply(alpha.detach().requires_grad_(), gates.l0_shift(STRETCH))
    grad_w, grad_alpha, _ = gates.gate_grads(grad_delta.clone(), w, None, z, STRETCH, True, True, False)
    s = torch.sigmoid(alpha)  # the penalty's backward (sigmoid_backward of the shifted sigmoid)
    grad_alpha += torch.ops.aten.sigmoid_backward(torch.full_like(s, L0_LAMBDA), s)
    return delta, penalty, grad_w, grad_alpha


def fused_forward(w, alpha, noise):
    left, right = STRETCH
    u = noise.clamp(gates.NOISE_EPS, 1 - gates.NOISE_EPS)
    z = (torch.sigmoid(torch.log(u) - torch.log1p(-u) + alpha) * (right - left) + left).clamp(0, 1)
    return z, z * w, torch.sigmoid(alpha - gates.l0_shift(STRETCH)).sum()


def fused_forward_drawing_noise(w, alpha):
    """The same, with the noise drawn inside the kernel (Inductor's own generator): one pass fewer."""
    return fused_forward(w, alpha, torch.rand_like(alpha))


def fused_backward(grad_delta, w, alpha, z):
    left, right = STRETCH
    inside = (z > 0) & (z < 1)
    dz = torch.where(inside, (z - left) * (right - z) / (right - left), 0.0)
    s = torch.sigmoid(alpha - gates.l0_shift(STRETCH))
    return grad_delta * z, grad_delta * w * dz + L0_LAMBDA * s * (1 - s)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results/gate_fusion.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shape = (3072, 768)
    w, alpha, grad_delta = (torch.randn(shape, generator=generator) * s for s in (1e-3, 1.0, 1e-4))
    alpha += 3.0
    forward, backward = torch.compile(fused_forward), torch.compile(fused_backward)
    forward_drawing_noise = torch.compile(fused_forward_drawing_noise)

    def compiled_step():
        z, delta, penalty = forward(w, alpha, torch.rand(shape))
        return (delta, penalty, *backward(grad_delta, w, alpha, z))

    def compiled_step_drawing_noise():
        z, delta, penalty = forward_drawing_noise(w, alpha)
        return (delta, penalty, *backward(grad_delta, w, alpha, z))

    # the same noise through both: the fused kernels give the eager functions' values
    torch.manual_seed(1)
    reference = eager_step(w, alpha, grad_delta)
    torch.manual_seed(1)
    z, delta, penalty = forward(w, alpha, torch.rand(shape, dtype=torch.float32))
    fused = (delta, penalty, *backward(grad_delta, w, alpha, z))
    errors = [
        (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(fused, reference, strict=True)
    ]
    results = {}
    steps = {
        "eager": lambda: eager_step(w, alpha, grad_delta),
        "compiled": compiled_step,
        "compiled_drawing_noise": compiled_step_drawing_noise,
    }
    for name, fn in steps.items():
        fn()
        samples = [1e3 * t for t in timed(fn, args.repeats)]
        results[name] = {"ms_per_tensor": statistics.median(samples), "ms_spread": [min(samples), max(samples)]}
    for name in ("compiled", "compiled_drawing_noise"):
        results[f"speedup_{name}"] = results["eager"]["ms_per_tensor"] / results[name]["ms_per_tensor"]
    results["max_relative_difference"] = max(errors)
    results["entries"] = w.numel()
    print(results)
    write_record(args.output, {"threads": args.threads, "repeats": args.repeats, "shape": list(shape)}, results)


if __name__ == "__main__":
    main()
