"""Forward and backward time of attention dropout (softmax, dropout, product with the values) without and with lean
activations; with lean activations comparing, counting and packing the dropout mask with torch's ops instead of
numpy's on CPU (`activations.NUMPY_ON_CPU = False`, the code before numpy's were used); and with lean activations
rebuilding the dropout mask at each of its two unpacks (the code before the rebuild was kept for the second,
emulated by patching `_TwoValued.unpack`).

The variants take turns `--reps` times (the first two of each are warm-ups); a time is the median of one forward or
one backward.

    python benchmarks/lean_attention.py --output benchmarks/results/lean_attention_minilm.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _record import write_record

from peft_diffprune.diff_pruning import activations


def rebuilt_at_each_unpack(self) -> torch.Tensor:
    mask = self.mask if self.mask.dtype == torch.bool else activations.unpack_bits(self.mask, self.shape)
    return mask.view(torch.uint8).to(self.value.dtype).mul_(self.value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 12, 128, 128], help="batch, heads, queries, keys")
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=14)
    parser.add_argument("--output", default="benchmarks/results/lean_attention.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scores = torch.randn(*args.shape, requires_grad=True)
    values = torch.randn(*args.shape[:3], args.head_dim, requires_grad=True)
    kept_unpack = activations._TwoValued.unpack

    def forward_and_backward_seconds() -> tuple[float, float]:
        start = time.perf_counter()
        probs = torch.nn.functional.dropout(scores.softmax(-1), p=0.1, training=True)
        loss = (probs @ values).sum()
        middle = time.perf_counter()
        loss.backward()
        return middle - start, time.perf_counter() - middle

    names = ("plain", "lean", "lean_torch_ops", "lean_rebuilt_at_each_unpack")
    times = {name: ([], []) for name in names}
    for _ in range(args.reps):
        for name in names:
            activations._TwoValued.unpack = rebuilt_at_each_unpack if name.endswith("each_unpack") else kept_unpack
            activations.NUMPY_ON_CPU = name != "lean_torch_ops"
            if name == "plain":
                seconds = forward_and_backward_seconds()
            else:
                with activations.lean_activations():
                    seconds = forward_and_backward_seconds()
            for phase, value in zip(times[name], seconds, strict=True):
                phase.append(value)
    activations._TwoValued.unpack = kept_unpack
    activations.NUMPY_ON_CPU = True
    results = {
        name: {
            "forward_ms": statistics.median(forward[2:]) * 1e3,
            "backward_ms": statistics.median(backward[2:]) * 1e3,
            "forward_times_s": forward,
            "backward_times_s": backward,
        }
        for name, (forward, backward) in times.items()
    }
    for name, result in results.items():
        print(f"{name:28s} forward {result['forward_ms']:.1f} ms, backward {result['backward_ms']:.1f} ms", flush=True)
    write_record(args.output, vars(args), results)


if __name__ == "__main__":
    main()
