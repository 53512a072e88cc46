from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ..registration import add_peft_type


#: Version of the saved sparse adapter format (adapter_config.json + adapter_model.safetensors); see docs/format.md.
FORMAT_VERSION = 1


@dataclass
class DiffPruningConfig(PeftConfig):
    """Configuration class for [`DiffPruningModel`].

    Diff pruning (Guo, Rush and Kim, ACL 2021) keeps the pretrained weights frozen and learns a task-specific diff
    `delta = z * w` for every targeted parameter, where `z` is a hard-concrete gate with logits `alpha` trained
    under an expected-L0 penalty. After training the diff is projected to an exact sparsity and the kept entries are
    fine-tuned with the mask fixed (see [`project_to_sparsity`]).

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            Modules whose parameters (weights and biases) get a diff. A list matches module names exactly or by
            suffix, a string is a regex matched against the full name. `None` (default) targets every supported
            module of the model (`nn.Linear`, `nn.Embedding`, `nn.Conv2d`, transformers' `Conv1D`, `nn.LayerNorm` and
            RMS-norm style layers), so that all parameters outside `modules_to_save` get a diff, as in the paper.
            A weight tied between modules (e.g. a language-model head tied to the input embedding) gets one diff,
            held by the first module using it and applied by all of them; naming some but not all of those modules
            raises. Parameters registered directly on a module of another type (e.g. ViT's `cls_token` and
            `position_embeddings`) get no diff.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Modules to leave untouched, matched like `target_modules`.
        modules_to_save (`Optional[list[str]]`):
            Modules trained densely and saved in full, not gated (task heads). For sequence classification PEFT adds
            the `classifier`/`score` head on its own.
        target_sparsity (`float`):
            Fraction of the base model's parameters (outside `modules_to_save`) that may remain in the diff after
            projection, in (0, 1]. The paper uses 0.005.
        l0_lambda (`float`):
            Weight of the expected-L0 penalty, added to the task loss in training mode (`loss + l0_lambda * E[L0]`,
            with E[L0] summed over all diff entries). The paper uses 1.25e-7.
        penalty_until_target (`bool`):
            Add the penalty only while more than `target_sparsity * N` gated entries are open under the
            deterministic gate (`z > 0`, what projection keeps; counted on every training forward, one comparison
            per gate logit); at or below it the step adds none, so stage 1 ends near the budget instead of below
            it, where projection fills the rest by the tie rule. Under FSDP2 the count is global (one all-reduce); FSDP1
            refuses it. Off by default
            (the paper's constant penalty).
        alpha_init (`float`):
            Initial gate logit for every entry (and every group in the structured variant). 5.0 opens nearly all
            gates at the start.
        stretch (`tuple[float, float]`):
            The hard-concrete stretch interval `(l, r)` with `l < 0` and `r > 1`. The paper uses (-1.5, 1.5).
        structured (`bool`):
            Structured diff pruning: one extra gate per parameter tensor, multiplied into every entry's gate.
        group_l0_lambda (`Optional[float]`):
            Weight of the penalty on the group gates of structured diff pruning; `None` (default) uses `l0_lambda`,
            as the paper does. A group gate's term counts every entry of its tensor, so under one weight its
            gradient is as large as the tensor: a weight that closes the right element gates closes every group
            (see docs/training.md). With the `"product"` penalty, `l0_lambda * E[L0]` is still the value added to
            the loss; the element logits get its gradient scaled by `l0_lambda` and the group logits by
            `group_l0_lambda`. With `"sum"`, the penalty is `l0_lambda * sum_i P(z_i != 0) + group_l0_lambda *
            sum_j P(z^j != 0)`.
        group_penalty (`str`):
            Penalty of the structured variant. `"product"` (default) is the paper's form, every entry's open
            probability weighted by its group's; `"sum"` adds the per-entry and per-group terms as the authors'
            code does.
        init_weights (`bool`):
            `True` (default) starts every diff at zero, so the adapted model equals the base model. `False` draws a
            small random diff (normal, std 0.02), which tests use to get a non-identity adapter.
        kept_pattern (`dict[str, int]`):
            Set by [`project_to_sparsity`]: the number of kept diff entries per targeted parameter (keys
            `"<module name>.<parameter name>"`). When it is set, layers are built in the sparse state (encoded
            positions and values, no gates), which is what saved sparse adapters load into.
        candidate_pool (`Optional[float]`):
            Train the gated stage over a pool of candidate entries instead of the whole model: only
            `round(candidate_pool * target_sparsity * N)` entries (a multiple >= 1 of the final budget) carry a diff
            and a gate logit, chosen by [`select_pool`] from the task loss's gradients. `None` (default) gates every
            entry, as in the paper. See docs/concepts.md.
        pool_pattern (`dict[str, int]`):
            Set by [`select_pool`]: the number of pool entries per targeted parameter. When it is set (and
            `kept_pattern` is not), layers are built in the pool state, which is what saved gated pool checkpoints
            load into.
        pool_regrow_steps (`int`):
            With `candidate_pool`: every this many optimizer steps the recipe drops the pool entries whose gates
            closed and regrows as many new candidates (see [`regrow_pool`]); 0 (default) never regrows.
        pool_regrow_fraction (`float`):
            With `candidate_pool`: at each regrowth also drop this fraction of each tensor's pool, the open entries
            whose diff under the deterministic gate, `|z * w|`, is smallest (SpIEL's drop rule), and regrow as many
            new candidates in their slots. 0 (default) drops the closed entries only. In [0, 1).
        pool_score_batches (`int`):
            With `candidate_pool`: batches whose gradients score the candidates, at selection and at regrowth.
        values_dtype (`str`):
            Dtype of the diff values written by `save_pretrained`: `"float32"` (default), `"float16"` or
            `"bfloat16"`. In memory the adapter state follows PEFT's `autocast_adapter_dtype`: fp32 by default,
            the base model's dtype with `autocast_adapter_dtype=False`.
        base_fingerprint (`Optional[str]`):
            Set by [`project_to_sparsity`]: a fingerprint of the base weights the diff was made on. Loading onto
            different weights raises, unless `verify_base_fingerprint=False`.
        verify_base_fingerprint (`bool`):
            Check `base_fingerprint` on load (default `True`).
        format_version (`int`):
            Version of the sparse adapter format, checked on load.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Modules whose parameters get a diff: a list of names or suffixes, or a regex. None targets every "
                "supported module, as in the paper."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules not to adapt: a list of names or suffixes, or a regex."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained densely and saved in full (task heads), never gated."},
    )
    target_sparsity: float = field(
        default=0.005,
        metadata={"help": "Fraction of base parameters kept in the diff after projection, in (0, 1]."},
    )
    l0_lambda: float = field(
        default=1.25e-7,
        metadata={"help": "Weight of the expected-L0 penalty added to the training loss."},
    )
    penalty_until_target: bool = field(
        default=False,
        metadata={"help": "Add the penalty only while more than target_sparsity of the entries are open."},
    )
    alpha_init: float = field(default=5.0, metadata={"help": "Initial gate logit (and group gate logit)."})
    stretch: tuple[float, float] = field(
        default=(-1.5, 1.5),
        metadata={"help": "Hard-concrete stretch interval (l, r), with l < 0 and r > 1."},
    )
    structured: bool = field(
        default=False,
        metadata={"help": "Add one gate per parameter tensor (structured diff pruning)."},
    )
    group_l0_lambda: float | None = field(
        default=None,
        metadata={"help": "Penalty weight on the group gates of structured diff pruning; None uses l0_lambda."},
    )
    group_penalty: Literal["product", "sum"] = field(
        default="product",
        metadata={"help": "Structured penalty: the paper's 'product' form or the authors' code's 'sum' form."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: diffs start at zero (identity). False: small random diffs, for tests."},
    )
    kept_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Kept diff entries per '<module>.<parameter>' after projection; set by project_to_sparsity. When "
                "set, layers are built in the sparse (fixed-mask) state."
            )
        },
    )
    candidate_pool: float | None = field(
        default=None,
        metadata={
            "help": (
                "Gate only a pool of candidate entries, this many times the final budget (>= 1), chosen from the "
                "task loss's gradients; None gates every entry."
            )
        },
    )
    pool_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Pool entries per '<module>.<parameter>'; set by select_pool."},
    )
    pool_regrow_steps: int = field(
        default=0,
        metadata={"help": "Drop closed pool entries and regrow new candidates every this many steps; 0: never."},
    )
    pool_regrow_fraction: float = field(
        default=0.0,
        metadata={
            "help": (
                "At each regrowth also drop this fraction of each tensor's pool, the open entries with the "
                "smallest |z * w|, and regrow as many; 0: drop the closed entries only."
            )
        },
    )
    pool_score_batches: int = field(
        default=4,
        metadata={"help": "Batches whose gradients score the pool's candidates."},
    )

    values_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32",
        metadata={"help": "Dtype of the diff values in saved sparse adapters: float32, float16 or bfloat16."},
    )
    base_fingerprint: str | None = field(
        default=None,
        metadata={"help": "Fingerprint of the base weights the sparse diff was made on; set by project_to_sparsity."},
    )
    verify_base_fingerprint: bool = field(
        default=True,
        metadata={
            "help": (
                "Refuse to load a sparse adapter onto base weights whose fingerprint differs from the one recorded "
                "at projection. Set False to load it anyway."
            )
        },
    )
    format_version: int = field(
        default=FORMAT_VERSION,
        metadata={"help": "Version of the sparse adapter format; set on save, checked on load."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("DIFF_PRUNING")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        # JSON round trips turn the tuple into a list
        self.stretch = tuple(float(v) for v in self.stretch)

        if not (isinstance(self.target_sparsity, (int, float)) and 0 < self.target_sparsity <= 1):
            raise ValueError(
                f"target_sparsity must be in (0, 1] (the fraction of parameters kept in the diff, e.g. 0.005 for "
                f"0.5%), got {self.target_sparsity!r}."
            )
        if not math.isfinite(self.l0_lambda) or self.l0_lambda < 0:
            raise ValueError(f"l0_lambda must be a finite number >= 0 (the paper uses 1.25e-7), got {self.l0_lambda}.")
        if not isinstance(self.penalty_until_target, bool):
            raise ValueError(f"penalty_until_target must be True or False, got {self.penalty_until_target!r}.")
        if self.group_l0_lambda is not None:
            if not self.structured:
                raise ValueError(
                    "group_l0_lambda weighs the group gates of structured diff pruning, but structured=False: set "
                    "structured=True, or leave group_l0_lambda at None."
                )
            if not math.isfinite(self.group_l0_lambda) or self.group_l0_lambda < 0:
                raise ValueError(f"group_l0_lambda must be a finite number >= 0 or None, got {self.group_l0_lambda}.")
        if not math.isfinite(self.alpha_init):
            raise ValueError(f"alpha_init must be a finite gate logit (the paper uses 5.0), got {self.alpha_init}.")
        if len(self.stretch) != 2:
            raise ValueError(f"stretch must be a pair (l, r), got {self.stretch!r}.")
        left, right = self.stretch
        if not (math.isfinite(left) and math.isfinite(right) and left < 0 and right > 1):
            raise ValueError(
                f"stretch (l, r) must satisfy l < 0 and r > 1 so that gates can be exactly 0 and exactly 1, got "
                f"{self.stretch!r}; the paper uses (-1.5, 1.5)."
            )
        if self.group_penalty not in ("product", "sum"):
            raise ValueError(f"group_penalty must be 'product' or 'sum', got {self.group_penalty!r}.")
        if self.values_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"values_dtype must be 'float32', 'float16' or 'bfloat16', got {self.values_dtype!r}.")
        if not isinstance(self.format_version, int) or not 1 <= self.format_version <= FORMAT_VERSION:
            raise ValueError(
                f"This adapter has format version {self.format_version!r}, but this peft_diffprune reads versions 1 to "
                f"{FORMAT_VERSION}: upgrade peft_diffprune (pip install -U peft_diffprune) to load it."
            )
        if self.candidate_pool is not None and not (
            isinstance(self.candidate_pool, (int, float))
            and math.isfinite(self.candidate_pool)
            and self.candidate_pool >= 1
        ):
            raise ValueError(
                f"candidate_pool is the pool size as a multiple of the final budget and must be >= 1 (e.g. 4.0), got "
                f"{self.candidate_pool!r}; None gates every entry."
            )
        if self.pool_pattern and self.candidate_pool is None:
            raise ValueError(
                "pool_pattern is set but candidate_pool is None: set candidate_pool, or clear pool_pattern."
            )
        for attr in ("pool_regrow_steps", "pool_score_batches"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < (0 if attr == "pool_regrow_steps" else 1):
                raise ValueError(f"{attr} must be an int >= {0 if attr == 'pool_regrow_steps' else 1}, got {value!r}.")
        fraction = self.pool_regrow_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ValueError(
                "pool_regrow_fraction is the share of each tensor's pool dropped at a regrowth beside the closed "
                f"entries and must be in [0, 1) (e.g. 0.1; 0 drops the closed ones only), got {fraction!r}."
            )
        for key, count in {**self.kept_pattern, **self.pool_pattern}.items():
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"kept_pattern / pool_pattern [{key!r}] must be a non-negative int, got {count!r}.")
