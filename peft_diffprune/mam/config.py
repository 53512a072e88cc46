from __future__ import annotations

from dataclasses import dataclass, field

from ..parallel_adapter.config import ParallelAdapterConfig
from ..registration import add_peft_type


@dataclass
class MAMConfig(ParallelAdapterConfig):
    """Configuration of the MAM adapter (He et al., ICLR 2022): prefix tuning on every self-attention layer plus a
    scaled parallel adapter on every feed-forward block.

    The defaults are the paper's (l=30, r=512, s=4, for summarisation and translation with BART-large). Its GLUE runs
    on RoBERTa-base used l=16, r=16, s=2: `MAMConfig(prefix_length=16, r=16, scaling=2.0)`.

    Args:
        prefix_length (`int`): Number `l` of learned key and value vectors prepended in every self-attention layer.
        prefix_projection (`bool`): Train the prefixes through the paper's reparameterisation, `Embedding(l, d) ->
            Linear(d, prefix_hidden_size) -> tanh -> Linear(prefix_hidden_size, 2 * kv_dim)` per layer (the last
            Linear is one shared matrix in the paper; its per-layer row blocks are the same function). Saving folds
            it into plain prefixes, which is all a loaded adapter holds.
        prefix_hidden_size (`int`): Width of the reparameterisation MLP (800 in the paper).
        prefix_modules (`Union[list[str], str]`, *optional*): The self-attention modules to prefix, by name or regex;
            default: found from the model type. They must compute attention through transformers'
            `ALL_ATTENTION_FUNCTIONS` (every model ported to transformers 5's attention interface does).
        r, scaling, learn_scaling, nonlinearity, dropout, target_modules, exclude_modules, modules_to_save,
        init_weights: as in [`ParallelAdapterConfig`], for the parallel adapter on the feed-forward blocks
            (`placement` is `["ffn"]`).
    """

    prefix_length: int = field(default=30, metadata={"help": "Number l of prefix key/value vectors per layer."})
    prefix_projection: bool = field(
        default=True, metadata={"help": "Train prefixes through the reparameterisation MLP (folded when saving)."}
    )
    prefix_hidden_size: int = field(default=800, metadata={"help": "Width of the reparameterisation MLP."})
    prefix_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Self-attention modules to prefix; default: found from the model type."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = add_peft_type("MAM")
        if isinstance(self.prefix_modules, (list, tuple)):
            self.prefix_modules = set(self.prefix_modules)
        if self.placement != ["ffn"]:
            raise ValueError(
                f"The MAM adapter puts its parallel adapter on the feed-forward blocks (placement=['ffn']) and prefix "
                f"tuning on attention; got placement={self.placement!r}. For other placements use "
                "ParallelAdapterConfig."
            )
        for name in ("prefix_length", "prefix_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
