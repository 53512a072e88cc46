"""The pieces of the diff pruning recipe every training loop uses: optimizer groups, learning-rate schedule,
per-group gradient clipping and the loss terms logged apart.

The recipe (Guo, Rush and Kim, 2021): stage 1 ("gated") trains the dense diffs `w` and the gate logits `alpha` with
the task loss plus `l0_lambda * E[L0]`; AdamW with a linearly decaying learning rate for `w` and a constant one for
`alpha`, gradients clipped per group. Projection keeps `target_sparsity` of the parameters. Stage 2 ("fixmask")
trains the kept entries with the mask fixed. `examples/glue.py` (an Accelerate loop), [`DiffPruningTrainer`] and
[`DiffPruningSFTTrainer`] all build their stages from these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..diff_pruning.model import get_tuner
from ..diff_pruning.sparse import base_parameter_count
from .optim import OptimizerInBackward, fused_adamw_supported, unwrap_optimizer


#: The stages of diff pruning, in order.
STAGES = ("gated", "fixmask")


@dataclass
class DiffPruningSchedule:
    """What the recipe adds to a training loop's own settings (epochs, learning rate, batch size).

    Args:
        alpha_learning_rate: Constant learning rate of the gate logits (the paper's 0.1).
        fixmask_learning_rate: Peak learning rate of stage 2, decaying linearly; `None` takes the loop's own.
        fixmask_epochs: Epochs of stage 2 (the paper: 3, or 5 on MRPC, STS-B and RTE).
        fixmask_max_steps: If positive, the optimizer steps of stage 2 (overrides `fixmask_epochs`).
        target_sparsity: Fraction of the parameters projection keeps; `None` takes the adapter config's.
        optimizer_in_backward: Update each parameter in backward and free its gradient there
            ([`OptimizerInBackward`]): less peak memory, but no gradient clipping (`max_grad_norm=0`) and no
            gradient accumulation.
    """

    alpha_learning_rate: float = 0.1
    fixmask_learning_rate: float | None = None
    fixmask_epochs: float = 1.0
    fixmask_max_steps: int = -1
    target_sparsity: float | None = None
    optimizer_in_backward: bool = False

    def __post_init__(self):
        if not self.alpha_learning_rate > 0:
            raise ValueError(f"alpha_learning_rate must be positive, got {self.alpha_learning_rate} (the paper: 0.1).")
        if self.fixmask_learning_rate is not None and not self.fixmask_learning_rate > 0:
            raise ValueError(f"fixmask_learning_rate must be positive or None, got {self.fixmask_learning_rate}.")
        if self.fixmask_epochs < 0:
            raise ValueError(f"fixmask_epochs must be >= 0, got {self.fixmask_epochs}.")
        if self.target_sparsity is not None and not 0 < self.target_sparsity <= 1:
            raise ValueError(f"target_sparsity must be in (0, 1], got {self.target_sparsity} (0.005 keeps 0.5%).")


def param_groups(
    model: nn.Module, lr: float, alpha_lr: float = 0.1, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: diffs (and trainable task heads) at `lr`, gate logits at `alpha_lr`.

    The paper trains `w` with lr 1e-5 and the gate logits `alpha` with lr 0.1; gate logits get no weight decay.
    Each group carries a `"name"` (`"diff"` or `"alpha"`) so schedules and gradient clipping can treat them apart,
    and `"fused": True` where torch's fused optimizer kernels can step its parameters ([`fused_adamw_supported`]):
    `torch.optim.AdamW(param_groups(...))` then runs fused AdamW, on CPU several times faster than its default for
    the gated stage's doubled parameters (a group's key wins over the optimizer's `fused=` argument: set the key to
    False to opt out).
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
    if fused_adamw_supported(groups):
        for group in groups:
            group["fused"] = True
    return groups


def linear_schedule(num_warmup_steps: int, num_training_steps: int):
    """Linear warmup then linear decay to 0, as a `LambdaLR` factor of the step."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))

    return factor


def stage_scheduler(
    optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule: the group named `"alpha"` (gate logits) stays constant, every other group warms up
    linearly over `num_warmup_steps` and decays linearly to 0 at `num_training_steps`."""
    decay = linear_schedule(num_warmup_steps, num_training_steps)
    factors = [(lambda step: 1.0) if group.get("name") == "alpha" else decay for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def clip_grad_norm_per_group(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the gradients of each parameter group to `max_norm` on its own, as the paper clips `w` and `alpha`.

    A global norm would let the gate logits' gradients, which the penalty makes large, shrink the diffs' steps.
    Returns the norm of all gradients before clipping (what `Trainer` logs as `grad_norm`). An
    [`OptimizerInBackward`] is refused: it has applied and freed the gradients by the time a group's norm exists.
    """
    if isinstance(unwrap_optimizer(optimizer), OptimizerInBackward):
        raise ValueError(
            "Per-group gradient clipping needs every gradient of a group at once, but OptimizerInBackward has "
            "applied and freed each one during backward: train without clipping (max_grad_norm=0), or use an "
            "ordinary optimizer."
        )
    norms = [
        torch.nn.utils.clip_grad_norm_(group["params"], max_norm)
        for group in optimizer.param_groups
        if group["params"]
    ]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([norm.float().to(norms[0].device) for norm in norms]))


class LossTerms:
    """The two terms of the gated stage's loss, apart: the task loss and the L0 term, plus the expected density.

    In training mode a diff pruning model returns `task loss + l0_lambda * E[L0]`; at the paper's settings the L0
    term of a 22.7M-parameter model is about 226 against a task loss of 0.7, so a logged sum hides the task. This
    hook, registered before the tuner's own, records the loss the base model returned (the task loss, exactly);
    `measure()` adds the L0 term and `E[L0] / N` under `no_grad`. Use as a context manager, or call `remove()`.
    """

    def __init__(self, model: nn.Module):
        self.tuner = get_tuner(model)
        self.task_loss: torch.Tensor | None = None
        self._handle = self.tuner.model.register_forward_hook(self._record, prepend=True, with_kwargs=True)

    def _record(self, module: nn.Module, args: Any, kwargs: dict, outputs: Any) -> None:
        loss = outputs[0] if isinstance(outputs, tuple) and kwargs.get("labels") is not None else None
        loss = getattr(outputs, "loss", loss)
        if isinstance(loss, torch.Tensor) and loss.dim() == 0:
            self.task_loss = loss.detach().float()

    def gated(self) -> bool:
        """Whether the active adapter is still in the gated stage (it has no kept pattern yet)."""
        return not self.tuner.peft_config[self.tuner.active_adapters[0]].kept_pattern

    @torch.no_grad()
    def measure(self) -> dict[str, torch.Tensor]:
        """`task_loss` of the last forward, and in the gated stage `l0_term` and `expected_density` (0-d tensors)."""
        terms = {}
        if self.task_loss is not None:
            terms["task_loss"] = self.task_loss
        if self.gated():
            # the term the last forward added (computed there by the gates' own nodes), else computed now
            l0_term = self.tuner.last_l0_penalty()
            terms["l0_term"] = (self.tuner.l0_penalty() if l0_term is None else l0_term).float()
            terms["expected_density"] = self.tuner.expected_l0() / base_parameter_count(self.tuner)
        return terms

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> LossTerms:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
