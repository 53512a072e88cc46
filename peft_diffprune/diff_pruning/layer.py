from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DiffPruningConfig
from .distributed import is_shard
from .encoding import decode_positions, encode_positions, encoded_size
from .functional import gated_diff_linear, sparse_diff_linear
from .gates import L0Weights, deterministic_gate, hard_concrete_delta_and_penalty, sample_group_gate
from .pool import add_pool, is_pool, pool_apply, pool_linear, pool_rows_delta, pool_sparse_delta
from .rows import is_row_sharded, row_sharded_forward


#: Standard deviation of the random diff drawn with `init_weights=False`.
RANDOM_DIFF_STD = 0.02

_MISSING = object()


class PenaltyTerms:
    """The expected-L0 penalty terms that the gated layers compute during one training forward of a model.

    The model's forward pre-hook opens it with the weights of every gated diff state of an active adapter; each
    layer that samples a tensor's gates records that tensor's penalty, an output of the gate's own autograd node,
    and the forward hook adds them to the loss (see `DiffPruningModel._add_l0_penalty`).
    """

    def __init__(self, owner: int, states: dict[str, list[DiffState]], weights: dict[str, L0Weights]):
        self.owner = owner
        self.states = states  # adapter name -> its gated diff states, in module order
        self.weights = {id(state): weights[name] for name, group in states.items() for state in group}
        self.terms: dict[tuple[int, str], torch.Tensor] = {}

    def record(self, state: DiffState, name: str, term: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            # the no-grad first pass of a reentrant checkpointed segment: its recomputation runs in backward, after
            # the loss was formed, so this tensor's penalty gets its own node instead (see `_state_penalty`)
            return
        # a module called twice in one forward (shared layers, a tied LM head) is penalised once, as outside it
        self.terms.setdefault((id(state), name), term)


_collecting = threading.local()


def open_penalty_terms(terms: PenaltyTerms) -> None:
    """Make `terms` the collection that gated layers record into, until [`close_penalty_terms`] of its owner.

    Entries left by an earlier forward of the same owner that raised are dropped: a forward hook does not run
    after an exception.
    """
    stack = [t for t in getattr(_collecting, "stack", []) if t.owner != terms.owner]
    _collecting.stack = [*stack, terms]


def close_penalty_terms(owner: int) -> PenaltyTerms | None:
    stack = getattr(_collecting, "stack", [])
    mine = [t for t in stack if t.owner == owner]
    _collecting.stack = [t for t in stack if t.owner != owner]
    return mine[-1] if mine else None


def active_penalty_terms() -> PenaltyTerms | None:
    stack = getattr(_collecting, "stack", None)
    return stack[-1] if stack else None


def call_with_parameters(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict):
    """`module(*args, **kwargs)` with the parameters in `params` replaced (no copies, restored afterwards).

    Like `torch.func.functional_call` for a module without children, but it also replaces an instance attribute
    that shadows the registered parameter: FSDP1 with `use_orig_params=True` puts plain-tensor views of its flat
    parameter both into `_parameters` and into the instance `__dict__` during forward, and swapping `_parameters`
    alone left the module reading the unadapted view (the diffs were silently skipped).
    """
    registered, attributes = module._parameters, module.__dict__
    saved = {name: (registered[name], attributes.get(name, _MISSING)) for name in params}
    try:
        for name, value in params.items():
            registered[name] = value
            if name in attributes:
                attributes[name] = value
        return module(*args, **kwargs)
    finally:
        for name, (param, attribute) in saved.items():
            registered[name] = param
            if attribute is not _MISSING:
                attributes[name] = attribute


def _multi_rank() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the RMS-norm style classes of transformers (`LlamaRMSNorm`, `T5LayerNorm`, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (
        (name.endswith("RMSNorm") or name.endswith("LayerNorm"))
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and not list(module.children())
    )


def is_supported_module(module: nn.Module) -> bool:
    """Whether diff pruning can wrap `module` (its own parameters get diffs)."""
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d, Conv1D)) or is_norm_layer(module)


