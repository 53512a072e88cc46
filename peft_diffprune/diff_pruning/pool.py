"""The gated stage over a candidate pool: diffs and gate logits for a few chosen entries of each tensor only.

With `DiffPruningConfig(candidate_pool=c)` a targeted parameter `t` holds, instead of a dense diff and dense gate
logits, the flat positions of its pool entries (`{t}_pool_positions`, a persistent int32 buffer; int64 in a tensor
of more than 2^31 entries; checkpoints with int64 positions load into it) and one diff value and one gate logit per
entry (`{t}_diff` and `{t}_alpha`, 1-d parameters of the pool's length; `{t}_group_alpha` as in the dense state).
The hard-concrete gates, their expected-L0 penalty and the group gate are those of the
dense gated stage applied to these 1-d tensors, so every entry outside the pool is a closed gate: no diff, no
penalty term. The adapted parameter is `theta + scatter(positions, z * w)`, trained with the fixed-mask stage's
sparse forward (`functional.sparse_diff_linear`). Choosing and renewing the pool is in `candidates.py`.

The positions are kept sorted (regrowth puts its new entries in the closed entries' slots, then sorts the pool with
its diffs, logits and optimizer moments), which the sparse linear forward and projection need; positions loaded
unsorted are sorted where an order matters, into a copy (`sorted_pool`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DiffPruningConfig
from .functional import sparse_diff_linear


#: Placeholder position of a pool entry that was never loaded: the first use raises.
UNSET = -1


def position_dtype(numel: int) -> torch.dtype:
    """The dtype of a pool's positions in a tensor of `numel` entries: int32 (4 bytes an entry, not 8) wherever the
    positions fit, which is every tensor of at most 2^31 entries."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max + 1 else torch.int64


def is_pool(state, name: str) -> bool:
    """Whether parameter `name` of a diff state is in the pool state."""
    return hasattr(state, f"{name}_pool_positions")


