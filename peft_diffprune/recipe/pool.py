"""The candidate pool in the recipe: choose it before the gated stage, regrow it every `pool_regrow_steps` steps.

Shared by [`DiffPruningTrainer`] and `examples/glue.py`; see `diff_pruning/candidates.py` for what is scored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import islice

from torch import nn

from ..diff_pruning.candidates import regrow_pool, select_pool
from ..diff_pruning.model import get_tuner


def pool_config(model: nn.Module):
    """The active adapter's config if it gates a candidate pool in the gated stage, else None."""
    tuner = get_tuner(model)
    config = tuner.peft_config[tuner.active_adapters[0]]
    return config if config.candidate_pool is not None and not config.kept_pattern else None


def choose_pool(model: nn.Module, batches: Iterable[dict]) -> dict[str, int] | None:
    """Choose the pool from the first `pool_score_batches` of `batches` if the active adapter needs one and has
    none yet (a resumed run chooses the same one, then loads the checkpoint's positions over it)."""
    config = pool_config(model)
    if config is None or config.pool_pattern:
        return None
    return select_pool(model, list(islice(batches, config.pool_score_batches)))


class PoolRegrowth:
    """Keeps the last `pool_score_batches` training batches and regrows the pool from them every
    `pool_regrow_steps` optimizer steps (`step()` after each optimizer step)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = pool_config(model)
        self.recent = deque(maxlen=self.config.pool_score_batches if self.config else 1)

    @property
    def active(self) -> bool:
        return self.config is not None and self.config.pool_regrow_steps > 0

    def record(self, batch: dict) -> None:
        if self.active:
            self.recent.append(batch)

    def step(self, global_step: int, optimizer) -> int:
        """Regrow if this step is due; the number of entries regrown."""
        if not self.active or global_step % self.config.pool_regrow_steps or not self.recent:
            return 0
        return regrow_pool(self.model, list(self.recent), optimizer)
