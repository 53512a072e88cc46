"""The GLUE dev accuracy table and the accuracy-vs-storage plot, from benchmarks/results/glue_accuracy.jsonl.

    python benchmarks/report_accuracy.py

Scores are the task's main metric x 100 (MRPC F1, STS-B Spearman, RTE accuracy, CoLA MCC, SST-2 accuracy), as
mean ± half the range over the seeds run (`--spread std`: ± the sample standard deviation); "—" marks a run not
made. `--sweep` prints the learning-rate sweeps (glue_accuracy.py's SWEEP) of the budget instead, with the rate each
task picked; `--picked` gives each swept method one row, its records at the rate it picked on each task. A row's average is over all five tasks, so it
is only given for complete rows; the "common" average is over the tasks every row of the table has.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from glue_accuracy import BUDGETS, METHODS, RESULTS, SWEEP, SWEEP_SEED, TASKS, picked_rate


REPO_ROOT = Path(__file__).resolve().parents[1]
TASK_NAMES = {
    "mrpc": "MRPC (F1)",
    "stsb": "STS-B (Spearman)",
    "rte": "RTE (acc)",
    "cola": "CoLA (MCC)",
    "sst2": "SST-2 (acc)",
}
METHOD_NAMES = {
    "full": "full fine-tuning",
    "diff_pruning": "diff pruning 0.5%",
    "structured": "structured diff pruning 0.5%",
    "lora": "LoRA q,v r=12",
    "non_adaptive": "non-adaptive diff pruning 0.5%",
    "supertuning": "Super-Tuning",
    "bitfit": "BitFit",
    "prefix": "prefix tuning (16)",
    "parallel_adapter": "parallel adapter (FFN, r=16, s=2)",
    "mam": "MAM (prefix 16 + PA r=16)",
    "diff_pruning_attn": "diff pruning 0.5%, attention only",
    "diff_pruning_ffn": "diff pruning 0.5%, FFN only",
    "structured_0.001": "structured diff pruning 0.1%",
    "structured_0.0025": "structured diff pruning 0.25%",
    "structured_0.01": "structured diff pruning 1%",
    "diff_pruning_paper_lambda": "diff pruning 0.5%, paper's l0_lambda 1.25e-7",
    "structured_paper_lambda": "structured diff pruning 0.5%, paper's l0_lambda 1.25e-7 on every gate",
    "structured_0.001_paper_lambda": "structured diff pruning 0.1%, paper's l0_lambda",
    "structured_0.0025_paper_lambda": "structured diff pruning 0.25%, paper's l0_lambda",
    "structured_0.01_paper_lambda": "structured diff pruning 1%, paper's l0_lambda",
    "structured_lambda_1.25e-5": "structured diff pruning 0.5%, l0_lambda 1.25e-5 on every gate",
    "diff_pruning_attn_paper_lambda": "diff pruning 0.5%, attention only, paper's l0_lambda",
    "diff_pruning_ffn_paper_lambda": "diff pruning 0.5%, FFN only, paper's l0_lambda",
}


def method_name(method: str) -> str:
    """The row label of a method; a swept one (`<method>_lr<rate>`) is its method's label and the rate."""
    if method in METHOD_NAMES:
        return METHOD_NAMES[method]
    base, _, rate = method.rpartition("_lr")
    return f"{METHOD_NAMES[base]}, lr {rate}"


def load(path: Path, budget: str) -> dict[tuple[str, str], list[dict]]:
    """The records of `budget`, by (method, task)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["budget"] == budget:
            runs.setdefault((record["method"], record["task"]), []).append(record)
    return runs


def score(record: dict) -> float:
    return 100 * record["metrics"][record["main_metric"]]


def summarize(
    runs: dict[tuple[str, str], list[dict]], spread: str = "half_range"
) -> tuple[list[str], list[str], dict]:
    """Methods and tasks present (in priority order), and per (method, task) the mean and the spread of the scores
    (half their range, or with `spread="std"` their sample standard deviation)."""
    methods = [m for m in METHODS if any(method == m for method, _ in runs)]
    tasks = [t for t in TASKS if any(task == t for _, task in runs)]
    cells = {}
    for key, records in runs.items():
        scores = [score(r) for r in records]
        width = statistics.stdev(scores) if spread == "std" and len(scores) > 1 else (max(scores) - min(scores)) / 2
        cells[key] = (statistics.mean(scores), width, len(scores))
    return methods, tasks, cells


def table(runs: dict[tuple[str, str], list[dict]], budget_tasks: list[str], spread: str = "half_range") -> str:
    """The markdown table; a row's average over all of `budget_tasks` only when it has them all."""
    methods, tasks, cells = summarize(runs, spread)
    common = [t for t in tasks if all((m, t) in cells for m in methods)]
    header = [TASK_NAMES[t] for t in tasks]
    if len(budget_tasks) > 1:
        header += [f"avg (all {len(budget_tasks)})", f"avg ({', '.join(common) or 'none'})"]
    rows = [
        "| method | " + " | ".join(header) + " | trainable params | stored bytes |",
        "|---|" + "---|" * (len(header) + 2),
    ]
    for method in methods:
        row = []
        for task in tasks:
            if (method, task) not in cells:
                row.append("—")
                continue
            mean, width, n = cells[method, task]
            row.append(f"{mean:.1f} ± {width:.1f} ({n} seeds)" if n > 1 else f"{mean:.1f} (1 seed)")
        if len(budget_tasks) > 1:
            complete = all((method, t) in cells for t in budget_tasks)
            row.append(f"{statistics.mean(cells[method, t][0] for t in budget_tasks):.1f}" if complete else "—")
            row.append(f"{statistics.mean(cells[method, t][0] for t in common):.1f}" if common else "—")
        records = [r for (m, _), rs in runs.items() if m == method for r in rs]
        trainable = statistics.median(r["trainable_parameters"] for r in records)
        stored = statistics.median(r["stored_bytes"] for r in records)
        rows.append(f"| {method_name(method)} | " + " | ".join(row) + f" | {trainable:,.0f} | {stored:,.0f} |")
    return "\n".join(rows)


