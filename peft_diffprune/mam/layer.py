"""The MAM adapter's layers: prefix tuning on self-attention, and parallel adapters under MAM's names.

Prefix tuning prepends `l` learned key and value vectors to every self-attention layer: `softmax(x Wq [P_k; K]^T)
[P_v; V]`. transformers 5 routes every attention computation through `ALL_ATTENTION_FUNCTIONS[config.
_attn_implementation]`, with `(module, query, key, value, attention_mask, ...)`. We register one wrapping function per
underlying implementation (`mam_prefix_sdpa`, `mam_prefix_eager`): it prepends the prefixes the wrapped attention
module carries for this call, widens the mask (prefixes are visible to every query, also in causal models) and calls
the underlying implementation. No model code is patched, key/value caches keep holding only real tokens, and
generation works unchanged.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..parallel_adapter.layer import OutputAdapter, ResidualInputAdapter
from .config import MAMConfig


_NAME_PREFIX = "mam_prefix_"
#: Underlying attention implementations the prefix can wrap (their masks are 4-D, bool or additive float).
SUPPORTED_ATTENTION = ("sdpa", "eager")


def prefix_attention_name(inner: str) -> str:
    """Register (once) and return the attention implementation that adds prefixes around `inner`."""
    if inner.startswith(_NAME_PREFIX):
        return inner
    if inner not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"The MAM adapter's prefix tuning supports the {list(SUPPORTED_ATTENTION)} attention implementations; the "
            f"model uses {inner!r}. Load the model with attn_implementation='sdpa' (or 'eager')."
        )
    name = _NAME_PREFIX + inner
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(prefix_attention, inner=inner))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def inner_attention_name(name: str) -> str:
    return name.removeprefix(_NAME_PREFIX)


def _inner_function(module: nn.Module, inner: str) -> Callable:
    if inner == "eager":
        # models keep their own eager attention next to the module class
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    inner: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over `[prefix; keys]`. `query`: (batch, heads, q_len, head_dim); `key`, `value`: (batch, kv_heads,
    kv_len, head_dim); the prefixes `module._mam_prefix = (P_k, P_v)`, each (l, kv_heads * head_dim), or None."""
    function = _inner_function(module, inner)
    prefix = getattr(module, "_mam_prefix", None)
    if prefix is None:
        return function(module, query, key, value, attention_mask, *args, **kwargs)
    prefix_key, prefix_value = prefix
    batch, kv_heads, kv_len, head_dim = key.shape
    length = prefix_key.shape[0]
    if prefix_key.shape[1] != kv_heads * head_dim:
        raise RuntimeError(
            f"The prefixes of {type(module).__name__} have width {prefix_key.shape[1]}, but its keys have "
            f"{kv_heads} heads x {head_dim}; the adapter was made for another model shape."
        )

    def heads(prefix_states: torch.Tensor) -> torch.Tensor:
        states = prefix_states.to(key.dtype).view(length, kv_heads, head_dim).transpose(0, 1)
        return states.unsqueeze(0).expand(batch, -1, -1, -1)

    key = torch.cat([heads(prefix_key), key], dim=2)
    value = torch.cat([heads(prefix_value), value], dim=2)
    q_len = query.shape[2]
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
        if is_causal and q_len > 1:
            # an implicit causal mask would be aligned top-left over [prefix; keys]: spell it out
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=key.device).tril(kv_len - q_len)
            attention_mask = torch.cat([causal.new_ones(q_len, length), causal], dim=-1)[None, None]
            if inner == "eager":
                attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min
                )
    else:
        pad_shape = (*attention_mask.shape[:-1], length)
        if attention_mask.dtype == torch.bool:
            pad = attention_mask.new_ones(pad_shape)
        else:
            pad = attention_mask.new_zeros(pad_shape)
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    if kwargs.get("position_bias") is not None:
        bias = kwargs["position_bias"]
        kwargs["position_bias"] = torch.cat([bias.new_zeros((*bias.shape[:-1], length)), bias], dim=-1)
    return function(module, query, key, value, attention_mask, *args, **kwargs)


class MAMLayer(BaseTunerLayer):
    """Marker base of every layer the MAM tuner creates (prefix layers and its parallel adapters)."""


class MAMOutputAdapter(OutputAdapter, MAMLayer):
    adapter_layer_names = ("mam_down", "mam_up", "mam_scale")
    repr_prefix = "mam."


class MAMResidualInputAdapter(ResidualInputAdapter, MAMLayer):
    adapter_layer_names = ("mam_down", "mam_up", "mam_scale")
    repr_prefix = "mam."


