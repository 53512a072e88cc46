"""Optimizer parameter groups of the diff pruning recipe: diffs and gate logits apart."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..diff_pruning.model import get_tuner


def param_groups(
    model: nn.Module, lr: float, alpha_lr: float = 0.1, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: diffs (and trainable task heads) at `lr`, gate logits at `alpha_lr`.

    The paper trains `w` with lr 1e-5 and the gate logits `alpha` with lr 0.1; gate logits get no weight decay.
    Each group carries a `"name"` (`"diff"` or `"alpha"`) so schedules and gradient clipping can treat them apart.
    """
    get_tuner(model)
    diffs, alphas = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (alphas if name.endswith("_alpha") and ".diff_pruning_state." in name else diffs).append(param)
    groups = [{"name": "diff", "params": diffs, "lr": lr, "weight_decay": weight_decay}]
    if alphas:
        groups.append({"name": "alpha", "params": alphas, "lr": alpha_lr, "weight_decay": 0.0})
    return groups
