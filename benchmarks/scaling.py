"""How the training-step cost of diff pruning against full fine-tuning grows with model size and sequence length (CPU).

Runs train_step.py's interleaved measurement of full fine-tuning, the gated stage (plain and structured) and the
fixed-mask stage for each case below, then writes all results to one JSON file and plots the ratios. Model size:
tiny, MiniLM and BERT-base size at 128 tokens, batch 8 (so that BERT-base fits the time); sequence length: MiniLM at
64, 128 and 256 tokens, batch 32 (the training-step table's batch).

    python benchmarks/scaling.py --output benchmarks/results/scaling.json --plot docs/images/scaling.png
"""

from __future__ import annotations

import argparse

import torch
from _record import write_record
from train_step import load_base, measure


METHODS = ["full", "diff_pruning", "diff_pruning_structured", "fixmask"]
#: (sweep, model, batch size, tokens per sequence, rounds): tiny's steps are ~20x shorter, so it gets more rounds.
CASES = (
    ("model size", "tiny", 8, 128, 32),
    ("model size", "minilm", 8, 128, 6),
    ("model size", "bert-base", 8, 128, 6),
    ("sequence length", "minilm", 32, 64, 6),
    ("sequence length", "minilm", 32, 128, 6),
    ("sequence length", "minilm", 32, 256, 6),
)
LABELS = {
    "diff_pruning": "gated",
    "diff_pruning_structured": "gated, structured",
    "fixmask": "fixed mask (0.5% kept)",
}


def plot(cases: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for column, (sweep, x_key, x_label) in enumerate(
        (
            ("model size", "parameters", "parameters (tiny, MiniLM, BERT-base; batch 8 x 128)"),
            ("sequence length", "seq_len", "tokens per sequence (MiniLM, batch 32)"),
        )
    ):
        rows = [case for case in cases if case["sweep"] == sweep]
        for row, (ratio, title, targets) in enumerate(
            (
                ("time_ratio", "step time / full FT", (1.10, 0.95)),
                ("peak_rss_ratio", "peak RSS / full FT", (1.25, 0.95)),
            )
        ):
            ax = axes[row][column]
            for method, label in LABELS.items():
                ax.plot([c[x_key] for c in rows], [c["results"][method][ratio] for c in rows], "o-", label=label)
            for target in targets:
                ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=10 if x_key == "parameters" else 2)
            ax.set_xticks([c[x_key] for c in rows])
            ax.set_xticklabels([f"{c[x_key] / 1e6:.1f}M" if x_key == "parameters" else str(c[x_key]) for c in rows])
            ax.minorticks_off()
            ax.set_xlabel(x_label)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    figure.suptitle("Diff pruning training step against full fine-tuning (dashed: targets 1.10, 1.25 and 0.95)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/scaling.json")
    parser.add_argument("--plot", default="docs/images/scaling.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = []
    for sweep, model, batch_size, seq_len, rounds in CASES:
        settings = {"model": model, "batch_size": batch_size, "seq_len": seq_len, "threads": args.threads}
        parameters = sum(p.numel() for p in load_base(model).parameters())
        print(f"{sweep}: {settings}, {parameters:,} parameters", flush=True)
        results = measure(METHODS, settings, rounds, args.warmup)
        cases.append({"sweep": sweep, **settings, "rounds": rounds, "parameters": parameters, "results": results})
    write_record(args.output, {"warmup": args.warmup, "threads": args.threads}, {"cases": cases})
    plot(cases, args.plot)


if __name__ == "__main__":
    main()
