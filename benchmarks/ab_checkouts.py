"""One method's training step from two checkouts of this package, beside full fine-tuning, in interleaved rounds.

Each of full fine-tuning, the method at `--new` and the method at `--old` (a `git worktree` of an earlier commit)
runs as `pool_memory.py`'s worker in a process of its own, with the package imported from that checkout; each round
steps the three once, in rotating order, and the ratios are per round to full fine-tuning's step. The workers'
minor page faults and user and system CPU seconds (from `/proc`) come with them: glibc's heap returning and taking
back memory shows as faults and system time, not as compute.

    git worktree add /tmp/old 30cb550
    python benchmarks/ab_checkouts.py --old /tmp/old --model minilm --pool 16 --rounds 10 \
        --output benchmarks/results/ab_pool_sorted_minilm.json
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from _record import ALLOCATORS, allocator_env, write_record
from pool_memory import PoolWorker
from train_step import OPTIMIZERS


HERE = Path(__file__).resolve().parent


def start(method: str, checkout: str, settings: dict, allocator: str) -> PoolWorker:
    env = dict(os.environ, PYTHONPATH=checkout, HF_HUB_OFFLINE="1", **allocator_env(allocator))
    return PoolWorker(method, settings, env=env)


def proc_counters(pid: int) -> dict:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"minor_faults": int(fields[7]), "user_s": int(fields[11]) / ticks, "system_s": int(fields[12]) / ticks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="checkout of the earlier code (a git worktree)")
    parser.add_argument("--new", default=str(HERE.parent), help="checkout of the code to compare (this one)")
    parser.add_argument("--method", default="pool")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pool", type=float, default=16.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="glibc", help="the workers' allocator")
    parser.add_argument(
        "--full_optimizer", choices=OPTIMIZERS, default="fused", help="full fine-tuning's AdamW (the method's: fused)"
    )
    parser.add_argument("--output", default="benchmarks/results/ab_checkouts.json")
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("model", "batch_size", "seq_len", "threads", "pool")}
    settings.update(dtype="fp32", optimizer="fused", full_optimizer=args.full_optimizer)
    workers = {
        "full": start("full", args.new, settings, args.allocator),
        "new": start(args.method, args.new, settings, args.allocator),
        "old": start(args.method, args.old, settings, args.allocator),
    }
    names = list(workers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.warmup + args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(workers[name].ask("step")["step_time_s"])
    results = {}
    for name, worker in workers.items():
        results[name] = {"step_times_s": times[name], **proc_counters(worker.process.pid)}
        worker.process.kill()
    for name in ("new", "old"):
        ratios = [a / b for a, b in zip(times[name][args.warmup :], times["full"][args.warmup :], strict=True)]
        results[name].update(time_ratio=statistics.median(ratios), time_ratios=ratios)
        print(name, f"x{statistics.median(ratios):.3f}", results[name]["minor_faults"], "faults", flush=True)
    write_record(
        args.output,
        {**settings, "method": args.method, "old": args.old, "new": args.new, "allocator": args.allocator},
        results,
    )


if __name__ == "__main__":
    main()
