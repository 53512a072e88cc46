"""What a run of the recipe leaves behind: sparsity reports as JSON, and the closing table of `results.json` rows."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..diff_pruning.sparse import SparsityReport, TensorSparsity


def report_to_json(report: SparsityReport) -> dict:
    return {"total_parameters": report.total_parameters, "tensors": [vars(t) for t in report.tensors]}


def report_from_json(saved: Mapping) -> SparsityReport:
    return SparsityReport("default", saved["total_parameters"], [TensorSparsity(**t) for t in saved["tensors"]])


def load_results(path: str | os.PathLike) -> dict:
    """A `results.json` written by `examples/glue.py`, or a clear error for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path}: not a readable results.json ({error}); pass one written by examples/glue.py."
        ) from None
    missing = [key for key in ("method", "main_metric", "metrics", "adapter_bytes") if key not in results]
    if missing:
        raise ValueError(f"{path} lacks {missing}: pass a results.json written by examples/glue.py.")
    return results


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def results_table(rows: Sequence[Mapping], split: str = "validation") -> str:
    """The closing table: method, the task's main metric on `split`, kept entries, stored bytes and wall time.

    `rows` are `results.json` dictionaries; a row with `"label"` is shown under that name (e.g. a reference run).
    Methods without a projected diff show their trainable parameters as the kept entries.
    """
    metric = rows[0]["main_metric"]
    header = ("method", f"dev {metric}", "kept entries", "adapter bytes", "wall time")
    lines = []
    for row in rows:
        method = row.get("label") or row["method"] + (" (structured)" if row.get("structured") else "")
        kept = row.get("kept", row.get("trainable_parameters"))
        value = row["metrics"][split][row["main_metric"]]
        lines.append(
            (
                method,
                f"{value:.4f}",
                "" if kept is None else f"{kept:,}",
                f"{row['adapter_bytes']:,}",
                _duration(row.get("total_wall_seconds", 0)),
            )
        )
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in [header, *lines]
    )
