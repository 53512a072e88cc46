from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..registration import add_peft_type


#: Sub-layers a parallel adapter can sit beside (He et al. 2022, "modified representation").
PLACEMENTS = ("ffn", "attn")
#: Non-linearities of the bottleneck, by name.
NONLINEARITIES = ("relu", "gelu", "tanh", "identity")


@dataclass
class ParallelAdapterConfig(PeftConfig):
    """Configuration of a scaled parallel adapter (He et al., ICLR 2022, "Towards a Unified View of
    Parameter-Efficient Transfer Learning").

    A bottleneck `delta_h = act(x W_down) W_up` reads a sub-layer's input `x` and its scaled output `s * delta_h` is
    added to the sub-layer's output `h` before the residual connection: `h + s * delta_h`. With the default init
    (`W_down` Kaiming-uniform as in LoRA, `W_up` zero) the adapted model starts as the base model.

    Args:
        r (`int`): Bottleneck dimension. The paper's scaled PA on the FFN uses 512 (summarisation, translation); its
            GLUE runs use 16.
        scaling (`float`): The scale `s` of the adapter's output (4 in the paper, 2 in its GLUE runs).
        learn_scaling (`bool`): Learn `s` as a scalar parameter per adapter layer, initialised at `scaling`.
        placement (`list[str]`): Sub-layers to adapt: `"ffn"` (the feed-forward block), `"attn"` (the self-attention
            block) or both. Used to find the modules of known architectures when `target_modules` is not given.
        nonlinearity (`str`): `"relu"` (the paper's), `"gelu"`, `"tanh"` or `"identity"`.
        dropout (`float`): Dropout on the adapter's input.
        target_modules (`Union[list[str], str]`, *optional*): The sub-layer modules to adapt, by name or regex, for
            architectures not in the built-in table. A target must either take the sub-layer input as its first
            argument and return the sub-layer output (a tensor, or a tuple whose first element is it), or be a
            BERT-style output module `forward(hidden_states, input_tensor)` whose `input_tensor` is the sub-layer input.
        exclude_modules (`Union[list[str], str]`, *optional*): Modules not to adapt.
        modules_to_save (`list[str]`, *optional*): Modules trained and saved in full besides the adapters (the task
            head is added automatically for sequence classification).
        init_weights (`bool`): `True` initialises `W_up` at zero (identity at start); `False` gives a small random
            `W_up`, for tests.
    """

    r: int = field(default=512, metadata={"help": "Bottleneck dimension."})
    scaling: float = field(default=4.0, metadata={"help": "Scale s of the adapter output: h + s * delta_h."})
    learn_scaling: bool = field(default=False, metadata={"help": "Learn s (one scalar per adapter layer)."})
    placement: list[str] = field(
        default_factory=lambda: ["ffn"], metadata={"help": f"Sub-layers to adapt, among {PLACEMENTS}."}
    )
    nonlinearity: str = field(default="relu", metadata={"help": f"Bottleneck non-linearity, one of {NONLINEARITIES}."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Sub-layer modules to adapt (names or a regex); default: found from `placement`."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full besides the adapters."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Zero-init W_up so that the model starts as the base."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = add_peft_type("PARALLEL_ADAPTER")
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.placement, str):
            self.placement = [self.placement]
        self.placement = list(self.placement)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer (the bottleneck size), got {self.r!r}.")
        unknown = [p for p in self.placement if p not in PLACEMENTS]
        if unknown or not self.placement:
            raise ValueError(f"`placement` must be a non-empty subset of {list(PLACEMENTS)}, got {self.placement!r}.")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"`nonlinearity` must be one of {list(NONLINEARITIES)}, got {self.nonlinearity!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
