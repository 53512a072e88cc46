"""What makes a MiniLM training step fast on a CPU: bf16 autocast, torch threads, and how batches are padded.

    python benchmarks/cpu_speed.py --threads 1 --other_threads 2 --rounds 4 --warmup 1 \
        --output benchmarks/results/cpu_speed.json

Three workers, one per training kind (full fine-tuning, the gated stage of diff pruning, the fixed-mask stage at
0.5%), built as in `train_step.py`. Each worker cycles through the variants (`variants`): fp32 or bf16 autocast
(`torch.autocast("cpu", dtype=torch.bfloat16)`, what `--mixed_precision bf16` does on a CPU), `--threads` or
`--other_threads` torch threads, and the diff pruning `nn.Linear` path of `GenericLayer._adapted_forward` (the
autograd functions of `functional.py`) forced off in fp32 or forced on under autocast, where the layer skips it
today. The workers take turns one step each, variant after variant (A B C ... A B C ...), for `--rounds` rounds after
`--warmup`; each variant's figure is the median over rounds of its step time over the baseline's (fp32 at
`--threads`, same length) in the same round, with the spread (min, max) over rounds.

Padding: the step time is measured at several padded lengths (`--lengths`), and applied to the padded lengths an
epoch of the main job's data gets (the first `--train_samples` SST-2 training sentences, batch `--batch_size`) under
three batchings: padded to `--max_length` (the collator's `padding="max_length"`), padded per batch (the example's
`DataCollatorWithPadding`, shuffled batches) and length-grouped (shuffled, then sorted by length within mega-batches
of 50 batches, as `transformers`' `group_by_length`).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from _record import write_record
from train_step import build, make_batches, train_step


REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = {"full": "full", "gated": "diff_pruning", "fixmask": "fixmask"}


def variants(threads: int, other_threads: int) -> dict[str, tuple]:
    """name: (autocast dtype or None, torch threads, the diff pruning `nn.Linear` path: None as the layer decides, or
    forced on or off)."""
    return {
        "fp32": (None, threads, None),
        "bf16": (torch.bfloat16, threads, None),
        f"fp32_{other_threads}threads": (None, other_threads, None),
        f"bf16_{other_threads}threads": (torch.bfloat16, other_threads, None),
        "fp32_generic_linear": (None, threads, False),
        "bf16_linear_path": (torch.bfloat16, threads, True),
    }


BASELINE = "fp32"
MEGA_BATCH = 50


class TorchSeeingAutocast(types.ModuleType):
    """`torch`, except that `is_autocast_enabled` gives a fixed answer."""

    def __init__(self, autocast: bool):
        super().__init__("torch")
        self.autocast = autocast

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def is_autocast_enabled(self, *args) -> bool:
        return self.autocast


def force_linear_path(enabled: bool | None) -> None:
    """Make `GenericLayer._adapted_forward` take (True) or skip (False) its `nn.Linear` autograd functions whatever
    the autocast state, by giving the layer module a `torch` whose `is_autocast_enabled` answers accordingly."""
    from peft_diffprune.diff_pruning import layer

    layer.torch = torch if enabled is None else TorchSeeingAutocast(not enabled)


class Autocast:
    """The model's forward under autocast (backward and the optimizer step outside it), as Accelerate runs it."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
        self.model, self.dtype = model, dtype

    def __call__(self, **batch):
        with torch.autocast("cpu", dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(**batch)


def worker(args) -> None:
    """Build one training kind, then for each "step <variant> <length>" line on stdin run one step and answer with
    its time (or the error) as one line."""
    model, optimizer = build(KINDS[args.kind], "minilm")
    model.train()
    batches = {length: make_batches(model.config.vocab_size, args.batch_size, length)[0] for length in args.lengths}
    print("ready", flush=True)
    for line in sys.stdin:
        _, variant, length = line.split()
        dtype, threads, linear_path = variants(args.threads, args.other_threads)[variant]
        torch.set_num_threads(threads)
        force_linear_path(linear_path)
        start = time.perf_counter()
        try:
            train_step(Autocast(model, dtype), optimizer, batches[int(length)])
        except Exception as error:  # a variant the code does not support: say why and carry on
            optimizer.zero_grad(set_to_none=True)
            print(f"error {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
            continue
        print(f"time {time.perf_counter() - start}", flush=True)


def padded_lengths(lengths: list[int], batch_size: int, max_length: int, batching: str, seed: int) -> list[int]:
    """The padded length of every batch of one epoch over examples of these token `lengths`."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if batching == "length_grouped":
        mega = batch_size * MEGA_BATCH
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if batching == "max_length":
        return [max_length] * len(batches)
    return [max(lengths[i] for i in batch) for batch in batches]


def sst2_lengths(samples: int, max_length: int) -> list[int]:
    from transformers import AutoTokenizer

    from peft_diffprune.recipe.hub import packaged_minilm_path

    data_dir = Path(os.environ.get("GLUE_DIR", REPO_ROOT.parent / "shared" / "data" / "glue"))
    with (data_dir / "SST-2" / "train.tsv").open() as file:
        sentences = [
            row["sentence"]
            for row in itertools.islice(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE), samples)
        ]
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    return [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]


def interpolate(times: dict[int, float], length: int) -> float:
    """Step time at `length`, linear between the measured lengths (and beyond the ends along the nearest segment)."""
    known = sorted(times)
    low = max([k for k in known[:-1] if k <= length] or [known[0]])
    high = known[known.index(low) + 1]
    return times[low] + (times[high] - times[low]) * (length - low) / (high - low)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=list(KINDS), help="run one training kind as a worker (internal)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--batch_size", type=int, default=16, help="The main job's batch.")
    parser.add_argument("--length", type=int, default=32, help="Padded length of the precision and thread variants.")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8, 16, 32, 64], help="Lengths of the padding study."
    )
    parser.add_argument("--max_length", type=int, default=64, help="The main job's --max_length.")
    parser.add_argument("--train_samples", type=int, default=2000, help="The main job's --max_train_samples.")
    parser.add_argument("--threads", type=int, default=2, help="Torch threads of every variant but one pair.")
    parser.add_argument("--other_threads", type=int, default=1, help="Torch threads of the fp32 / bf16 pair compared.")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/cpu_speed.json")
    args = parser.parse_args()
    args.lengths = sorted(set(args.lengths) | {args.length})
    if args.kind:
        worker(args)
        return
    names = ("batch_size", "length", "lengths", "max_length", "train_samples", "threads", "other_threads")
    settings = {k: getattr(args, k) for k in names}
    all_variants = variants(args.threads, args.other_threads)
    settings |= {
        "rounds": args.rounds,
        "warmup": args.warmup,
        "variants": {k: str(v) for k, v in all_variants.items()},
    }
    cases = [(variant, args.length) for variant in all_variants]
    cases += [(variant, length) for variant in ("fp32", "bf16") for length in args.lengths if length != args.length]
    workers = {}
    for kind in args.kinds:
        command = [sys.executable, __file__, "--kind", kind, f"--batch_size={args.batch_size}"]
        command += [f"--length={args.length}", "--lengths", *map(str, args.lengths)]
        command += [f"--threads={args.threads}", f"--other_threads={args.other_threads}"]
        workers[kind] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert workers[kind].stdout.readline().strip() == "ready", f"worker {kind} failed to start"
    times = {kind: {case: [] for case in cases} for kind in workers}
    errors = {}
    loads = []
    try:
        for round_ in range(args.warmup + args.rounds):
            loads.append(os.getloadavg()[0])
            for case in cases:
                for kind, process in workers.items():
                    process.stdin.write(f"step {case[0]} {case[1]}\n")
                    process.stdin.flush()
                    answer = process.stdout.readline().split(maxsplit=1)
                    if answer[0] == "error":
                        errors[f"{kind} {case[0]}"] = answer[1].strip()
                    elif round_ >= args.warmup:
                        times[kind][case].append(float(answer[1]))
            print(f"round {round_ + 1}/{args.warmup + args.rounds} done, load {loads[-1]:.2f}", file=sys.stderr)
    finally:
        for process in workers.values():
            process.stdin.close()
            process.wait()

    results = {"load_average_1min": spread(loads), "errors": errors, "step": {}, "padding": {}}
    for kind in workers:
        per_variant = {}
        for (variant, length), timed in times[kind].items():
            if not timed:
                continue
            reference = times[kind][(BASELINE, length)]
            ratios = [r / t for t, r in zip(timed, reference, strict=True)]  # speed-up over fp32 at --threads
            per_variant[f"{variant} @ {length}"] = {"step_time_s": spread(timed), "speedup": spread(ratios)}
        results["step"][kind] = per_variant
    lengths = sst2_lengths(args.train_samples, args.max_length)
    results["padding"]["sst2_token_lengths"] = spread(lengths) | {"mean": statistics.mean(lengths)}
    for batching in ("max_length", "dynamic", "length_grouped"):
        padded = [
            length
            for seed in range(3)
            for length in padded_lengths(lengths, args.batch_size, args.max_length, batching, seed)
        ]
        entry = {"mean_padded_length": statistics.mean(padded)}
        for kind in workers:
            for variant in ("fp32", "bf16"):
                step = {length: statistics.median(times[kind][(variant, length)]) for length in args.lengths}
                entry[f"{kind} {variant} epoch_seconds"] = sum(interpolate(step, length) for length in padded) / 3
        results["padding"][batching] = entry
    for batching in ("max_length", "length_grouped"):
        entry = results["padding"][batching]
        for key in [k for k in entry if k.endswith("epoch_seconds")]:
            entry[key.replace("epoch_seconds", "speedup_over_dynamic")] = (
                results["padding"]["dynamic"][key] / entry[key]
            )
    record = write_record(args.output, settings, results)
    for kind, per_variant in record["results"]["step"].items():
        for name, entry in per_variant.items():
            print(f"{kind:8s} {name:28s} {entry['step_time_s']['median']:.3f} s  x{entry['speedup']['median']:.2f}")
    print(json.dumps(record["results"]["padding"], indent=1))
    print("errors:", errors)


if __name__ == "__main__":
    main()
