"""Choosing and renewing the candidate pool of the gated stage (`DiffPruningConfig(candidate_pool=...)`).

An entry's score is the magnitude of the task loss's gradient with respect to it, summed over a few batches: the
first-order change of the loss a diff there could buy (the "grow" criterion of RigL and SpIEL). The gradient of each
base weight is formed by autograd one tensor at a time; a hook folds it into a running top list of
`(position, score)` pairs and frees it, so no dense gradient or score of the whole model is ever held: at most one
tensor's gradient (what full fine-tuning's backward holds too) and twice the pool's size in pairs.

Regrowth ([`regrow_pool`]) drops the entries whose gates closed (deterministic gate exactly 0) and puts in their
slots the best-scoring entries of the same tensor that are not in the pool, so a tensor's pool never grows and the
parameters (and an optimizer built on them) stay the same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .checkpointing import checkpointing_in_eval
from .gates import deterministic_gate
from .layer import DiffState
from .model import get_tuner
from .pool import add_pool, is_pool, pool_positions, position_dtype
from .sparse import _kth_largest, _kth_value, _positions_at_least, base_parameter_count


def _default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


class _RunningTop:
    """The best-scoring `(position, score)` pairs of some tensors, scores summed over the gradients added.

    `sizes[key]` caps what one tensor keeps; `total` (if given) caps all tensors together, ranked with one
    threshold. Pairs already kept accumulate exactly; a new position enters when its score beats the threshold of
    the last pruning (an approximation of the sum that keeps the state to at most twice the caps). A pair is 8
    bytes (int32 positions where a tensor has fewer than 2^31 entries, fp32 scores), and pruning makes no copy of
    all pairs: choosing a 16x pool for BERT-base holds 17 million pairs.
    """

    def __init__(
        self, sizes: dict[str, int], total: int | None = None, exclude: dict[str, torch.Tensor] | None = None
    ):
        self.sizes, self.total, self.exclude = sizes, total, exclude or {}
        self.positions = {key: torch.empty(0, dtype=torch.int64) for key in sizes}
        self.scores = {key: torch.empty(0) for key in sizes}
        self.thresholds = dict.fromkeys(sizes, 0.0)

    def add(self, key: str, grad: torch.Tensor) -> None:
        """Fold `|grad|` in; `grad` is consumed (its absolute value is taken in place when it is fp32)."""
        scores = grad.detach().reshape(-1)
        scores = scores.abs_() if scores.dtype == torch.float32 else scores.abs().float()
        if bool(scores.isnan().any()):
            raise ValueError(
                f"The task loss's gradient with respect to {key!r} has NaN entries, so no candidate pool can be "
                "ranked: choose or regrow the pool from batches whose loss and gradients are finite (check the "
                "inputs, the labels and the model's weights)."
            )
        excluded = self.exclude.get(key)
        if excluded is not None:
            scores[excluded] = 0.0
        known = self.positions[key].to(scores.device)
        known_scores = self.scores[key].to(scores.device) + scores[known]
        scores[known] = 0.0
        # the best `size` that beat the last pruning's threshold: O(size) indices, never one per entry of the tensor.
        # Where the size's own threshold is no higher, that is every entry above the pruning's (one pass, no top-k)
        size, threshold = self.sizes[key], self.thresholds[key]
        if size == 0:
            new = torch.empty(0, dtype=torch.int64, device=scores.device)
        elif size < scores.numel() and (top := _kth_value(scores, size)) > threshold:
            new = _positions_at_least(scores, top, size, sort=False)
        else:
            new = (scores > threshold).nonzero().squeeze(1)
        self.positions[key] = torch.cat([known, new.to(position_dtype(scores.numel()))]).cpu()
        self.scores[key] = torch.cat([known_scores, scores[new]]).cpu()
        if self.total is None:
            if self.positions[key].numel() > 2 * self.sizes[key]:
                self._prune([key], self.sizes[key])
        elif sum(p.numel() for p in self.positions.values()) > 2 * self.total:
            self._prune(list(self.sizes), self.total)

    def _prune(self, keys: list[str], size: int) -> None:
        """Keep the `size` best pairs of `keys` together (ties to the first, in key order); raise their threshold."""
        if sum(self.scores[key].numel() for key in keys) <= size:
            return
        threshold = _kth_largest([self.scores[key] for key in keys], size) if size else float("inf")
        ties = size - sum(int(torch.count_nonzero(self.scores[key] > threshold)) for key in keys)
        for key in keys:
            scores = self.scores[key]
            keep = scores > threshold
            at = (scores == threshold).nonzero().squeeze(1)
            keep[at[:ties]] = True
            ties = max(ties - at.numel(), 0)
            self.positions[key], self.scores[key] = self.positions[key][keep], scores[keep]
            self.thresholds[key] = threshold

    def result(self) -> dict[str, torch.Tensor]:
        """The kept positions of every tensor, sorted, within the caps."""
        if self.total is not None:
            self._prune(list(self.sizes), self.total)
        else:
            for key, size in self.sizes.items():
                self._prune([key], size)
        return {key: positions.sort().values.long() for key, positions in self.positions.items()}


def _score(model: nn.Module, tensors: dict[str, nn.Parameter], batches, running: _RunningTop, loss_fn) -> None:
    """Add `|d loss / d theta|` of every tensor in `tensors` for each batch to `running`, in eval mode (no dropout:
    the scores, and so the pool, depend on the batches only); no other gradient is accumulated. Layers with
    transformers' gradient checkpointing on checkpoint here too (`checkpointing_in_eval`), so scoring takes no more
    activation memory than a training step."""
    params = list(tensors.values())
    flags = [param.requires_grad for param in params]
    handles = []

    def fold(key):
        def hook(param):
            running.add(key, param.grad)
            param.grad = None

        return hook

    for key, param in tensors.items():
        param.requires_grad_(True)
        handles.append(param.register_post_accumulate_grad_hook(fold(key)))
    training = model.training
    model.eval()
    try:
        with checkpointing_in_eval(model):
            for batch in batches:
                torch.autograd.backward(loss_fn(model, batch), inputs=params)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
        for param, flag in zip(params, flags, strict=True):
            param.requires_grad_(flag)
            param.grad = None


def _from_rank_zero(chosen: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's positions on every rank (each rank scored its own batches); unchanged when not distributed."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return chosen
    keys = list(chosen)
    counts = torch.tensor([chosen[key].numel() for key in keys], dtype=torch.int64, device=device)
    dist.broadcast(counts, 0)
    flat = torch.cat([chosen[key] for key in keys]).to(device) if dist.get_rank() == 0 else None
    if flat is None:
        flat = torch.empty(int(counts.sum()), dtype=torch.int64, device=device)
    dist.broadcast(flat, 0)
    return dict(zip(keys, (part.cpu() for part in flat.split(counts.tolist())), strict=True))


def _check_pool_adapter(model: nn.Module, adapter_name: str | None):
    tuner = get_tuner(model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    config = tuner.peft_config[adapter_name]
    if config.candidate_pool is None:
        raise ValueError(
            f"Adapter {adapter_name!r} has no candidate pool: create it with DiffPruningConfig(candidate_pool=4.0) "
            "(the pool's size as a multiple of the budget)."
        )
    if config.kept_pattern:
        raise ValueError(
            f"Adapter {adapter_name!r} was projected already: its pool is gone (see project_to_sparsity)."
        )
    for layer in tuner.diff_layers().values():
        state = dict(layer.diff_pruning_state.items()).get(adapter_name)
        if state is not None and state.is_sharded():
            raise ValueError(
                "The candidate pool is chosen and renewed on an unsharded model: call select_pool before "
                "sharding it with FSDP, and set pool_regrow_steps=0 for sharded training (see docs/distributed.md)."
            )
    return tuner, adapter_name, config


def select_pool(
    model: nn.Module,
    batches: Iterable[dict],
    adapter_name: str | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
) -> dict[str, int]:
    """Choose the candidate pool of an adapter created with `DiffPruningConfig(candidate_pool=c)`.

    The pool is the `round(c * target_sparsity * N)` entries (`N` as in [`project_to_sparsity`]) with the largest
    `|d loss / d theta|` summed over `batches` (see the module docstring), ranked over all targeted tensors
    together. Each tensor gets one diff value (0) and one gate logit (`alpha_init`) per pool entry and nothing else;
    `config.pool_pattern` records the counts, so that a saved gated checkpoint rebuilds the same layers. Under
    `torch.distributed` every rank gets rank 0's pool. Call it before wrapping the model in DDP or FSDP and before
    creating the optimizer: the adapter's parameters are new. `loss_fn(model, batch)` gives the loss (default
    `model(**batch).loss`). Returns `pool_pattern`.
    """
    tuner, adapter_name, config = _check_pool_adapter(model, adapter_name)
    entries = {}
    for module_name, layer in tuner.diff_layers().items():
        if adapter_name in layer.diff_pruning_state:
            for name, param in layer.base_parameters().items():
                if name not in layer._shared_diff[1]:
                    entries[f"{module_name}.{name}"] = (layer, name, param)
    numel = sum(param.numel() for _, _, param in entries.values())
    size = min(round(config.candidate_pool * config.target_sparsity * base_parameter_count(tuner)), numel)
    running = _RunningTop({key: min(size, param.numel()) for key, (_, _, param) in entries.items()}, total=size)
    _score(model, {key: param for key, (_, _, param) in entries.items()}, batches, running, loss_fn or _default_loss)
    device = next(iter(entries.values()))[2].device
    chosen = _from_rank_zero(running.result(), device)

    states: dict[int, DiffState] = {}
    for key, (layer, name, param) in entries.items():
        state = states.setdefault(id(layer), DiffState(config.stretch, key.rpartition(".")[0]))
        if chosen[key].numel():
            dtype = torch.promote_types(param.dtype, torch.float32)  # as PEFT's autocast_adapter_dtype does
            add_pool(state, name, param, chosen[key].numel(), config, positions=chosen[key], dtype=dtype)
    for layer in tuner.diff_layers().values():
        if id(layer) in states:
            layer.diff_pruning_state[adapter_name] = states[id(layer)].train(layer.training)
            layer._eval_cache = None
            layer.set_adapter(layer.active_adapters, inference_mode=config.inference_mode)
    config.pool_pattern = {key: chosen[key].numel() for key in entries if chosen[key].numel()}
    return dict(config.pool_pattern)


def _entry_state(param: nn.Parameter, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """A pool parameter, its optimizer moments (tensors of its shape) and its gradient: what is kept per entry."""
    moments = optimizer.state.get(param, {}) if optimizer is not None else {}
    values = [param] + [v for v in moments.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]
    return values if param.grad is None else [*values, param.grad]


def _dropped_slots(state, name: str, fraction: float) -> torch.Tensor:
    """The slots of a tensor's pool that a regrowth empties: the closed entries (ascending), then with
    `fraction > 0` the `round(fraction * n)` open ones with the smallest `|z * w|` under the deterministic gate
    (smallest first, ties to the lowest slot), so that fewer new candidates than slots fill the closed ones first."""
    with torch.no_grad():
        gate = deterministic_gate(getattr(state, f"{name}_alpha").detach(), state.stretch)
        closed = gate == 0
        slots = closed.nonzero().squeeze(1)
        count = min(round(fraction * gate.numel()), gate.numel() - slots.numel())
        if count <= 0:
            return slots
        magnitude = (gate.float() * getattr(state, f"{name}_diff").detach().float()).abs_()
        magnitude[closed] = float("inf")  # dropped already: not among the open ones
        return torch.cat([slots, torch.sort(magnitude, stable=True).indices[:count]])


def regrow_pool(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer | None = None,
    adapter_name: str | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
) -> int:
    """Drop the pool entries whose gates closed and regrow as many new candidates, tensor by tensor, in place.

    A closed entry (deterministic gate exactly 0: it contributes nothing and would be cut by projection) frees its
    slot; so do, with `config.pool_regrow_fraction = f > 0`, the `round(f * n)` open entries of each tensor's pool of
    `n` with the smallest `|z * w|` under the deterministic gate (SpIEL drops by magnitude too). Each slot takes
    the entry of the same tensor outside the pool with the largest `|d loss / d theta|` summed over `batches` (at
    the current adapted weights), closed slots first, with a zero diff, the logit `alpha_init`, and, if `optimizer`
    is given, zeroed optimizer moments (and gradients). The pool is then sorted by position again, each entry's
    diff, logit, moments and gradient moved with it. So no tensor's pool ever grows and no parameter is replaced:
    a training loop keeps its optimizer (pass it, or the new entries inherit the moments of the dropped ones). Under
    `torch.distributed` every rank takes rank 0's new entries. Returns the number of entries regrown.
    """
    tuner, adapter_name, config = _check_pool_adapter(model, adapter_name)
    if not config.pool_pattern:
        raise ValueError(f"Adapter {adapter_name!r} has no pool yet: call select_pool first.")
    entries, dropped = {}, {}
    for module_name, layer in tuner.diff_layers().items():
        state = dict(layer.diff_pruning_state.items()).get(adapter_name)
        if state is None:
            continue
        base = layer.base_parameters()
        for name in state.tensor_names:
            if is_pool(state, name):
                slots = _dropped_slots(state, name, config.pool_regrow_fraction)
                if slots.numel():
                    key = f"{module_name}.{name}"
                    entries[key], dropped[key] = (state, name, base[name]), slots
    if not entries:
        return 0
    exclude = {key: pool_positions(state, name) for key, (state, name, _) in entries.items()}
    running = _RunningTop({key: slots.numel() for key, slots in dropped.items()}, exclude=exclude)
    _score(model, {key: param for key, (_, _, param) in entries.items()}, batches, running, loss_fn or _default_loss)
    device = next(iter(entries.values()))[2].device
    grown = _from_rank_zero(running.result(), device)
    count = 0
    with torch.no_grad():
        for key, (state, name, _) in entries.items():
            new = grown[key].to(device)
            slots = dropped[key][: new.numel()].to(device)
            positions = getattr(state, f"{name}_pool_positions")
            positions[slots] = new.to(positions.dtype)
            diff, alpha = getattr(state, f"{name}_diff"), getattr(state, f"{name}_alpha")
            diff[slots] = 0.0
            alpha[slots] = config.alpha_init
            per_entry = [_entry_state(param, optimizer) for param in (diff, alpha)]
            for _, *moments_and_grad in per_entry:
                for value in moments_and_grad:
                    value[slots] = 0
            # sorted again, everything per entry with it, so training forwards need no sorted copy (pool.sorted_pool)
            order = positions.argsort()
            for value in [positions, *(v for values in per_entry for v in values)]:
                value.copy_(value[order])
            count += new.numel()
    for layer in tuner.diff_layers().values():
        layer._eval_cache = None
    return count
