"""Scaled parallel adapters (He et al., ICLR 2022): `h + s * act(x W_down) W_up` beside a sub-layer.

Two kinds of sub-layer module are wrapped:

- `OutputAdapter`: a module whose first argument is the sub-layer input `x` and whose result is the sub-layer output
  `h` (GPT-2 / Llama `mlp` and `attn`, T5's `DenseReluDense`): the result becomes `h + s * delta_h(x)`.
- `ResidualInputAdapter`: a BERT-style post-LN output module, `forward(hidden_states, input_tensor)` computing
  `LayerNorm(dropout(dense(hidden_states)) + input_tensor)`, where `input_tensor` is the sub-layer input `x`.
  Adding `s * delta_h(x)` to `input_tensor` adds it to the sub-layer output before the residual and the LayerNorm,
  exactly where the paper puts it, without reaching into the module.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import ParallelAdapterConfig


_NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "identity": lambda x: x}


def takes_residual_input(module: nn.Module) -> bool:
    """Whether `module.forward` is BERT-style, `(hidden_states, input_tensor, ...)`."""
    parameters = list(inspect.signature(module.forward).parameters)
    return len(parameters) >= 2 and parameters[1] == "input_tensor"


class ParallelAdapterLayer(BaseTunerLayer):
    """Per-adapter state of a parallel adapter beside one sub-layer module.

    The attribute names carry the tuner's prefix (PEFT finds adapter weights by it); `MAMModel` reuses these classes
    under its own names through `adapter_layer_names`.
    """

    adapter_layer_names: tuple[str, ...] = (
        "parallel_adapter_down",
        "parallel_adapter_up",
        "parallel_adapter_scale",
    )
    other_param_names: tuple[str, ...] = ("r", "scaling", "nonlinearity", "dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.nonlinearity: dict[str, str] = {}
        self.dropout = nn.ModuleDict()
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict() if name.endswith("_scale") else nn.ModuleDict())
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.hidden_size = hidden_size_of(base_layer)

    @property
    def _down(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[0])

    @property
    def _up(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_layer_names[1])

    @property
    def _scale(self) -> nn.ParameterDict:
        return getattr(self, self.adapter_layer_names[2])

    def update_layer(self, adapter_name: str, config: ParallelAdapterConfig) -> None:
        reference = next(self.get_base_layer().parameters())
        factory = {"device": reference.device, "dtype": reference.dtype}
        down = nn.Linear(self.hidden_size, config.r, **factory)
        up = nn.Linear(config.r, self.hidden_size, **factory)
        # LoRA's init (the paper's choice for the scaled PA): W_down Kaiming-uniform(a=sqrt 5), W_up zero, so the
        # adapted sub-layer starts as the base one.
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        if config.init_weights:
            nn.init.zeros_(up.weight)
        else:
            nn.init.normal_(up.weight, std=0.02)
        nn.init.zeros_(up.bias)
        self._down[adapter_name] = down
        self._up[adapter_name] = up
        if config.learn_scaling:
            self._scale[adapter_name] = nn.Parameter(torch.tensor(float(config.scaling), **factory))
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = float(config.scaling)
        self.nonlinearity[adapter_name] = config.nonlinearity
        self.dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """`sum_a s_a * act(x W_down^a) W_up^a` over the active adapters, or None when none applies."""
        if self.disable_adapters:
            return None
        delta = None
        for name in self.active_adapters:
            if name not in self._down:
                continue
            down = self._down[name]
            h = _NONLINEARITIES[self.nonlinearity[name]](down(self.dropout[name](x.to(down.weight.dtype))))
            scale = self._scale[name] if name in self._scale else self.scaling[name]
            term = (self._up[name](h) * scale).to(x.dtype)
            delta = term if delta is None else delta + term
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "A parallel adapter is a non-linear bottleneck beside the sub-layer, so it cannot be merged into the base "
            "weights. Keep it as a module (it adds 4 * r * hidden FLOPs per token), or use `unload()` to get the base "
            "model back without it."
        )

    def unmerge(self) -> None:
        # nothing is ever merged (merge refuses), so there is nothing to undo
        return None

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError("A parallel adapter has no weight delta: it is a non-linear module beside the sub-layer.")


def hidden_size_of(module: nn.Module) -> int:
    """The model width a sub-layer module reads (and writes back).

    For a BERT-style output module that is the output size of its projection (its `hidden_states` input is the
    FFN's inner activation); otherwise the input size of its first Linear (or transformers' Conv1D).
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if not linears:
        raise TypeError(
            f"Cannot tell the hidden size of {type(module).__name__}: it has no nn.Linear or Conv1D. A parallel "
            "adapter wraps a whole sub-layer (e.g. a block's `mlp` or `attention.output`); check `target_modules`."
        )
    if takes_residual_input(module):
        last = linears[-1]
        return last.out_features if isinstance(last, nn.Linear) else last.weight.shape[1]
    first = linears[0]
    # Conv1D keeps its weight as (in, out)
    return first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]


class SublayerAdapter(nn.Module, ParallelAdapterLayer):
    """A wrapped sub-layer module with its parallel adapters; subclasses say how the adapter output is added."""

    #: What `repr` puts in front of the wrapped module, as PEFT's tuner layers do ("lora.Linear").
    repr_prefix = "parallel_adapter."

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ParallelAdapterConfig) -> None:
        super().__init__()
        ParallelAdapterLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def __repr__(self) -> str:
        return self.repr_prefix + super().__repr__()


class OutputAdapter(SublayerAdapter):
    """Wraps a sub-layer `h = f(x, ...)`: returns `h + s * delta_h(x)` (on the first element if `f` returns a tuple)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        out = self.base_layer(*args, **kwargs)
        delta = self.adapter_delta(x)
        if delta is None:
            return out
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta


class ResidualInputAdapter(SublayerAdapter):
    """Wraps a BERT-style output module `f(hidden_states, input_tensor)`: `input_tensor += s * delta_h(input_tensor)`."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        delta = self.adapter_delta(input_tensor)
        if delta is not None:
            input_tensor = input_tensor + delta
        return self.base_layer(hidden_states, input_tensor, *args, **kwargs)
