"""Peak memory and step time of the gated stage against fp32 full fine-tuning, per configuration: fp32 or bf16 base
and adapter state, AdamW run as usual or in backward (recipe/optim.py), and the fixed-mask stage.

Every configuration runs in a fresh worker process of train_step.py (its peak RSS, counted over training only, is
its own), one process at a time, in interleaved rounds (A B C ... A B C ...): a ratio is the median over rounds of
the per-round ratio to full fine-tuning. Bytes per parameter divide the peak RSS by the base model's parameter count.
The machine is shared: the load average is recorded with every measurement.

    python benchmarks/memory.py --output benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from _record import write_record
from train_step import Worker, load_base


#: name: (train_step method, dtype, optimizer of the `--adamw` choice, in-backward or not)
CONFIGS = {
    "full": ("full", "fp32", False),
    "gated": ("diff_pruning", "fp32", False),
    "gated_in_backward": ("diff_pruning", "fp32", True),
    "gated_bf16": ("diff_pruning", "bf16", False),
    "gated_bf16_in_backward": ("diff_pruning", "bf16", True),
    "fixmask": ("fixmask", "fp32", False),
}
#: (model, batch size, tokens, configurations): BERT-base's steps take seconds and ~6 GB, so it runs few steps.
CASES = {
    "tiny": ("tiny", 8, 128, list(CONFIGS)),
    "bert-base": ("bert-base", 8, 128, list(CONFIGS)),
    "minilm": ("minilm", 32, 128, ["full", "gated", "gated_in_backward"]),
}


def optimizer_name(adamw: str, in_backward: bool) -> str:
    """train_step.py's optimizer name: `adamw` ("default" or "fused"), in backward or not."""
    if in_backward:
        return "in_backward" if adamw == "default" else "in_backward_fused"
    return adamw


def run_once(config: str, settings: dict, adamw: str, steps: int, warmup: int) -> dict:
    """One fresh worker of `config`: its step times after warm-up, peak RSS and the load average around it."""
    method, dtype, in_backward = CONFIGS[config]
    load_before = os.getloadavg()[0]
    worker = Worker(method, {**settings, "dtype": dtype, "optimizer": optimizer_name(adamw, in_backward)})
    try:
        times = [worker.ask("step")["step_time_s"] for _ in range(warmup + steps)][warmup:]
        peaks = worker.close()
    finally:
        worker.process.kill()
    return {"step_times_s": times, **worker.ready, **peaks, "load_average": [load_before, os.getloadavg()[0]]}


def spread(values: list[float]) -> list[float]:
    return [min(values), max(values)]


def measure_case(model: str, batch_size: int, seq_len: int, configs: list[str], args, save) -> dict:
    """Interleaved rounds of `configs` on `model`; `save(partial)` is called after every worker, so that a run
    stopped early keeps what it measured."""
    settings = {"model": model, "batch_size": batch_size, "seq_len": seq_len, "threads": args.threads}
    parameters = sum(p.numel() for p in load_base(model).parameters())
    runs = {config: [] for config in configs}
    for round_index in range(args.rounds):
        for config in configs:
            runs[config].append(run_once(config, settings, args.adamw, args.steps, args.warmup))
            save({**settings, "parameters": parameters, "unfinished_runs": runs})
            last = runs[config][-1]
            print(
                f"{model} round {round_index} {config:24s} {statistics.median(last['step_times_s']):7.2f} s/step  "
                f"peak {last['peak_rss_mib']:7.0f} MiB  load {last['load_average'][1]:.1f}",
                flush=True,
            )
    results = {}
    full = runs["full"]
    for config in configs:
        rounds = runs[config]
        peaks = [r["peak_rss_mib"] for r in rounds]
        peak_ratios = [r["peak_rss_mib"] / f["peak_rss_mib"] for r, f in zip(rounds, full, strict=True)]
        time_ratios = [
            statistics.median(r["step_times_s"]) / statistics.median(f["step_times_s"])
            for r, f in zip(rounds, full, strict=True)
        ]
        results[config] = {
            "method": CONFIGS[config][0],
            "dtype": CONFIGS[config][1],
            "optimizer": optimizer_name(args.adamw, CONFIGS[config][2]),
            "peak_rss_mib": statistics.median(peaks),
            "peak_rss_mib_spread": spread(peaks),
            "bytes_per_parameter": statistics.median(peaks) * 2**20 / parameters,
            "peak_over_loaded_bytes_per_parameter": statistics.median(r["peak_over_loaded_mib"] for r in rounds)
            * 2**20
            / parameters,
            "peak_rss_ratio": statistics.median(peak_ratios),
            "peak_rss_ratios": peak_ratios,
            "step_time_s": statistics.median(t for r in rounds for t in r["step_times_s"]),
            "time_ratio": statistics.median(time_ratios),
            "time_ratios": time_ratios,
            "runs": rounds,
        }
        print(
            f"{model} {config:24s} peak x{results[config]['peak_rss_ratio']:.3f} "
            f"({results[config]['bytes_per_parameter']:.1f} B/param)  time x{results[config]['time_ratio']:.3f}",
            flush=True,
        )
    return {**settings, "parameters": parameters, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=["bert-base", "minilm"])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, help="run only these (full is always run)")
    parser.add_argument("--adamw", choices=("default", "fused"), default="default", help="torch's AdamW, or fused")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per worker, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("adamw", "rounds", "steps", "warmup", "threads")}
    cases = []
    for name in args.cases:
        model, batch_size, seq_len, configs = CASES[name]
        if args.configs:
            configs = ["full", *[c for c in configs if c in args.configs and c != "full"]]
        save = lambda partial: write_record(args.output, settings, {"cases": [*cases, partial]})  # noqa: E731
        cases.append(measure_case(model, batch_size, seq_len, configs, args, save))
    write_record(args.output, settings, {"cases": cases})


if __name__ == "__main__":
    main()