class PrefixTrunk(nn.Module):
    """The shared part of the prefix reparameterisation: `tanh(Linear(Embedding(l, d)))`, (l, hidden)."""

    def __init__(self, prefix_length: int, model_dim: int, hidden_size: int, **factory: Any) -> None:
        super().__init__()
        self.embedding = nn.Embedding(prefix_length, model_dim, **factory)
        self.linear = nn.Linear(model_dim, hidden_size, **factory)

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.linear(self.embedding.weight))


class PrefixAttention(nn.Module, MAMLayer):
    """A self-attention module with `l` learned key and value vectors per adapter, prepended to its keys and values.

    While `prefix_projection` trains an adapter, its prefixes are `mam_prefix_head(trunk())` split into key and value
    halves (the plain `mam_prefix_key` / `mam_prefix_value` are frozen and unused); saving stores the folded values
    in the plain tensors, and loading them drops the projection.
    """

    adapter_layer_names = ("mam_prefix_key", "mam_prefix_value", "mam_prefix_head")
    other_param_names = ("prefix_length",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MAMConfig, kv_dim: int, trunk=None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kv_dim = kv_dim
        self.prefix_length: dict[str, int] = {}
        self.mam_prefix_key = nn.ParameterDict()
        self.mam_prefix_value = nn.ParameterDict()
        self.mam_prefix_head = nn.ModuleDict()
        # the shared trunks live on the tuner; a plain dict keeps them out of this layer's state dict
        self._trunks: dict[str, PrefixTrunk] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self._register_load_state_dict_pre_hook(self._drop_projection_on_load)
        self.update_layer(adapter_name, config, trunk)

    def update_layer(self, adapter_name: str, config: MAMConfig, trunk: PrefixTrunk | None) -> None:
        reference = next(self.get_base_layer().parameters())
        factory = {"device": reference.device, "dtype": reference.dtype}
        length = config.prefix_length
        self.prefix_length[adapter_name] = length
        for name in ("mam_prefix_key", "mam_prefix_value"):
            getattr(self, name)[adapter_name] = nn.Parameter(torch.randn(length, self.kv_dim, **factory) * 0.02)
        if trunk is not None:
            self._trunks[adapter_name] = trunk
            self.mam_prefix_head[adapter_name] = nn.Linear(config.prefix_hidden_size, 2 * self.kv_dim, **factory)
            self.frozen_peft_weight_names = {
                **self.frozen_peft_weight_names,
                adapter_name: ("mam_prefix_key", "mam_prefix_value"),
            }
        self.set_adapter(self.active_adapters)

    def prefixes(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (key, value) prefixes of an adapter, each (l, kv_dim)."""
        if adapter_name in self.mam_prefix_head:
            states = self.mam_prefix_head[adapter_name](self._trunks[adapter_name]())
            return states[:, : self.kv_dim], states[:, self.kv_dim :]
        return self.mam_prefix_key[adapter_name], self.mam_prefix_value[adapter_name]

    def fold(self, adapter_name: str) -> None:
        """Write the reparameterised prefixes into the plain ones and train those from now on."""
        if adapter_name not in self.mam_prefix_head:
            return
        with torch.no_grad():
            key, value = self.prefixes(adapter_name)
            self.mam_prefix_key[adapter_name].copy_(key)
            self.mam_prefix_value[adapter_name].copy_(value)
        self._drop_projection(adapter_name)

    def _drop_projection(self, adapter_name: str) -> None:
        head = self.mam_prefix_head.pop(adapter_name)
        trainable = any(p.requires_grad for p in head.parameters())
        self._trunks.pop(adapter_name, None)
        self.frozen_peft_weight_names = {k: v for k, v in self.frozen_peft_weight_names.items() if k != adapter_name}
        for name in ("mam_prefix_key", "mam_prefix_value"):
            getattr(self, name)[adapter_name].requires_grad_(trainable)

    def _drop_projection_on_load(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # a saved adapter holds folded prefixes: loading them replaces the (random) projection of a fresh adapter
        for adapter_name in list(self.mam_prefix_head):
            if f"{prefix}mam_prefix_key.{adapter_name}" in state_dict:
                self._drop_projection(adapter_name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.mam_prefix_key]
        if not active:
            return self.base_layer(*args, **kwargs)
        pairs = [self.prefixes(a) for a in active]
        prefix = (torch.cat([k for k, _ in pairs]), torch.cat([v for _, v in pairs])) if len(pairs) > 1 else pairs[0]
        self.base_layer._mam_prefix = prefix
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            self.base_layer._mam_prefix = None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("Prefix tuning adds attention positions; it cannot be merged into the base weights.")

    def unmerge(self) -> None:
        return None

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError("Prefix tuning has no weight delta.")

    def __repr__(self) -> str:
        return "mam." + super().__repr__()
