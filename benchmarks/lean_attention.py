"""Backward time of attention dropout (softmax, dropout, product with the values) without and with lean activations,
and with lean activations rebuilding the dropout mask at each of its two unpacks (the code before the rebuild was
kept for the second, emulated by patching `_TwoValued.unpack`).

The three take turns `--reps` times (the first two of each are warm-ups); a time is the median of one backward.

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
    return mask.to(self.value.dtype).mul_(self.value)


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

    def backward_seconds() -> float:
        probs = torch.nn.functional.dropout(scores.softmax(-1), p=0.1, training=True)
        loss = (probs @ values).sum()
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start

    times = {"plain": [], "lean": [], "lean_rebuilt_at_each_unpack": []}
    for _ in range(args.reps):
        for name in times:
            activations._TwoValued.unpack = rebuilt_at_each_unpack if name.endswith("each_unpack") else kept_unpack
            if name == "plain":
                times[name].append(backward_seconds())
            else:
                with activations.lean_activations():
                    times[name].append(backward_seconds())
    activations._TwoValued.unpack = kept_unpack
    results = {
        name: {"backward_ms": statistics.median(t[2:]) * 1e3, "backward_times_s": t} for name, t in times.items()
    }
    for name, result in results.items():
        print(f"{name:28s} {result['backward_ms']:.1f} ms", flush=True)
    write_record(args.output, vars(args), results)


if __name__ == "__main__":
    main()
