"""The diff pruning recipe in transformers' `Trainer`: both stages in one `train()`, projection in between.

A `Trainer` subclass, not a callback: projection replaces the trainable parameters (dense diffs and gate logits become
the kept values), so the stage switch needs a new optimizer, a new scheduler and a freshly wrapped model, which a
`TrainerCallback` cannot provide; and `save_model`, `resume_from_checkpoint` and the loss logged all change. TRL's
trainers extend `Trainer` the same way. The recipe lives in a mixin, so that it stacks on TRL's `SFTTrainer` too
([`DiffPruningSFTTrainer`]).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from peft import PeftModel
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..diff_pruning.checkpointing import checkpoint_layers
from ..diff_pruning.sparse import project_to_sparsity
from .optim import OptimizerInBackward, unwrap_optimizer
from .pool import PoolRegrowth, choose_pool
from .training import DiffPruningSchedule, LossTerms, clip_grad_norm_per_group, param_groups, stage_scheduler


#: Written into every checkpoint (and the final save) by the trainer: which stage the saved adapter is in.
STAGE_FILE = "diff_pruning_stage.json"


def checkpoint_stage(checkpoint: str | os.PathLike) -> str:
    """The stage (`"gated"` or `"fixmask"`) a checkpoint written by [`DiffPruningTrainer`] was taken in."""
    path = Path(checkpoint) / STAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no {STAGE_FILE}: resume from a checkpoint written by DiffPruningTrainer "
            "(<output_dir>/gated/checkpoint-N or <output_dir>/fixmask/checkpoint-N)."
        )
    return json.loads(path.read_text())["stage"]


class _StageStart(TrainerCallback):
    """Restarts the logged terms' step count where each `train()` call starts (0, or a resumed checkpoint's step)."""

    def __init__(self, trainer: DiffPruningTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._term_sums.clear()
        self.trainer._term_last.clear()
        self.trainer._terms_logged_at = state.global_step


class _PoolStep(TrainerCallback):
    """Regrows a candidate pool every `pool_regrow_steps` optimizer steps of the gated stage."""

    def __init__(self, trainer: DiffPruningTrainerMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.stage == "gated":
            self.trainer._pool.step(state.global_step, unwrap_optimizer(self.trainer.optimizer))


class DiffPruningTrainerMixin:
    """The recipe's overrides of `Trainer`; put it first among the bases: `class T(DiffPruningTrainerMixin, Trainer)`.

    - `train()` runs the gated stage for the `TrainingArguments`' epochs or `max_steps`, projects the diff to
      `target_sparsity` (a step or epoch boundary: the end of that stage), then the fixed-mask stage for
      `diff_pruning.fixmask_epochs` (or `fixmask_max_steps`). Checkpoints go to `<output_dir>/gated/checkpoint-N`
      and `<output_dir>/fixmask/checkpoint-N`, each with a `diff_pruning_stage.json`; one taken after projection
      holds the sparse adapter. `resume_from_checkpoint=True` resumes from the latest, in either stage.
    - The optimizer is AdamW over [`param_groups`] (fused where it can run): diffs at `learning_rate` with the
      `TrainingArguments`' linear decay and warmup, gate logits at the constant `diff_pruning.alpha_learning_rate`;
      `max_grad_norm` clips each group apart. `diff_pruning.optimizer_in_backward` runs AdamW in backward instead ([`OptimizerInBackward`]:
      less peak memory; needs `max_grad_norm=0` and no gradient accumulation).
    - The logs (and every `report_to` tracker) get `task_loss`, `l0_term` and `expected_density` beside `loss`
      (the objective, the L0 term included).
    - `save_model()` after `train()` writes the sparse adapter.
    - With `DiffPruningConfig(candidate_pool=...)` the gated stage first chooses its pool from the first
      `pool_score_batches` training batches and regrows it every `pool_regrow_steps` steps from the last ones.
    """

    #: Whether the loss `compute_loss` returns is the model's own `outputs.loss`, into which a diff pruning model's
    #: forward adds the L0 term (when labels reach the model). TRL's SFTTrainer computes its loss from the fused
    #: LM head's log-probabilities instead, and sets this to False: the recipe then adds the L0 term itself.
    loss_is_model_loss = True

    def __init__(self, *args, diff_pruning: DiffPruningSchedule | None = None, **kwargs):
        optimizers = kwargs.get("optimizers", (None, None))
        if any(part is not None for part in optimizers):
            raise ValueError(
                "DiffPruningTrainer builds the optimizer and scheduler of each stage itself (diffs and gate logits "
                "apart, a new optimizer after projection): drop `optimizers=` and set the learning rates through "
                "TrainingArguments.learning_rate and DiffPruningSchedule(alpha_learning_rate=...)."
            )
        super().__init__(*args, **kwargs)
        self.diff_pruning = diff_pruning or DiffPruningSchedule()
        if self.args.lr_scheduler_type != "linear":
            raise ValueError(
                f"lr_scheduler_type={self.args.lr_scheduler_type!r}: the diff pruning recipe decays the diffs' "
                "learning rate linearly and keeps the gate logits' constant; use lr_scheduler_type='linear'."
            )
        if self.diff_pruning.optimizer_in_backward and (
            self.args.max_grad_norm or self.args.gradient_accumulation_steps > 1
        ):
            raise ValueError(
                "DiffPruningSchedule(optimizer_in_backward=True) updates each parameter during backward: gradients "
                "cannot be clipped per group nor accumulated. Set TrainingArguments(max_grad_norm=0, "
                f"gradient_accumulation_steps=1) (got {self.args.max_grad_norm} and "
                f"{self.args.gradient_accumulation_steps})."
            )
        self._loss_terms = LossTerms(self.model)
        self.stage = "gated" if self._loss_terms.gated() else "fixmask"
        self._term_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._term_last: dict[str, torch.Tensor] = {}
        self._terms_logged_at = 0
        #: each stage's `TrainerState.log_history` (a stage's `train()` call starts a new `TrainerState`)
        self.stage_log_history: dict[str, list[dict]] = {}
        self.add_callback(_StageStart(self))
        self._pool = PoolRegrowth(self.model)
        self.add_callback(_PoolStep(self))

    # optimizer, schedule and clipping of the current stage

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            lr = self.args.learning_rate
            if self.stage == "fixmask" and self.diff_pruning.fixmask_learning_rate is not None:
                lr = self.diff_pruning.fixmask_learning_rate
            groups = param_groups(self.model, lr, self.diff_pruning.alpha_learning_rate, self.args.weight_decay)
            optimizer_class = OptimizerInBackward if self.diff_pruning.optimizer_in_backward else torch.optim.AdamW
            self.optimizer = optimizer_class(
                groups, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = stage_scheduler(optimizer or self.optimizer, warmup, num_training_steps)
        return self.lr_scheduler

    def _clip_grad_norm(self, model) -> torch.Tensor:
        self.accelerator.unscale_gradients()
        return clip_grad_norm_per_group(self.optimizer, self.args.max_grad_norm)

    # task loss and L0 term logged apart

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._loss_terms.task_loss = None
        if model.training:
            self._pool.record(inputs)
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        terms = self._loss_terms.measure()
        in_model_loss = terms.pop("task_loss", None)
        if not self.loss_is_model_loss:
            in_model_loss = None
        # Trainer sums the micro-batches' losses of a step when they are normalised over the whole step (by
        # `num_items_in_batch`), and divides each by the accumulation steps otherwise; with `average_tokens_across_
        # devices` it also multiplies them by the process count, which DDP's gradient average undoes.
        scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
        processes = self.accelerator.num_processes
        spread = processes if self.args.average_tokens_across_devices and num_items_in_batch is not None else 1
        if in_model_loss is not None:
            task_loss = in_model_loss * spread if scaled else in_model_loss / self.current_gradient_accumulation_steps
        else:
            # the loss was computed outside the model (TRL's fused LM head): the model's forward added no penalty
            task_loss = loss.detach().float() * (1 if scaled else 1 / self.current_gradient_accumulation_steps)
        if "l0_term" in terms:
            # the L0 term belongs once to each optimizer step: correct what the model's forward added
            wanted = spread / self.current_gradient_accumulation_steps if scaled else 1.0
            added = spread if (in_model_loss is not None and scaled) else (1.0 if in_model_loss is not None else 0.0)
            if wanted != added:
                loss = loss + (wanted - added) * self._loss_terms.tuner.l0_penalty().to(loss.device, loss.dtype)
        self._term_sums["task_loss"] += task_loss.to(self.args.device)
        self._term_last.update(terms)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether Trainer.training_step leaves this loss undivided by the accumulation steps (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and (self._term_sums or self._term_last):
            steps = max(1, self.state.global_step - self._terms_logged_at)
            for key, total in self._term_sums.items():
                logs[key] = self.accelerator.reduce(total, "mean").item() / steps
            logs.update({key: value.item() for key, value in self._term_last.items()})
            self._term_sums.clear()
            self._term_last.clear()
            self._terms_logged_at = self.state.global_step
        super().log(logs, start_time)

    # the two stages

    def _enable_checkpointing(self) -> None:
        """Turn on the activation checkpointing the training arguments ask for, as `Trainer.train` does, so that
        choosing a candidate pool checkpoints too (e.g. `activation_checkpointing_kwargs=selective_checkpointing()`)."""
        args = self.args
        enabled = getattr(args, "activation_checkpointing", None)
        kwargs = getattr(args, "activation_checkpointing_kwargs", None)
        if enabled is None:  # transformers before 5.24
            enabled, kwargs = args.gradient_checkpointing, args.gradient_checkpointing_kwargs
        if not enabled:
            return
        kwargs = dict(kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        checkpoint_layers(self.model, kwargs or None, every_n_layers, offload)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        root = self.args.output_dir
        checkpoint = self._find_checkpoint(root, resume_from_checkpoint)
        if checkpoint is not None:
            self.stage = checkpoint_stage(checkpoint)
            if self.stage == "fixmask" and self._loss_terms.gated():
                self._load_projected(checkpoint)
        saved = {name: getattr(self.args, name) for name in ("output_dir", "max_steps", "num_train_epochs")}
        output = None
        try:
            if self.stage == "gated":
                self.args.output_dir = os.path.join(root, "gated")
                # before the optimizer and the DDP wrapper are made: the pool's parameters are new
                self._enable_checkpointing()  # `Trainer.train` would turn it on only after the pool is chosen
                choose_pool(self.model, map(self._prepare_inputs, self.get_train_dataloader()))
                output = super().train(resume_from_checkpoint=checkpoint, **kwargs)
                self.stage_log_history["gated"] = self.state.log_history
                checkpoint = None
                self.project()
            if self.diff_pruning.fixmask_max_steps > 0 or self.diff_pruning.fixmask_epochs > 0:
                self.args.output_dir = os.path.join(root, "fixmask")
                self.args.max_steps = self.diff_pruning.fixmask_max_steps
                self.args.num_train_epochs = self.diff_pruning.fixmask_epochs
                output = super().train(resume_from_checkpoint=checkpoint, **kwargs)
                self.stage_log_history["fixmask"] = self.state.log_history
        finally:
            for name, value in saved.items():
                setattr(self.args, name, value)
        self._release_wrapper()
        return output

    def _release_wrapper(self) -> None:
        """Drop the last stage's DDP wrapper, which Trainer and Accelerate otherwise keep to the end of the process.

        It holds the process group: `destroy_process_group()` in the user's script then does not free gloo, whose
        threads can abort in the interpreter's teardown after a finished run (exit code 134). Evaluating, saving and
        training again after this work as before: Trainer wraps the model again where it needs to.
        """
        if self.model_wrapped is self.model:
            return
        self.model_wrapped = self.model
        self.accelerator.free_memory()

    def project(self) -> None:
        """Project the gated diff to `target_sparsity` and set up the fixed-mask stage (a new optimizer)."""
        report = project_to_sparsity(self.model, self.diff_pruning.target_sparsity)
        self.stage = "fixmask"
        if isinstance(unwrap_optimizer(self.optimizer), OptimizerInBackward):
            unwrap_optimizer(self.optimizer).remove_hooks()
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model
        self.log({"projection/kept": float(report.kept), "projection/density": report.kept / report.total_parameters})

    def _find_checkpoint(self, root: str, resume_from_checkpoint: str | bool | None) -> str | None:
        if resume_from_checkpoint in (None, False):
            return None
        if resume_from_checkpoint is not True:
            return str(resume_from_checkpoint)
        for stage in ("fixmask", "gated"):
            folder = os.path.join(root, stage)
            last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
            if last is not None:
                return last
        raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {root}/gated or {root}/fixmask.")

    def _load_projected(self, checkpoint: str) -> None:
        """Rebuild the model as the checkpoint's projected adapter (its modules differ from the gated ones)."""
        self._loss_terms.remove()
        base = self.model.unload()
        self.model = PeftModel.from_pretrained(base, checkpoint, is_trainable=True).to(self.args.device)
        self.model_wrapped = self.model
        self._loss_terms = LossTerms(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            (folder / STAGE_FILE).write_text(json.dumps({"stage": self.stage}) + "\n")


class DiffPruningTrainer(DiffPruningTrainerMixin, Trainer):
    """transformers' `Trainer` running the whole diff pruning recipe; see [`DiffPruningTrainerMixin`].

    ```python
    model = get_peft_model(base, DiffPruningConfig(task_type="SEQ_CLS", target_sparsity=0.005, l0_lambda=1.25e-5))
    args = TrainingArguments("out", learning_rate=1e-5, num_train_epochs=3, max_grad_norm=1.0)
    trainer = DiffPruningTrainer(model, args, train_dataset=train, diff_pruning=DiffPruningSchedule(fixmask_epochs=3))
    trainer.train()  # gated stage, projection, fixed-mask stage
    trainer.save_model()  # the sparse adapter
    ```
    """
