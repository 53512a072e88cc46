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


def layer_density_table(
    report: SparsityReport, grid: Sequence[SparsityReport] = ()
) -> tuple[list[int], list[str], dict[tuple[int, str], float], dict[str, float]]:
    """Density (non-zero diff entries over parameters, weight and bias together) per `(layer, module type)`.

    The rows (layer indices, in order) and columns (module types, in model order) are those of every report in
    `grid` and of `report`, so that tables of several reports of one model share a grid: pass the same `grid` for
    each. A tensor that a report lacks but another has (projection kept nothing of it) counts as 0 non-zero of its
    parameters. Returns the layers, the module types, the density of each cell, and the density of every module
    outside the numbered layers (embeddings, pooler, ...) by name, in model order.
    """
    parameters = {t.name: t.parameters for r in (*grid, report) for t in r.tensors}
    nonzero = {t.name: t.nonzero for t in report.tensors}
    cells: dict[tuple[int, str], list[int]] = {}
    outside: dict[str, list[int]] = {}
    for name, count in parameters.items():
        match = _LAYER_PATTERN.match(name)
        if match:
            counts = cells.setdefault((int(match.group(1)), match.group(2)), [0, 0])
        else:
            counts = outside.setdefault(name.rsplit(".", 1)[0], [0, 0])
        counts[0] += nonzero.get(name, 0)
        counts[1] += count
    layers = sorted({layer for layer, _ in cells})
    modules = list(dict.fromkeys(module for _, module in cells))
    density = {key: kept / params for key, (kept, params) in cells.items()}
    return layers, modules, density, {name: kept / params for name, (kept, params) in outside.items()}


def plot_layer_density(reports: Mapping[str, SparsityReport], path: str | os.PathLike) -> None:
    """Heatmaps of the diff's density, transformer layers (rows) by module type (columns), one panel per report.

    Every panel has the same rows and columns in the same order and one shared logarithmic colour scale (the gated
    stage and the projected adapter differ by orders of magnitude), so that cells can be compared across panels.
    Cells with nothing kept are drawn grey and marked 0; cells that do not exist (a module type missing from a
    layer) are left white. Modules outside the numbered layers (embeddings, pooler) are shown in a strip under each
    heatmap. Cells are annotated with the density in percent.
    """
    import numpy as np

    plt = _pyplot()  # first: it selects the Agg backend, and its errors are the ones worth reporting
    from matplotlib.colors import ListedColormap, LogNorm

    grid = list(reports.values())
    tables = {title: layer_density_table(report, grid) for title, report in reports.items()}
    layers, modules, _, outside = next(iter(tables.values()))
    values = [v for _, _, density, strip in tables.values() for v in (*density.values(), *strip.values()) if v > 0]
    norm = LogNorm(vmin=min(values, default=1e-4) * 100, vmax=max(values, default=1.0) * 100)
    if norm.vmin == norm.vmax:
        norm = LogNorm(vmin=norm.vmin / 10, vmax=norm.vmax)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    empty = ListedColormap(["#d9d9d9"])
    width = max(len(modules), len(outside), 1)
    fig, axes = plt.subplots(
        2,
        len(tables),
        figsize=(3.0 + (1.5 + 0.7 * width) * len(tables), 4.5 + 0.45 * len(layers)),
        gridspec_kw={"height_ratios": [max(len(layers), 1), 1]},
        squeeze=False,
        layout="constrained",
    )
    for column, (title, (_, _, density, strip_density)) in enumerate(tables.items()):
        cells = np.full((len(layers), len(modules)), np.nan)
        for (layer, module), value in density.items():
            cells[layers.index(layer), modules.index(module)] = value
        strip = np.array([list(strip_density.values())]) if outside else np.full((1, 1), np.nan)
        for ax, grid_values, xlabels, ylabels in (
            (axes[0, column], cells, modules, [f"layer {layer}" for layer in layers]),
            (axes[1, column], strip, list(outside), [""]),
        ):
            percent = grid_values * 100
            image = ax.imshow(np.ma.masked_where(~(percent > 0), percent), cmap=cmap, norm=norm, aspect="auto")
            ax.imshow(np.ma.masked_where(percent != 0, percent), cmap=empty, aspect="auto")
            ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
            for (row, col), value in np.ndenumerate(percent):
                if not np.isnan(value):
                    color = "black" if value == 0 or norm(value) > 0.6 else "white"
                    ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=7, color=color)
        axes[0, column].set_title(title)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="density (%), one scale for every panel; grey: 0", shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