def plot(runs: dict[tuple[str, str], list[dict]], path: Path, title: str) -> None:
    """Score against the stored bytes of the task's weights: one panel per task (and one for the average over the
    tasks every method has, when there are several), one marker per method, the same across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, tasks, cells = summarize(runs)
    common = [t for t in tasks if all((m, t) in cells for m in methods)]
    panels = [*tasks, "average"] if len(tasks) > 1 and common else tasks
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows + 1.2), squeeze=False)
    markers = "osD^v<>pPX*h"
    for index, panel in enumerate(panels):
        ax = axes.flat[index]
        for number, method in enumerate(methods):
            records = [r for (m, t), rs in runs.items() if m == method and panel in (t, "average") for r in rs]
            if panel == "average":
                value = statistics.mean(cells[method, t][0] for t in common)
            elif (method, panel) in cells:
                value = cells[method, panel][0]
            else:
                continue
            stored = statistics.median(r["stored_bytes"] for r in records)
            style = {"marker": markers[number % len(markers)], "color": f"C{number % 10}"}
            ax.scatter(stored, value, label=method_name(method), **style)
        ax.set_xscale("log")
        ax.set_title(TASK_NAMES.get(panel, f"average ({', '.join(common)})"), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("stored bytes per task", fontsize=8)
        ax.set_ylabel("dev score x 100", fontsize=8)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        handles.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)})
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(3, len(handles)), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * -(-len(handles) // 3), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(path: Path, budget: str) -> str:
    """Per task and swept method: the score at each rate on the sweep's seed, and the rate picked (the best)."""
    runs = load(path, budget)
    width = max(len(rates) for rates in SWEEP.values())
    header = "| task | method | " + " | ".join(f"rate {i + 1}" for i in range(width)) + " | picked |"
    rows = [header, "|---" * (width + 3) + "|"]
    for task in TASKS:
        for method, rates in SWEEP.items():
            scores = {
                rate: score(r)
                for rate in rates
                for r in runs.get((f"{method}_lr{rate}", task), [])
                if r["seed"] == SWEEP_SEED
            }
            if not scores:
                continue
            cells = [f"{rate}: {scores[rate]:.1f}" if rate in scores else f"{rate}: —" for rate in rates]
            cells += [""] * (width - len(rates))
            picked = picked_rate(path, budget, task, method) or "— (incomplete)"
            rows.append(f"| {TASK_NAMES[task]} | {METHOD_NAMES[method]} | " + " | ".join(cells) + f" | {picked} |")
    return "\n".join(rows)


def at_picked_rates(path: Path, budget: str, runs: dict[tuple[str, str], list[dict]]) -> dict:
    """`runs` with each swept method's records replaced by those at the rate it picked on each task (under the
    method's own name), the other methods' records as they are; a task whose sweep is incomplete is left out."""
    picked = {}
    for (method, task), records in runs.items():
        base, _, rate = method.rpartition("_lr")
        if base in SWEEP:
            if rate == picked_rate(path, budget, task, base):
                picked[base, task] = records
        elif method not in SWEEP:
            picked[method, task] = records
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--budget", default="cpu")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=None, help="Rows to show (default: every method run)."
    )
    parser.add_argument("--spread", choices=["half_range", "std"], default="half_range")
    parser.add_argument("--sweep", action="store_true", help="Print the learning-rate sweeps of the budget.")
    parser.add_argument(
        "--picked",
        action="store_true",
        help="Rows of the swept methods at the rate each picked per task (all seeds there), not the plain methods.",
    )
    parser.add_argument("--plot", type=Path, default=REPO_ROOT / "docs" / "images" / "glue_accuracy_vs_bytes.png")
    args = parser.parse_args()
    if args.sweep:
        print(sweep_table(args.results, args.budget))
        return
    runs = load(args.results, args.budget)
    if args.picked:
        runs = at_picked_rates(args.results, args.budget, runs)
    if args.methods is not None:
        runs = {(method, task): records for (method, task), records in runs.items() if method in args.methods}
    print(table(runs, list(BUDGETS[args.budget]), args.spread))
    plot(runs, args.plot, f"Packaged MiniLM, GLUE dev, budget {args.budget!r}")
    print(f"\nPlot: {args.plot}")


if __name__ == "__main__":
    main()
