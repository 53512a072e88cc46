"""Where the time of one training step goes: torch.profiler over a few steps of each method, as time per step in the
forward, backward and optimizer phases and per operator (self CPU time), with each operator's difference to full
fine-tuning. All methods are built in this process and profiled one step each in turn, round after round, so that
load from other jobs on the machine falls on all of them alike.

    python benchmarks/profile_step.py --methods full diff_pruning diff_pruning_structured \
        --output benchmarks/results/profile_step.json
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from _record import write_record
from torch.profiler import ProfilerActivity, profile
from train_step import DTYPES, METHODS, OPTIMIZERS, build, make_batches, train_step


PHASES = ("forward", "backward", "optimizer")


def pool_methods() -> tuple[str, ...]:
    """The candidate pool's methods of `pool_memory.py` (`pool`, `pool_lean`, ...), which `--pool` sizes."""
    import pool_memory

    return tuple(
        m + x
        for m in (*pool_memory.METHODS, pool_memory.WHOLE_TRANSPOSES, pool_memory.SAMPLED_ONLY)
        for x in ("", pool_memory.CHECKPOINTED, pool_memory.SELECTIVE, pool_memory.LEAN, pool_memory.LEAN_CHEAP)
        if m not in METHODS or x
    )


def build_method(method: str, args):
    """`train_step.build`, or `pool_memory.build` for a pool method (its pool chosen from `--score_batches` of the
    profiled batches' shape)."""
    if method in METHODS:
        return build(method, args.model, args.dtype, args.optimizer)
    import pool_memory

    pool_memory.BATCH_SHAPE, pool_memory.SCORE_BATCHES = (args.batch_size, args.seq_len), args.score_batches
    return pool_memory.build(method, args.model, args.dtype, args.optimizer, args.pool)


def profile_in_rounds(args) -> dict:
    """Per method: milliseconds per step of each phase and of each operator's self CPU time."""
    runs = {}
    for method in args.methods:
        model, optimizer = build_method(method, args)
        model.train()
        runs[method] = (model, optimizer, make_batches(model.config.vocab_size, args.batch_size, args.seq_len))
        for step in range(args.warmup):
            train_step(model, optimizer, runs[method][2][step % 2])
    phases = {method: Counter() for method in args.methods}
    ops = {method: Counter() for method in args.methods}
    for step in range(args.steps):
        for method, (model, optimizer, batches) in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(model, optimizer, batches[step % 2])
            for event in prof.key_averages():
                if event.key in PHASES:
                    phases[method][event.key] += event.cpu_time_total / 1e3 / args.steps
                else:
                    ops[method][event.key] += event.self_cpu_time_total / 1e3 / args.steps
    return {method: {"phases_ms": dict(phases[method]), "self_cpu_ms": ops[method]} for method in args.methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["full", "diff_pruning", "diff_pruning_structured"])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="of the base model and the adapter state")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="fused", help="how AdamW runs")
    parser.add_argument("--pool", type=float, default=8.0, help="a pool method's pool, times the 0.5%% budget")
    parser.add_argument("--score_batches", type=int, default=1, help="batches that choose a pool method's pool")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", default="benchmarks/results/profile_step.json")
    args = parser.parse_args()
    known = (*METHODS, *pool_methods())
    if not set(args.methods) <= set(known) or args.methods[0] != "full":
        raise ValueError(f"--methods must start with 'full' and be among {known}, got {args.methods}")
    torch.set_num_threads(args.threads)
    results = profile_in_rounds(args)
    full = results["full"]["self_cpu_ms"]
    for method, res in results.items():
        ops = res["self_cpu_ms"]
        extra = {op: ops[op] - full[op] for op in ops.keys() | full.keys()}
        res["extra_over_full_ms"] = dict(sorted(extra.items(), key=lambda item: -abs(item[1]))[: args.top])
        res["self_cpu_ms"] = dict(ops.most_common(args.top))
        phases = ", ".join(f"{phase} {ms:.0f}" for phase, ms in res["phases_ms"].items())
        print(f"\n{method}: ms per step: {phases}")
        for op, ms in res["extra_over_full_ms"].items():
            print(f"  {ms:+8.1f} ms  {op}")
    write_record(args.output, {k: v for k, v in vars(args).items() if k != "output"}, results)


if __name__ == "__main__":
    main()
