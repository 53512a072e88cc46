"""Helpers for training loops: the L0 penalty of a whole model and the optimizer parameter groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model import DiffPruningModel


def get_tuner(model: nn.Module) -> DiffPruningModel:
    """The `DiffPruningModel` inside a `PeftModel` (or the tuner itself); a clear error for anything else."""
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, DiffPruningModel):
            return candidate
    raise TypeError(
        f"Expected a model adapted with DiffPruningConfig (a PeftModel from get_peft_model), got "
        f"{type(model).__name__}. Wrap it first: get_peft_model(model, DiffPruningConfig(...))."
    )


def expected_l0(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """Expected number of non-zero diff entries of the (active) adapter: a differentiable fp32 scalar."""
    return get_tuner(model).expected_l0(adapter_name)


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