class DiffState(nn.Module):
    """The diff of one adapter on one wrapped module.

    For every targeted parameter `t` of the base module it holds either the gated state of training
    (`{t}_diff`: the dense diff `w`, `{t}_alpha`: gate logits, `{t}_group_alpha`: the structured group logit) or the
    sparse state after projection (`{t}_positions`: the Elias-Fano code of the kept flat positions, a persistent
    uint8 buffer, `{t}_values`: the kept diff entries), or, with a candidate pool, the pool state (`pool.py`:
    `{t}_pool_positions` and 1-d `{t}_diff`, `{t}_alpha` over them). Keeping the sparse state as real module state is what lets every PEFT and transformers
    loader restore it.
    """

    def __init__(self, stretch: tuple[float, float], module_name: str = ""):
        super().__init__()
        self.stretch = stretch
        self.module_name = module_name
        self.tensor_names: list[str] = []
        self.outside_fsdp = False  # made by projecting a sharded model (see sparse.py)
        self._decoded: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.pool_shapes: dict[str, tuple[int, ...]] = {}  # base shapes of the tensors in the pool state

    def is_sparse(self, name: str) -> bool:
        return hasattr(self, f"{name}_positions")

    def is_sharded(self) -> bool:
        """Whether this state holds FSDP shards: FSDP2 `DTensor`s, or FSDP1's parameters, which outside forward are
        flat views of this rank's part of its flat parameter (within `summon_full_params`, whole ones)."""
        return any(is_shard(t) for name in self.tensor_names for t in self.tensors(name))

    def add_gated(self, name: str, base: torch.Tensor, config: DiffPruningConfig) -> None:
        # in the base dtype, as PEFT creates adapter weights: `_cast_adapter_dtype` upcasts bf16 and fp16 to fp32
        # unless `autocast_adapter_dtype=False`
        kwargs = {"dtype": base.dtype, "device": base.device}
        diff = torch.zeros(base.shape, **kwargs)
        if not config.init_weights:
            diff.normal_(0.0, RANDOM_DIFF_STD)
        self.register_parameter(f"{name}_diff", nn.Parameter(diff))
        self.register_parameter(f"{name}_alpha", nn.Parameter(torch.full(base.shape, config.alpha_init, **kwargs)))
        if config.structured:
            # shape (1,), not 0-d: FSDP2 cannot shard scalar parameters
            self.register_parameter(f"{name}_group_alpha", nn.Parameter(torch.full((1,), config.alpha_init, **kwargs)))
        self.tensor_names.append(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # gated checkpoints written before group logits were 1-d held them as 0-d tensors
        for name in self.tensor_names:
            key = f"{prefix}{name}_group_alpha"
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def add_sparse(
        self,
        name: str,
        base: torch.Tensor,
        num_kept: int,
        config: DiffPruningConfig,
        positions=None,
        values=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Sparse state: the Elias-Fano code of the kept positions (a persistent uint8 buffer) and their values.

        Without `positions`, the code (all zero: it fails its checksum) and the values (NaN) are left invalid when
        `init_weights=True`, so that a layer whose weights were never loaded raises on first use instead of silently
        acting as an identity. The values take `dtype`, by default the base dtype (see `add_gated`).
        """
        numel = base.numel()
        if positions is not None:
            code = encode_positions(positions, numel)
        elif config.init_weights:
            code = torch.zeros(encoded_size(numel, num_kept), dtype=torch.uint8)
        else:
            code = encode_positions(torch.randperm(numel)[:num_kept].sort().values, numel)
        if values is None:
            # NaN until loaded: a file that lacks this tensor is caught by the finiteness check on first use
            values = (
                torch.full((num_kept,), float("nan"))
                if config.init_weights
                else torch.randn(num_kept) * RANDOM_DIFF_STD
            )
        self.register_buffer(f"{name}_positions", code.to(base.device), persistent=True)
        self.register_parameter(f"{name}_values", nn.Parameter(values.to(base.device, dtype or base.dtype)))
        self.tensor_names.append(name)

    def positions(self, name: str, numel: int) -> torch.Tensor:
        """Decoded kept positions of parameter `name` (int64), cached until the code or values are replaced."""
        code, values = getattr(self, f"{name}_positions"), getattr(self, f"{name}_values")
        key = (id(code), code._version, id(values))
        cached = self._decoded.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        where = f"{self.module_name}.{name}" if self.module_name else name
        positions = decode_positions(code, numel, values.numel(), what=f"the diff of {where!r}")
        if not torch.isfinite(values).all():
            raise ValueError(
                f"The sparse diff of {where!r} holds non-finite values: the adapter file is corrupt or incomplete "
                "(were its weights loaded?)."
            )
        self._decoded[name] = (key, positions)
        return positions

    def diff_dtype(self, name: str) -> torch.dtype:
        """The dtype of the diff of parameter `name` (its values, or its dense diff and logits)."""
        return getattr(self, f"{name}_values" if self.is_sparse(name) else f"{name}_diff").dtype

    def tensors(self, name: str) -> list[torch.Tensor]:
        """Every tensor that determines the diff of parameter `name` (used to key the eval cache)."""
        suffixes = (
            ("positions", "values") if self.is_sparse(name) else ("diff", "alpha", "group_alpha", "pool_positions")
        )
        return [getattr(self, f"{name}_{s}") for s in suffixes if hasattr(self, f"{name}_{s}")]

    def group_gate(self, name: str, sample: bool) -> torch.Tensor | None:
        group_alpha = getattr(self, f"{name}_group_alpha", None)
        if group_alpha is None:
            return None
        return (
            sample_group_gate(group_alpha, self.stretch) if sample else deterministic_gate(group_alpha, self.stretch)
        )

    def gate_inputs(self, name: str, group: torch.Tensor | None = None):
        """`(w, alpha, sampled group gate, group logit)` of a gated tensor (the last two None without groups); the
        group gate is sampled unless given."""
        group_alpha = getattr(self, f"{name}_group_alpha", None)
        diff, alpha = getattr(self, f"{name}_diff"), getattr(self, f"{name}_alpha")
        return diff, alpha, self.group_gate(name, sample=True) if group is None else group, group_alpha

    def penalty_weights(self) -> L0Weights | None:
        """How this state's penalty is weighted in the forward being run, or None if no penalty is collected."""
        terms = active_penalty_terms()
        return None if terms is None else terms.weights.get(id(self))

    def record_penalty(self, name: str, penalty: torch.Tensor) -> None:
        active_penalty_terms().record(self, name, penalty)

    def gated_delta(
        self, name: str, sample: bool, rows: torch.Tensor | None = None, group: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`z * w` (times the group gate): sampled in training, deterministic in eval; only `rows` if given.

        Sampling also records the tensor's expected-L0 penalty (over all rows) when the model collects it; `group`
        is an already sampled group gate. A pool's diff is 1-d, over its entries (see `pool.py`).
        """
        if rows is not None and is_pool(self, name):
            return pool_rows_delta(self, name, rows, sample, group)
        if sample:
            weights = self.penalty_weights()
            diff, alpha, group, group_alpha = self.gate_inputs(name, group)
            delta, penalty = hard_concrete_delta_and_penalty(
                diff, alpha, self.stretch, group, rows, group_alpha, weights
            )
            if weights is not None:
                self.record_penalty(name, penalty)
            return delta
        diff, alpha = getattr(self, f"{name}_diff"), getattr(self, f"{name}_alpha")
        if rows is not None:
            diff, alpha = diff[rows], alpha[rows]
        group = self.group_gate(name, sample)
        delta = deterministic_gate(alpha, self.stretch) * diff
        return delta if group is None else delta * group

    def apply(self, name: str, base: torch.Tensor, sample: bool, group: torch.Tensor | None = None) -> torch.Tensor:
        """`base + delta` for parameter `name`, out of place, in the dtype of `base` (`group`: see `gated_delta`)."""
        if self.is_sparse(name):
            positions = self.positions(name, base.numel())
            values = getattr(self, f"{name}_values").to(base.dtype)
            return base.reshape(-1).index_add(0, positions, values).view_as(base)
        if is_pool(self, name):
            return pool_apply(self, name, base, sample, group)
        return base + self.gated_delta(name, sample, group=group).to(base.dtype)

    def sparse_delta(self, name: str, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The diff as flat `(positions, values)`: the kept entries, or the non-zeros under the deterministic gate."""
        if self.is_sparse(name):
            return self.positions(name, numel), getattr(self, f"{name}_values").detach()
        if is_pool(self, name):
            return pool_sparse_delta(self, name)
        delta = self.gated_delta(name, sample=False).detach().reshape(-1)
        positions = delta.nonzero().squeeze(1)
        return positions, delta.index_select(0, positions)


class SharedDiff:
    """The diff of tied parameters seen from a module that shares them: the owner's state, limited to `names`.

    A language-model head tied to the input embedding holds no diff of its own for the shared weight; it applies the
    embedding layer's (one tensor, one penalty term, stored and merged once). Everything but `tensor_names` is the
    owner's state.
    """

    def __init__(self, state: DiffState, names: frozenset[str]):
        self.state = state
        self.tensor_names = [name for name in state.tensor_names if name in names]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.state, attr)


class DiffPruningLayer(BaseTunerLayer):
    """Diff pruning around one module: each targeted parameter `theta` is used as `theta + delta` (Guo et al.).

    Merging writes the diff into the base weights at the touched positions only and keeps the original values of
    those positions, so unmerging restores the base weights bit for bit in any dtype.
    """

    adapter_layer_names = ("diff_pruning_state",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.diff_pruning_state = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self._merge_backup: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._eval_cache: tuple[tuple, dict[str, torch.Tensor]] | None = None
        # (owner layer, parameter names): tied parameters whose diff the owner holds; a tuple, not a submodule
        self._shared_diff: tuple[DiffPruningLayer | None, frozenset[str]] = (None, frozenset())
        self._set_layer_attributes(self.get_base_layer())

    def _set_layer_attributes(self, base: nn.Module) -> None:
        """The sizes PEFT's layers expose: `in_features` / `out_features` for every module (an embedding's are
        `num_embeddings` / `embedding_dim`, a convolution's its channels, a Conv1D's its `(nx, nf)` weight shape, a
        norm's the normalised size), and the base module's own size attributes."""
        if is_norm_layer(base):
            self.normalized_shape = tuple(getattr(base, "normalized_shape", base.weight.shape))
            in_features = out_features = math.prod(self.normalized_shape)
        else:
            in_features, out_features = _get_in_out_features(base)
        self.in_features, self.out_features = in_features, out_features
        for attr in ("num_embeddings", "embedding_dim", "in_channels", "out_channels", "nf"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """The floating-point parameters of the base module that can carry a diff.

        Read from `_parameters` (what `named_parameters(recurse=False)` yields, without its generator machinery: this
        runs on every forward and twice per layer in a merged task switch). Inside an FSDP forward these are the
        gathered tensors FSDP put there (FSDP1 with `use_orig_params=True`: plain views of its flat parameter).
        """
        params, seen = {}, set()
        for name, param in self.get_base_layer()._parameters.items():
            if param is not None and id(param) not in seen and param.is_floating_point():
                params[name] = param
                seen.add(id(param))
        return params

    def update_layer(
        self,
        adapter_name: str,
        config: DiffPruningConfig,
        module_name: str = "",
        shared_diff: tuple[DiffPruningLayer | None, frozenset[str]] | None = None,
    ) -> None:
        """Create the diff state of `adapter_name`: gated, sparse when `config.kept_pattern` is set, or over a
        candidate pool with `config.candidate_pool` (empty until `select_pool` fills it from `pool_pattern`).

        `shared_diff` is `(owner, names)` for parameters tied to those of another wrapped layer, `owner` (e.g. an LM
        head tied to the input embedding): they get no state here, the owner's diff applies to them.
        """
        if shared_diff is not None:
            self._shared_diff = shared_diff
        state = DiffState(config.stretch, module_name)
        for name, param in self.base_parameters().items():
            if name in self._shared_diff[1]:
                continue
            if not config.kept_pattern and config.candidate_pool is None:
                state.add_gated(name, param, config)
                continue
            pattern = config.kept_pattern or config.pool_pattern
            num_kept = pattern.get(f"{module_name}.{name}" if module_name else name, 0)
            if num_kept > param.numel():
                raise ValueError(
                    f"{'kept_pattern' if config.kept_pattern else 'pool_pattern'} asks for {num_kept} entries of {module_name}.{name}, which has only "
                    f"{param.numel()}: the adapter was made for a different base model."
                )
            if num_kept > 0 and config.kept_pattern:
                state.add_sparse(name, param, num_kept, config)
            elif num_kept > 0:
                add_pool(state, name, param, num_kept, config)
        self.diff_pruning_state[adapter_name] = state
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        owner, names = self._shared_diff
        if owner is None:
            return
        # PEFT saves targeted embedding layers in full, and a load with `assign=True` (`low_cpu_mem_usage`) gives each
        # module its own copy of the tied weight: share the owner's again, which the one diff (and merging) needs
        base, owner_base = self.get_base_layer(), owner.get_base_layer()
        for name in names:
            if base._parameters[name] is not owner_base._parameters[name]:
                base._parameters[name] = owner_base._parameters[name]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's `set_adapter` (activate `adapter_names`, make them trainable unless `inference_mode`), touching
        only the flags that change: a diff state has no submodules, and going through `Module.parameters()` for each
        of them made switching adapters on MiniLM's 53 wrapped modules 2.5x slower than LoRA's 12."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for key, state in self.diff_pruning_state.items():
            requires_grad = key in adapter_names and not inference_mode
            for param in state._parameters.values():
                if param is not None and param.is_leaf and param.requires_grad != requires_grad:
                    param.requires_grad_(requires_grad)
        self._freeze_non_trainable_peft_weights(adapter_names)
        self._active_adapter = adapter_names

    def _active_states(self) -> list[DiffState]:
        states = [self.diff_pruning_state[a] for a in self.active_adapters if a in self.diff_pruning_state]
        owner, names = self._shared_diff
        if owner is not None and not owner.merged and not owner.disable_adapters:
            # tied parameters: the diff the owner holds (a merged owner has written it into the shared weight)
            states += [
                SharedDiff(owner.diff_pruning_state[a], names)
                for a in self.active_adapters
                if a in owner.diff_pruning_state
            ]
        return [state for state in states if state.tensor_names]

    def effective_parameters(self, states: list[DiffState]) -> dict[str, torch.Tensor]:
        """`theta + sum of active deltas` for every parameter that some active adapter changes.

        Gates are sampled in training mode, with or without grad mode, as dropout is: reentrant gradient checkpointing
        runs the forward under `no_grad` and recomputes it with grad, and both must draw the same gates.
        """
        sample = self.training
        base_params = self.base_parameters()
        names = [n for n in base_params if any(n in s.tensor_names for s in states)]
        if len(names) < len({n for s in states for n in s.tensor_names}):
            raise RuntimeError(
                f"The base module of this diff pruning layer has no parameters {sorted(states[0].tensor_names)} in "
                "its forward: it is wrapped in a way that hides them (FSDP1 needs use_orig_params=True)."
            )
        # Under FSDP the cache would keep a gathered copy of every layer alive between batches (and FSDP1 hands
        # out fresh views each forward, so it would miss anyway): rebuild instead.
        cacheable = not self.training and not torch.is_grad_enabled() and not _multi_rank()
        if cacheable:
            # the deterministic gate does not change between eval batches: rebuild only when a tensor changed
            tensors = [base_params[n] for n in names] + [
                t for s in states for n in s.tensor_names for t in s.tensors(n)
            ]
            # `Module.to()` swaps `.data` without bumping `_version`: the storage pointer and dtype catch that
            key = tuple((id(t), t._version, t.data_ptr(), t.dtype) for t in tensors)
            if self._eval_cache is not None and self._eval_cache[0] == key:
                return self._eval_cache[1]
        else:
            self._eval_cache = None
        # Each state's group gates are drawn before its element gates, as on the nn.Linear path (functional.py):
        # the same seed then gives the same gates on both paths (FSDP1 takes this one for linear layers too).
        groups = [{n: s.group_gate(n, True) for n in s.tensor_names} if sample else {} for s in states]
        params = {}
        for name in names:
            value = base_params[name]
            for state, state_groups in zip(states, groups, strict=True):
                if name in state.tensor_names:
                    value = state.apply(name, value, sample, state_groups.get(name))
            params[name] = value
        if cacheable:
            self._eval_cache = (key, params)
        return params

    def diff_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        states = self._active_states()
        if self.merged or not states:
            return self.base_layer(x, *args, **kwargs)
        if self.training and any(state.outside_fsdp for state in states):
            raise RuntimeError(
                "This adapter was projected to its sparse state on an FSDP-sharded model: its sparse layers are not "
                "sharded, so training them here would not reduce their gradients over the ranks. Rebuild the model "
                "in the sparse state and shard it again (see docs/distributed.md)."
            )
        return self._adapted_forward(states, x, *args, **kwargs)

    def _adapted_forward(self, states: list[DiffState], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        params = self.effective_parameters(states)
        return call_with_parameters(self.get_base_layer(), params, (x, *args), kwargs)

    def get_delta_weight(self, adapter_name: str, tensor_name: str = "weight") -> torch.Tensor:
        """The dense diff of one parameter (deterministic gate in the gated state)."""
        state = self.diff_pruning_state[adapter_name]
        base = self.base_parameters()[tensor_name]
        if tensor_name not in state.tensor_names:
            return torch.zeros_like(base)
        return state.apply(tensor_name, base.detach().float(), sample=False) - base.detach().float()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_params = self.base_parameters()
        for adapter_name in adapter_names:
            if adapter_name not in self.diff_pruning_state:
                continue
            state = self.diff_pruning_state[adapter_name]
            backup = {}
            for name in state.tensor_names:
                flat = base_params[name].data.view(-1)
                positions, values = state.sparse_delta(name, flat.numel())
                original = flat.index_select(0, positions)
                if safe_merge and not torch.isfinite(original + values.to(flat.dtype)).all():
                    raise ValueError(
                        f"NaNs or infs in the merged {name} of adapter {adapter_name!r}: the adapter seems broken."
                    )
                # positions are unique: one rounding per entry, as original + values would give
                flat.index_add_(0, positions, values.to(flat.dtype))
                backup[name] = (positions, original)
            self._merge_backup[adapter_name] = backup
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_params = self.base_parameters()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            for name, (positions, original) in self._merge_backup.pop(adapter_name, {}).items():
                base_params[name].data.view(-1).scatter_(0, positions, original)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._eval_cache = None


class WrappedModule(nn.Module, DiffPruningLayer):
    """A module wrapped by diff pruning; subclasses specialise `_adapted_forward` for one kind of module."""

    def train(self, mode: bool = True):
        # Fused optimizers update parameters in place without bumping their version counters, so the eval cache
        # cannot rely on them alone: it lives from one switch to eval mode to the next mode switch.
        self._eval_cache = None
        return super().train(mode)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: DiffPruningConfig,
        module_name: str = "",
        shared_diff: tuple[DiffPruningLayer | None, frozenset[str]] | None = None,
    ):
        super().__init__()
        DiffPruningLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name, shared_diff)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.diff_forward(x, *args, **kwargs)


class Embedding(WrappedModule):
    """Diff pruning for `nn.Embedding`: in training only the looked-up rows of the gated diff are sampled.

    Sharded by rows ([`rows.shard_embedding_rows`]), every forward goes through [`rows.row_sharded_forward`].
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if is_row_sharded(self) and (self.disable_adapters or not self._active_states()):
            return row_sharded_forward(self, [], x)
        return super().forward(x, *args, **kwargs)

    def _adapted_forward(self, states: list[DiffState], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if is_row_sharded(self):
            return row_sharded_forward(self, states, x)
        if not self.training or any(s.is_sparse("weight") for s in states if "weight" in s.tensor_names):
            return super()._adapted_forward(states, x, *args, **kwargs)
        # Sampling gates for the whole vocabulary would cost a pass over the largest tensor of the model for rows
        # that this batch never reads; the gates of unused rows get no gradient from the task loss either way.
        rows, inverse = torch.unique(x, return_inverse=True)
        delta = sum(s.gated_delta("weight", sample=True, rows=rows) for s in states if "weight" in s.tensor_names)
        padding_idx = self.get_base_layer().padding_idx
        if padding_idx is not None:
            # as in full fine-tuning, the padding row is used but never trained
            delta = torch.where((rows == padding_idx).unsqueeze(1), delta.detach(), delta)
        base_out = self.base_layer(x, *args, **kwargs)
        delta_out = F.embedding(inverse, delta.to(base_out.dtype))
        embed_scale = self._get_embed_scale()
        if embed_scale is not None:
            delta_out = delta_out * embed_scale.to(delta_out.dtype)
        return base_out + delta_out


class GenericLayer(WrappedModule):
    """Diff pruning for linear, convolution and normalisation layers: the base forward with adapted parameters.

    Training an `nn.Linear` with one adapter goes through the autograd functions of `functional.py`, which rebuild
    the adapted weight in backward instead of keeping it alive from forward to backward.
    """

    @staticmethod
    def _plain_linear(base: nn.Module, states: list[DiffState], x: torch.Tensor) -> bool:
        """Whether the autograd functions of `functional.py` can compute this forward: an `nn.Linear` with one
        active adapter, outside autocast."""
        return type(base) is nn.Linear and len(states) == 1 and not torch.is_autocast_enabled(x.device.type)

    def _adapted_forward(self, states: list[DiffState], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        training = (
            self.training
            and self._plain_linear(base, states, x)
            # the training forwards give the frozen base weights no gradient
            and not any(param.requires_grad for param in base._parameters.values() if param is not None)
        )
        state = states[0]
        if training and all(state.is_sparse(name) for name in state.tensor_names):
            # the weight gradient is only needed at the kept positions: compute just those (see functional.py)
            diffs = {
                name: (state.positions(name, param.numel()), getattr(state, f"{name}_values"))
                for name, param in self.base_parameters().items()
                if name in state.tensor_names
            }
            return sparse_diff_linear(x, base.weight, base.bias, diffs.get("weight"), diffs.get("bias"))
        pooled = all(is_pool(state, name) for name in state.tensor_names)
        if training and pooled:
            return pool_linear(state, x, base)
        if pooled and not self.training and torch.is_grad_enabled() and self._plain_linear(base, states, x):
            # gradients in eval mode (scoring a regrowth, candidates.py): the deterministic gates, and the adapted
            # weight rebuilt in backward instead of one kept alive per layer until then
            return pool_linear(state, x, base, sample=False)
        gated = x.dtype == base.weight.dtype and "weight" in state.tensor_names
        if training and gated and not any(state.is_sparse(name) for name in state.tensor_names):
            diffs = {name: state.gate_inputs(name) for name in state.tensor_names}
            weights = state.penalty_weights()
            out, *penalties = gated_diff_linear(
                x, base.weight, base.bias, state.stretch, diffs["weight"], diffs.get("bias"), weights
            )
            if weights is not None:
                for name, penalty in zip(("weight", "bias"), penalties, strict=True):
                    if name in diffs:
                        state.record_penalty(name, penalty)
            return out
        return super()._adapted_forward(states, x, *args, **kwargs)
