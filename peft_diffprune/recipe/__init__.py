"""The three-stage recipe around the methods: the stage schedule, optimizer groups, the Trainer integration, and the
GLUE data and plots of the example. It imports the methods; the methods never import it."""

from .optim import fused_adamw_supported
from .trainer import DiffPruningTrainer, DiffPruningTrainerMixin, checkpoint_stage
from .training import (
    DiffPruningSchedule,
    LossTerms,
    clip_grad_norm_per_group,
    param_groups,
    stage_scheduler,
)


def __getattr__(name: str):
    # TRL is optional: import it only when its trainer is asked for
    if name == "DiffPruningSFTTrainer":
        from .sft import DiffPruningSFTTrainer

        return DiffPruningSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DiffPruningSFTTrainer",
    "DiffPruningSchedule",
    "DiffPruningTrainer",
    "DiffPruningTrainerMixin",
    "LossTerms",
    "checkpoint_stage",
    "clip_grad_norm_per_group",
    "fused_adamw_supported",
    "param_groups",
    "stage_scheduler",
]
