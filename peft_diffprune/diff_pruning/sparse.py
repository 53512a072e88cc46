"""Projection of a learned diff to an exact sparsity, sparsity reports, and sparse diffs from fine-tuned models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import PeftModel, get_peft_model
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from .config import DiffPruningConfig
from .distributed import is_fsdp1_parameter, sharded_top_entries
from .fingerprint import base_fingerprint
from .gates import deterministic_gate
from .layer import DiffState
from .model import DiffPruningModel, get_tuner
from .pool import is_pool, pool_candidates


@dataclass
class TensorSparsity:
    """One targeted parameter: its size, the entries its diff holds (`kept`) and how many are non-zero."""

    name: str
    parameters: int
    kept: int
    nonzero: int

    @property
    def density(self) -> float:
        return self.nonzero / self.parameters if self.parameters else 0.0


@dataclass
class SparsityReport:
    """Per-tensor and total sparsity of one adapter. `total_parameters` is the base model's parameter count outside
    `modules_to_save` (the paper's denominator), so `density` is the fraction of the model the diff changes."""

    adapter_name: str
    total_parameters: int
    tensors: list[TensorSparsity] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tensors)

    @property
    def nonzero(self) -> int:
        return sum(t.nonzero for t in self.tensors)

    @property
    def density(self) -> float:
        return self.nonzero / self.total_parameters

    def by_module(self) -> dict[str, TensorSparsity]:
        return {t.name: t for t in self.tensors}

    def __str__(self) -> str:
        width = max([len(t.name) for t in self.tensors] + [len("total")])
        lines = [f"{'tensor':<{width}}  {'params':>11}  {'kept':>9}  {'nonzero':>9}  density"]
        lines += [
            f"{t.name:<{width}}  {t.parameters:>11,}  {t.kept:>9,}  {t.nonzero:>9,}  {t.density:.4%}"
            for t in self.tensors
        ]
        lines.append(
            f"{'total':<{width}}  {self.total_parameters:>11,}  {self.kept:>9,}  {self.nonzero:>9,}  {self.density:.4%}"
        )
        return "\n".join(lines)


def base_parameter_count(tuner: DiffPruningModel) -> int:
    """Parameters of the base model outside `modules_to_save`, adapter state excluded, tied weights counted once."""
    aux_prefixes = tuple(
        f"{name}." for name, module in tuner.model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)
    )
    return sum(
        param.numel()
        for name, param in tuner.model.named_parameters()
        if ".diff_pruning_state." not in name and not name.startswith(aux_prefixes)
    )


def _adapter_tensors(tuner: DiffPruningModel, adapter_name: str):
    """Yield `(module name, layer, state, parameter name, base parameter)` for every diffed tensor of an adapter."""
    for module_name, layer in tuner.diff_layers().items():
        if adapter_name not in layer.diff_pruning_state:
            continue
        state = layer.diff_pruning_state[adapter_name]
        base_params = layer.base_parameters()
        for name in state.tensor_names:
            yield module_name, layer, state, name, base_params[name]


@torch.no_grad()
def _effective_diff(state: DiffState, name: str, base: torch.Tensor) -> torch.Tensor:
    """The diff as a dense fp32 tensor: `z * w` with the deterministic gate, or the scattered sparse values."""
    return state.apply(name, torch.zeros(base.shape, dtype=torch.float32, device=base.device), sample=False)


