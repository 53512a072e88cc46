"""PNG plots of a diff pruning run: training curves and the density of the diff per layer and module type.

matplotlib is an optional dependency (`pip install peft_diffprune[examples]`); it is imported inside each function,
with the non-interactive Agg backend, so that importing this module costs nothing and needs no display.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from ..diff_pruning.sparse import SparsityReport


#: `<prefix>.<layer container>.<index>.<module path>.<parameter>`, e.g. `bert.encoder.layer.3.attention.self.query.weight`.
_LAYER_PATTERN = re.compile(r"^(?:.*\.)?(?:layer|layers|h|block|blocks)\.(\d+)\.(.+)\.[^.]+$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: Sequence[Mapping], path: str | os.PathLike, target_sparsity: float | None = None):
    """Task loss and density of the diff against the optimizer step, with the stages marked.

    Args:
        history: one record per optimizer step with `step` (counted across stages), `stage` and `task_loss`, and
            `expected_density` (expected L0 over the parameter count) for the gated stage or `density` for stages
            with a fixed mask.
        path: the PNG file to write.
        target_sparsity: drawn as a horizontal line on the density panel if given.
    """
    import numpy as np

    plt = _pyplot()
    stages = list(dict.fromkeys(record["stage"] for record in history))
    fig, (loss_ax, density_ax) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for stage in stages:
        records = [r for r in history if r["stage"] == stage]
        steps = [r["step"] for r in records]
        losses = np.array([r["task_loss"] for r in records])
        line = loss_ax.plot(steps, losses, linewidth=0.8, alpha=0.35)[0]
        # a running mean over about 2% of the steps shows the trend through the per-batch noise
        window = max(1, len(losses) // 50)
        smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_ax.plot(steps[window - 1 :], smoothed, color=line.get_color(), label=stage, linewidth=1.5)
        key = "expected_density" if "expected_density" in records[0] else "density"
        if key in records[0]:
            density_ax.plot(steps, [r[key] for r in records], label=f"{stage} ({key.replace('_', ' ')})")
    for stage in stages[1:]:
        start = min(r["step"] for r in history if r["stage"] == stage)
        for ax in (loss_ax, density_ax):
            ax.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
    if target_sparsity is not None:
        density_ax.axhline(target_sparsity, color="black", linestyle="--", linewidth=1, label="target sparsity")
    loss_ax.set_ylabel("task loss")
    loss_ax.legend()
    density_ax.set_ylabel("density of the diff")
    density_ax.set_yscale("log")
    density_ax.set_xlabel("optimizer step")
    if density_ax.lines:
        density_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_density_table(report: SparsityReport) -> tuple[list[int], list[str], dict[tuple[int, str], float], dict]:
    """Density (non-zero diff entries over parameters, weight and bias together) per `(layer, module type)`.

    Returns the layer indices, the module types in model order, the density of each cell, and the density of every
    module outside the numbered layers (embeddings, pooler, ...) by name.
    """
    cells: dict[tuple[int, str], list[int]] = {}
    outside: dict[str, list[int]] = {}
    for tensor in report.tensors:
        match = _LAYER_PATTERN.match(tensor.name)
        if match:
            counts = cells.setdefault((int(match.group(1)), match.group(2)), [0, 0])
        else:
            counts = outside.setdefault(tensor.name.rsplit(".", 1)[0], [0, 0])
        counts[0] += tensor.nonzero
        counts[1] += tensor.parameters
    layers = sorted({layer for layer, _ in cells})
    modules = list(dict.fromkeys(module for _, module in cells))
    density = {key: nonzero / parameters for key, (nonzero, parameters) in cells.items()}
    return layers, modules, density, {name: nonzero / params for name, (nonzero, params) in outside.items()}


def plot_layer_density(reports: Mapping[str, SparsityReport], path: str | os.PathLike) -> None:
    """Heatmaps of the diff's density, transformer layers (rows) by module type (columns), one panel per report.

    Modules outside the numbered layers (embeddings, pooler) are shown in a strip under each heatmap. Cells are
    annotated with the density in percent. Each panel has its own color scale.
    """
    import numpy as np

    plt = _pyplot()
    tables = {title: layer_density_table(report) for title, report in reports.items()}
    width = max(max(len(modules), len(outside)) for _, modules, _, outside in tables.values())
    height = max(len(layers) for layers, *_ in tables.values())
    fig, axes = plt.subplots(
        2,
        len(tables),
        figsize=(2.0 + (1.5 + 0.7 * width) * len(tables), 4.5 + 0.45 * height),
        gridspec_kw={"height_ratios": [max(height, 1), 1]},
        squeeze=False,
        layout="constrained",
    )
    for column, (title, (layers, modules, density, outside)) in enumerate(tables.items()):
        grid = np.full((len(layers), len(modules)), np.nan)
        for (layer, module), value in density.items():
            grid[layers.index(layer), modules.index(module)] = value
        strip = np.array([list(outside.values())]) if outside else np.full((1, 1), np.nan)
        vmax = max(np.nanmax(grid, initial=0.0), np.nanmax(strip, initial=0.0)) * 100 or 1.0
        for ax, values, xlabels, ylabels in (
            (axes[0, column], grid, modules, [f"layer {layer}" for layer in layers]),
            (axes[1, column], strip, list(outside), [""]),
        ):
            image = ax.imshow(values * 100, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
            for (row, col), value in np.ndenumerate(values):
                if not np.isnan(value):
                    ax.text(col, row, f"{value * 100:.3g}", ha="center", va="center", fontsize=7, color="white")
        axes[0, column].set_title(title)
        fig.colorbar(image, ax=axes[:, column].tolist(), label="density (%)", shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
