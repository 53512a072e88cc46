"""The diff pruning recipe in TRL's `SFTTrainer` (needs `pip install trl`)."""

from __future__ import annotations


try:
    from trl import SFTTrainer
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "DiffPruningSFTTrainer needs TRL: `pip install trl` (or `pip install peft_diffprune[trl]`)."
    ) from error

from .trainer import DiffPruningTrainerMixin


class DiffPruningSFTTrainer(DiffPruningTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` running the whole diff pruning recipe: gated stage, projection, fixed-mask stage.

    Takes `SFTTrainer`'s arguments (`model` already wrapped with `get_peft_model(..., DiffPruningConfig(
    task_type="CAUSAL_LM"))`, no `peft_config`) plus `diff_pruning=DiffPruningSchedule(...)`; see
    [`DiffPruningTrainerMixin`] for what changes. TRL's fused LM head multiplies by `lm_head.weight` directly, so
    a diff on the LM head would never train: exclude it (`exclude_modules=["lm_head"]`); TRL refuses it otherwise.
    """

    # SFTTrainer's loss comes from the fused LM head's log-probabilities, not from the model's `outputs.loss`
    loss_is_model_loss = False
