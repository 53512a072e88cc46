"""The optimizer step inside backward: each parameter is updated, and its gradient freed, as soon as backward has
accumulated it (PyTorch's "optimizer in backward" pattern, through `Tensor.register_post_accumulate_grad_hook`).

The gated stage trains a dense diff `w` and a gate logit `alpha` per base parameter: with fp32 state their gradients
are 8 bytes per parameter, which with an ordinary optimizer all exist at once between backward and `step()`. Here
at most the gradients of the tensors backward is still combining exist at once.

What this changes in the recipe:
- gradient clipping: by the time a norm over a group could be taken, the group's other tensors are already updated,
  so per-group clipping ([`clip_grad_norm_per_group`]) refuses an [`OptimizerInBackward`]; train without clipping
  (`max_grad_norm=0`).
- gradient accumulation: every backward is an optimizer step, so a second backward before `step()` raises.
- data parallelism: DDP averages gradients across processes after they are accumulated, so a step in the hook would
  use the local gradient; a process group of more than one process is refused.
"""

from __future__ import annotations

from typing import Any

import torch


def fused_adamw_supported(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW (`fused=True`) can step every parameter of `groups`: plain tensors on CPU or CUDA
    (not the DTensors of FSDP2). On CPU it is several times faster than AdamW's default implementation, a cost the
    gated stage, with a diff and a gate logit per parameter, pays twice."""
    params = [param for group in groups for param in group["params"]]
    return all(
        type(param) in (torch.Tensor, torch.nn.Parameter) and param.device.type in ("cpu", "cuda") for param in params
    )


class OptimizerInBackward(torch.optim.Optimizer):
    """An optimizer whose update runs in backward, one parameter at a time, with the surface of an ordinary one.

    It holds the parameter groups (so `LambdaLR` / [`stage_scheduler`] set each group's learning rate) and the
    state (so `state_dict()` / `load_state_dict()` and Accelerate's `save_state` work as for `optimizer_class`, and a
    checkpoint holds the same tensors); one `optimizer_class` instance per parameter, sharing that state, does the
    update when the parameter's gradient is ready, with its group's current hyperparameters, then sets the gradient to
    `None`. `step()` only closes the optimizer step (the updates have happened); call it once per backward, then step
    the scheduler, as with any optimizer.

    Args:
        params: Parameters or parameter groups, as for any optimizer (e.g. [`param_groups`]).
        optimizer_class: The per-parameter optimizer (default `torch.optim.AdamW`).
        **defaults: Its keyword arguments (`lr`, `betas`, `fused`, ...).
    """

    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, **defaults: Any):
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError(
                "OptimizerInBackward steps each parameter when its local gradient is accumulated, before data "
                "parallelism averages it across processes: use an ordinary optimizer with more than one process."
            )
        # the groups get optimizer_class's own defaults (betas, eps, foreach, ...), filled in as it would
        super().__init__(params, optimizer_class([torch.zeros(1, requires_grad=True)], **defaults).defaults)
        self._steppers: dict[torch.Tensor, tuple[torch.optim.Optimizer, int]] = {}
        self._handles = []
        self._stepped: set[torch.Tensor] = set()
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                stepper = optimizer_class([{**group, "params": [param]}])
                stepper.state = self.state
                self._steppers[param] = (stepper, index)
                self._handles.append(param.register_post_accumulate_grad_hook(self._step_parameter))

    @torch.no_grad()
    def _step_parameter(self, param: torch.Tensor) -> None:
        if param in self._stepped:
            raise RuntimeError(
                "OptimizerInBackward: a second backward before optimizer.step(). Each backward is an optimizer step "
                "here, so gradient accumulation is not possible: use gradient_accumulation_steps=1 (a larger batch), "
                "or an ordinary optimizer."
            )
        stepper, index = self._steppers[param]
        hyperparameters = {key: value for key, value in self.param_groups[index].items() if key != "params"}
        stepper.param_groups[0].update(hyperparameters)
        stepper.step()
        param.grad = None
        self._stepped.add(param)

    @torch.no_grad()
    def step(self, closure=None):
        """End the optimizer step: each parameter was updated in backward. A closure is refused (it would run a
        backward, and so a step, of its own)."""
        if closure is not None:
            raise ValueError("OptimizerInBackward.step takes no closure: the update runs in backward.")
        self._stepped.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict installs a new state dict: share it with the per-parameter optimizers again
        for stepper, _ in self._steppers.values():
            stepper.state = self.state

    def remove_hooks(self) -> None:
        """Detach the updates from the parameters (before training them with another optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Accelerate's `AcceleratedOptimizer` (or `optimizer` itself)."""
    return getattr(optimizer, "optimizer", optimizer)