@torch.no_grad()
def _candidates(state: DiffState, name: str, base: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The entries projection ranks: a pool's `(sorted positions, diffs)`, or `(None, the whole flat diff)`."""
    if is_pool(state, name):
        return pool_candidates(state, name)
    return None, _effective_diff(state, name, base).reshape(-1)


@torch.no_grad()
def sparsity_report(model: nn.Module, adapter_name: str | None = None) -> SparsityReport:
    """Per targeted tensor and in total: parameters, kept entries, non-zeros and density of an adapter's diff.

    In the gated state the diff is taken with the deterministic gate and `kept` counts open gates; after projection
    `kept` is the number of stored entries.
    """
    tuner = get_tuner(model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    report = SparsityReport(adapter_name, base_parameter_count(tuner))
    for module_name, _, state, name, base in _adapter_tensors(tuner, adapter_name):
        diff = _effective_diff(state, name, base)
        kept = getattr(state, f"{name}_values").numel() if state.is_sparse(name) else _open_gates(state, name)
        report.tensors.append(TensorSparsity(f"{module_name}.{name}", base.numel(), kept, int(diff.count_nonzero())))
    return report


def _open_gates(state: DiffState, name: str) -> int:
    gate = deterministic_gate(getattr(state, f"{name}_alpha"), state.stretch)
    group = state.group_gate(name, sample=False)
    if group is not None and float(group) == 0.0:
        return 0
    return int(gate.count_nonzero())


@torch.no_grad()
def _ranking_key(state: DiffState, name: str, diff: torch.Tensor, fill: str) -> torch.Tensor:
    """What projection ranks the entries of one diff by, the largest first: `|z * w|`, and with `fill="gate"` the
    entries whose gate is closed (`z * w == 0`) below every other entry, ranked among themselves by the gate's
    probability times the diff, `sigmoid(alpha) * |w|` (as `-1 / (sigmoid(alpha) * |w|)`, which keeps the order and
    puts them under 0). A sparse diff (no gates) and `fill="position"` rank by `|z * w|` alone."""
    magnitude = diff.abs()
    if fill == "position" or state.is_sparse(name):
        return magnitude
    alpha, w = getattr(state, f"{name}_alpha"), getattr(state, f"{name}_diff")
    signal = torch.sigmoid(alpha.float()).mul_(w.float().abs()).reshape(magnitude.shape)
    return torch.where(magnitude > 0, magnitude, -signal.reciprocal())


#: Size (in entries) from which [`_top_positions`] finds its threshold by bisection ([`_kth_largest`]) instead of
#: `torch.topk`, whose CPU kernel copies the whole input into (value, index) pairs: 16 bytes per entry, 375 MiB for
#: BERT-base's word embedding, which set the peak of choosing a candidate pool. On a 3072 x 768 weight the two take
#: about as long (83 and 70 ms on 2 threads).
BISECTION_MIN_ENTRIES = 1 << 20


def _ordered_float(order: int) -> float:
    """The fp32 value at `order` in the order-preserving map of fp32 values to integers (`order >= 0`: the bits of a
    non-negative float; `order < 0`: the negative float whose magnitude has the bits `-order - 1`)."""
    bits = order if order >= 0 else (0x80000000 | (-order - 1))
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def _kth_largest(values: list[torch.Tensor], k: int) -> float | None:
    """The `k`-th largest of the fp32 `values` of several tensors together (`k >= 1`), or None if fewer than `k` of
    them are numbers (NaN is not counted).

    Found by bisection on the order of fp32 values (32 passes, each counting `values >= t` in place): no copy of the
    tensors, no concatenation and no `topk` workspace, at most one boolean mask of a tensor at a time.
    """

    def count(order: int) -> int:
        threshold = _ordered_float(order)
        return sum(int(torch.count_nonzero(v >= threshold)) for v in values)

    low, high = -0x7F800000 - 1, 0x7F800000  # -inf, +inf: count(>= low) >= k, count(>= high + 1) < k
    if count(low) < k:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if count(middle) >= k:
            low = middle
        else:
            high = middle - 1
    return _ordered_float(low)


def _top_positions(magnitudes: torch.Tensor, k: int, sort: bool = True) -> torch.Tensor:
    """Flat positions of the `k` largest entries, sorted (else those above the threshold first, then the ties);
    ties at the threshold go to the lowest positions."""
    if k >= magnitudes.numel():
        return torch.arange(magnitudes.numel(), device=magnitudes.device)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=magnitudes.device)
    return _positions_at_least(magnitudes, _kth_value(magnitudes, k), k, sort)


def _kth_value(magnitudes: torch.Tensor, k: int):
    """The `k`-th largest entry of a flat tensor (`1 <= k < numel`): by bisection for large fp32 tensors, else topk."""
    threshold = None
    if magnitudes.dtype == torch.float32 and magnitudes.numel() >= BISECTION_MIN_ENTRIES:
        threshold = _kth_largest([magnitudes], k)  # None with NaNs: topk ranks them first
    if threshold is None:
        threshold = torch.topk(magnitudes, k, sorted=False).values.min()
    return threshold


def _positions_at_least(magnitudes: torch.Tensor, threshold, k: int, sort: bool = True) -> torch.Tensor:
    """The positions of the entries above `threshold`, then of those equal to it up to `k` in all (the lowest)."""
    above = (magnitudes > threshold).nonzero().squeeze(1)
    at = (magnitudes == threshold).nonzero().squeeze(1)[: k - above.numel()]
    positions = torch.cat([above, at])
    return positions.sort().values if sort else positions


def _fill_with_zeros(kept_entries, numels: list[int], budget: int, budgets: list[int] | None):
    """Fill a pool's budget as the dense ranking fills it: its non-zero entries, then zero entries at the lowest
    positions whose diff is zero (in or outside the pool), in module order (`budget`, global) or per tensor
    (`budgets`). Projecting a pool so gives the dense projection of a diff that is zero outside the pool."""
    nonzero = [(positions[values != 0], values[values != 0]) for positions, values in kept_entries]
    left = budget - sum(positions.numel() for positions, _ in nonzero) if budgets is None else 0
    filled = []
    for i, ((positions, values), numel) in enumerate(zip(nonzero, numels, strict=True)):
        count = min(left if budgets is None else budgets[i] - positions.numel(), numel - positions.numel())
        span = torch.arange(count + positions.numel(), device=positions.device)
        free = span[~torch.isin(span, positions)][:count]
        left -= free.numel()
        order = torch.cat([positions, free]).argsort()
        filled.append(
            (torch.cat([positions, free])[order], torch.cat([values, values.new_zeros(free.numel())])[order])
        )
    return filled


def _sharded_projection(entries, target_sparsity: float, scope: str, total: int, fill: str):
    """`(positions, values)` of every entry of an FSDP2-sharded gated adapter, ranked without gathering it."""
    if any(state.is_sparse(name) for _, _, state, name, _ in entries):
        raise ValueError("Projecting an already sparse adapter under FSDP is not supported; project it unsharded.")
    diffs = [state.gated_delta(name, sample=False) for _, _, state, name, _ in entries]
    keys = [_ranking_key(state, name, d, fill) for (_, _, state, name, _), d in zip(entries, diffs, strict=True)]
    if scope == "global":
        groups = [list(range(len(diffs)))]
        budgets = [min(round(target_sparsity * total), sum(d.numel() for d in diffs))]
    else:
        groups = [[i] for i in range(len(diffs))]
        budgets = [round(target_sparsity * d.numel()) for d in diffs]
    return sharded_top_entries(diffs, groups, budgets, _top_positions, keys)


@torch.no_grad()
def project_to_sparsity(
    model: nn.Module,
    target_sparsity: float | None = None,
    scope: Literal["global", "per_module"] = "global",
    adapter_name: str | None = None,
    fill: Literal["gate", "position"] = "position",
) -> SparsityReport:
    """Keep the largest `|z * w|` entries of an adapter's diff and switch its layers to the sparse state.

    Exactly `round(target_sparsity * N)` entries are kept, `N` being the base model's parameter count outside
    `modules_to_save`. `scope="global"` ranks all tensors together with one threshold (the paper);
    `"per_module"` keeps `round(target_sparsity * numel)` entries of each tensor. When the gates left fewer entries
    open than the budget, `fill` says which closed ones (value 0, trained by the fixed-mask stage) make it up:
    `"gate"` the largest `sigmoid(alpha) * |w|` (the gates nearest to opening on the largest diffs), `"position"`
    the lowest flat positions. Remaining ties go to the lowest flat positions (in module order), so the result is
    deterministic. Afterwards each layer holds only the
    kept positions and values (no gates, no penalty); tensors with nothing kept carry no adapter state. Create the
    optimizer after projecting: the trainable parameters are new.

    A candidate pool (`DiffPruningConfig.candidate_pool`) ranks its entries only (every other entry is a closed
    gate): the same entries as the dense ranking of a diff that is zero outside the pool, as long as the budget does
    not exceed the pool's non-zero entries (past that, the remainder comes from the pool's lowest positions).

    Returns the [`SparsityReport`] of the projected adapter.
    """
    tuner = get_tuner(model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    config: DiffPruningConfig = tuner.peft_config[adapter_name]
    target_sparsity = config.target_sparsity if target_sparsity is None else target_sparsity
    if not 0 < target_sparsity <= 1:
        raise ValueError(f"target_sparsity must be in (0, 1], got {target_sparsity!r} (0.005 keeps 0.5%).")
    if scope not in ("global", "per_module"):
        raise ValueError(f"scope must be 'global' or 'per_module', got {scope!r}.")
    if fill not in ("gate", "position"):
        raise ValueError(f"fill must be 'gate' or 'position', got {fill!r}.")
    if any(layer.merged for layer in tuner.diff_layers().values()):
        raise ValueError("Unmerge the adapter (model.unmerge_adapter()) before projecting it.")

    entries = list(_adapter_tensors(tuner, adapter_name))
    if not entries:
        raise ValueError(f"Adapter {adapter_name!r} has no diff to project.")
    states = [state for _, _, state, _, _ in entries]
    if any(is_fsdp1_parameter(t) for state in states for n in state.tensor_names for t in state.tensors(n)):
        # switching layers to the sparse state inside FSDP1's flat parameters would break its state dict
        raise ValueError(
            "project_to_sparsity cannot change a model wrapped in FSDP1 (FullyShardedDataParallel). Load its adapter "
            "state into an unwrapped model and project that: set_peft_model_state_dict(model, "
            "get_peft_model_state_dict(wrapped)) (this gathers the model), or shard with FSDP2 (fully_shard), where "
            "projection ranks the shards in place; see docs/distributed.md."
        )
    total = base_parameter_count(tuner)
    sharded = any(state.is_sharded() for state in states)
    if fill == "gate" and any(is_pool(state, name) for _, _, state, name, _ in entries):
        raise ValueError(
            "fill='gate' ranks a dense gated diff's closed entries; a candidate pool renews its closed entries by "
            "regrowth instead (pool_regrow_steps) and is filled like a diff that is zero outside it: project it "
            "with fill='position'."
        )
    if sharded and any(is_pool(state, name) for _, _, state, name, _ in entries):
        raise ValueError(
            "Projecting a candidate pool on a sharded model is not supported: gather its adapter state into an "
            "unsharded model and project that (see docs/distributed.md)."
        )
    if sharded:
        kept_entries = _sharded_projection(entries, target_sparsity, scope, total, fill)
    else:
        candidates = [_candidates(state, name, base) for _, _, state, name, base in entries]
        diffs = [values for _, values in candidates]
        keys = [
            _ranking_key(state, name, d, fill).cpu() for (_, _, state, name, _), d in zip(entries, diffs, strict=True)
        ]
        if scope == "global":
            budget = min(round(target_sparsity * total), sum(entry[4].numel() for entry in entries))
            selected = _top_positions(torch.cat(keys), budget)
            del keys
            offsets = torch.tensor([0] + [d.numel() for d in diffs]).cumsum(0)
            bounds = torch.searchsorted(selected, offsets)
            positions = [selected[bounds[i] : bounds[i + 1]] - offsets[i] for i in range(len(diffs))]
        else:
            positions = [
                _top_positions(key, round(target_sparsity * entry[4].numel()))
                for key, entry in zip(keys, entries, strict=True)
            ]
        kept_entries = []
        for (pool, d), kept in zip(candidates, positions, strict=True):
            kept = kept.to(d.device)
            kept_entries.append((kept if pool is None else pool[kept], d[kept]))
        if any(pool is not None for pool, _ in candidates):
            numels = [entry[4].numel() for entry in entries]
            if scope == "global":
                kept_entries = _fill_with_zeros(kept_entries, numels, budget, None)
            else:
                kept_entries = _fill_with_zeros(kept_entries, numels, 0, [round(target_sparsity * n) for n in numels])

    kept_pattern = {}
    new_states: dict[str, DiffState] = {}
    for (module_name, _, state, name, base), (kept, values) in zip(entries, kept_entries, strict=True):
        if not kept.numel():
            continue
        kept_pattern[f"{module_name}.{name}"] = kept.numel()
        new_state = new_states.setdefault(module_name, DiffState(state.stretch, module_name))
        new_state.add_sparse(
            name, base, kept.numel(), config, positions=kept, values=values, dtype=state.diff_dtype(name)
        )
        # not an FSDP-managed parameter: trained as is, its gradient would not be reduced over the ranks
        new_state.outside_fsdp = sharded

    layers = tuner.diff_layers()
    layer_names = {id(layer): name for name, layer in layers.items()}
    for module_name, layer in layers.items():
        if adapter_name not in layer.diff_pruning_state:
            continue
        owner, shared_names = layer._shared_diff
        shares_kept = owner is not None and any(
            f"{layer_names.get(id(owner))}.{n}" in kept_pattern for n in shared_names
        )
        if module_name in new_states:
            layer.diff_pruning_state[adapter_name] = new_states[module_name]
        elif shares_kept:
            # a tied module (an LM head) keeps applying the kept entries of the weight it shares with its owner
            layer.diff_pruning_state[adapter_name] = DiffState(config.stretch, module_name)
        else:
            del layer.diff_pruning_state[adapter_name]
        layer._eval_cache = None
        if not len(layer.diff_pruning_state):
            # nothing kept here and no other adapter: unwrap, as a model rebuilt from the saved config would be
            parent, _, child_name = module_name.rpartition(".")
            tuner._replace_module(tuner.model.get_submodule(parent), child_name, layer.get_base_layer(), layer)
            continue
        layer.set_adapter(layer.active_adapters, inference_mode=config.inference_mode)

    config.kept_pattern = kept_pattern
    config.target_sparsity = target_sparsity
    # a projected adapter is rebuilt from its saved state: layers must start with an invalid code, so that a file
    # that lacks some tensors fails loudly instead of acting as random diffs
    config.init_weights = True
    config.base_fingerprint = base_fingerprint(tuner, list(kept_pattern))
    return sparsity_report(model, adapter_name)


@torch.no_grad()
def from_finetuned(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    target_sparsity: float = 0.005,
    scope: Literal["global", "per_module"] = "global",
    adapter_name: str = "default",
    **config_kwargs,
) -> PeftModel:
    """Non-adaptive diff pruning: the sparse diff between a fully fine-tuned model and its base, as an adapter.

    The diff `finetuned - base` of every targeted parameter is magnitude-projected to `target_sparsity` (see
    [`project_to_sparsity`]); modules in `modules_to_save` (the task head) are copied from the fine-tuned model in
    full. `config_kwargs` go to [`DiffPruningConfig`] (e.g. `task_type="SEQ_CLS"`). `base_model` is wrapped in
    place and returned as a `PeftModel` in the sparse state, ready to save or to fine-tune with the mask fixed.
    """
    finetuned_params = dict(finetuned_model.named_parameters())
    base_shapes = {name: tuple(param.shape) for name, param in base_model.named_parameters()}
    tuned_shapes = {name: tuple(param.shape) for name, param in finetuned_params.items()}
    if base_shapes != tuned_shapes:
        name = sorted(set(base_shapes).symmetric_difference(tuned_shapes)) or [
            n for n in base_shapes if base_shapes[n] != tuned_shapes[n]
        ]
        raise ValueError(
            f"The fine-tuned model and the base model differ at {name[0]!r} (base: {base_shapes.get(name[0])}, "
            f"fine-tuned: {tuned_shapes.get(name[0])}): they must share an architecture, task head included."
        )
    config = DiffPruningConfig(target_sparsity=target_sparsity, **config_kwargs)
    peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
    tuner = get_tuner(peft_model)
    for module_name, _, state, name, base in _adapter_tensors(tuner, adapter_name):
        tuned = finetuned_params[f"{module_name}.{name}"]
        getattr(state, f"{name}_diff").copy_(tuned.float() - base.float())
        # open every gate fully: the deterministic gate is exactly 1 for large logits
        getattr(state, f"{name}_alpha").fill_(max(config.alpha_init, 10.0))
        if hasattr(state, f"{name}_group_alpha"):
            getattr(state, f"{name}_group_alpha").fill_(max(config.alpha_init, 10.0))
    for name, module in tuner.model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in getattr(module, "modules_to_save", {}):
            module.modules_to_save[adapter_name].load_state_dict(finetuned_model.get_submodule(name).state_dict())
    project_to_sparsity(peft_model, target_sparsity, scope=scope, adapter_name=adapter_name)
    return peft_model