def add_pool(
    state: nn.Module,
    name: str,
    base: torch.Tensor,
    count: int,
    config: DiffPruningConfig,
    positions: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Pool state for parameter `name`: `count` entries at flat `positions` (unset, to be loaded, if None), each with
    a diff (zero, or small and random with `init_weights=False`) and a gate logit `alpha_init`, in `dtype` (by
    default the base dtype, as `DiffState.add_gated`)."""
    kwargs = {"dtype": dtype or base.dtype, "device": base.device}
    dtype_of_positions = position_dtype(base.numel())
    if positions is None:
        positions = torch.full((count,), UNSET, dtype=dtype_of_positions)
    state.register_buffer(f"{name}_pool_positions", positions.to(base.device, dtype_of_positions), persistent=True)
    diff = torch.zeros(count, **kwargs)
    if not config.init_weights:
        diff.normal_(0.0, 0.02)
    state.register_parameter(f"{name}_diff", nn.Parameter(diff))
    state.register_parameter(f"{name}_alpha", nn.Parameter(torch.full((count,), config.alpha_init, **kwargs)))
    if config.structured:
        state.register_parameter(f"{name}_group_alpha", nn.Parameter(torch.full((1,), config.alpha_init, **kwargs)))
    state.pool_shapes[name] = tuple(base.shape)
    state.tensor_names.append(name)


def pool_positions(state, name: str) -> torch.Tensor:
    """The flat positions of a tensor's pool entries, checked once per change: set, in range, distinct."""
    positions = getattr(state, f"{name}_pool_positions")
    # `Module.to()` swaps `.data` without bumping `_version`: the storage pointer catches that
    key = ("pool", id(positions), positions._version, positions.data_ptr())
    cached = state._decoded.get(name)
    if cached is not None and cached[0] == key:
        return positions
    numel = 1
    for size in state.pool_shapes[name]:
        numel *= size
    where = f"{state.module_name}.{name}" if state.module_name else name
    if positions.numel() and (positions.min() < 0 or positions.max() >= numel):
        raise ValueError(
            f"The candidate pool of {where!r} holds positions outside its {numel} entries: the checkpoint was not "
            "loaded, is corrupt, or was made for another model (a gated pool checkpoint loads with "
            "PeftModel.from_pretrained or set_peft_model_state_dict)."
        )
    if positions.unique().numel() != positions.numel():
        raise ValueError(f"The candidate pool of {where!r} holds a position twice: the checkpoint is corrupt.")
    state._decoded[name] = (key, None)
    return positions


def sorted_pool(state, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(sorted positions, order)`: the pool's positions in increasing order and the permutation that sorts them,
    found once per change of the positions (every training forward of a linear layer asks for them).

    `select_pool` and `regrow_pool` keep a pool sorted, so `order` is None and the positions are the buffer
    itself: no copy, no gather of the diff. Only positions loaded unsorted (a checkpoint of an earlier version, an
    edited buffer) are sorted here, into a copy kept until they change.
    """
    positions = pool_positions(state, name)
    key, cached = state._decoded[name]
    if cached is None:
        if positions.numel() < 2 or bool((positions[1:] > positions[:-1]).all()):
            cached = (None, None)  # not the buffer itself: `Module.to()` would leave the old one alive here
        else:
            order = positions.argsort()
            cached = (positions[order], order)
        state._decoded[name] = (key, cached)
    return cached if cached[1] is not None else (positions, None)


def _in_order(values: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return values if order is None else values[order]


def pool_apply(state, name: str, base: torch.Tensor, sample: bool, group=None) -> torch.Tensor:
    """`base + scatter(positions, z * w)`, out of place, in the dtype of `base`."""
    delta = state.gated_delta(name, sample, group=group)
    return base.reshape(-1).index_add(0, pool_positions(state, name), delta.to(base.dtype)).view_as(base)


def pool_rows_delta(state, name: str, rows: torch.Tensor, sample: bool, group=None) -> torch.Tensor:
    """The diff of an embedding at the sorted `rows` only, `(len(rows), dim)`; every pool gate is sampled (and the
    penalty counts the whole pool), as the dense embedding path samples only the rows but penalises all gates."""
    delta = state.gated_delta(name, sample, group=group)
    positions = pool_positions(state, name)
    dim = state.pool_shapes[name][1]
    entry_rows = torch.div(positions, dim, rounding_mode="floor")
    index = torch.searchsorted(rows, entry_rows).clamp_(max=rows.numel() - 1)
    used = rows[index] == entry_rows
    flat = (index * dim + positions - entry_rows * dim)[used]
    out = torch.zeros(rows.numel() * dim, dtype=delta.dtype, device=delta.device)
    return out.index_add(0, flat, delta[used]).view(rows.numel(), dim)


def pool_linear(state, x: torch.Tensor, base: nn.Linear, sample: bool = True) -> torch.Tensor:
    """Forward of a linear layer whose diffs are all pools, with gradients: sampled gates (training) or the
    deterministic ones (`sample=False`), the weight gradient at the pool's entries only unless the base weight
    requires grad, the adapted weight rebuilt in backward."""
    diffs = {}
    for name in state.tensor_names:
        positions, order = sorted_pool(state, name)
        diffs[name] = (positions, _in_order(state.gated_delta(name, sample=sample), order))
    return sparse_diff_linear(x, base.weight, base.bias, diffs.get("weight"), diffs.get("bias"))


def pool_sparse_delta(state, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero entries of a pool's diff under the deterministic gate, `(positions, values)`, sorted."""
    positions, order = sorted_pool(state, name)
    delta = _in_order(state.gated_delta(name, sample=False).detach(), order)
    nonzero = delta.nonzero().squeeze(1)
    return positions[nonzero], delta[nonzero]


def pool_candidates(state, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pool entry as `(sorted positions, diff under the deterministic gate)`, for projection."""
    positions, order = sorted_pool(state, name)
    return positions, _in_order(state.gated_delta(name, sample=False).detach().float(), order)
