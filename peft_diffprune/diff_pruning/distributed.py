"""Diff pruning on a model sharded with FSDP: what has to see the whole model, computed from the local shards.

Outside its forward, an FSDP model's parameters hold only this rank's shard: FSDP2 (`fully_shard`) makes them
`DTensor`s sharded on dim 0, FSDP1 (`FullyShardedDataParallel(use_orig_params=True)`) makes them flat 1-d views of
this rank's part of a flat parameter (empty on ranks that hold none of it). The functions here reduce over the
ranks instead of gathering the parameters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .gates import L0Weights, combine_penalty, l0_shift


def is_fsdp1_parameter(tensor: torch.Tensor) -> bool:
    """Whether FSDP1 manages `tensor` (it marks the original parameters it flattens)."""
    return getattr(tensor, "_fsdp_flattened", False)


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an FSDP shard: an FSDP2 `DTensor`, or a parameter FSDP1 manages."""
    return isinstance(tensor, DTensor) or is_fsdp1_parameter(tensor)


def local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's entries of a tensor of a sharded model, flat, and the flat position of the first: the local
    shard of an FSDP2 `DTensor`; FSDP1's flat view of this rank's part (its position is not needed here: 0); a
    whole tensor on rank 0 and nothing elsewhere (FSDP2 keeps the parameters of the root module gathered after a
    forward, the same on every rank).
    """
    if isinstance(tensor, DTensor):
        return tensor.to_local().reshape(-1), local_start(tensor)
    if is_fsdp1_parameter(tensor) or dist.get_rank() == 0:
        return tensor.reshape(-1), 0
    return tensor.reshape(-1)[:0], 0


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly FSDP2-sharded) tensor; collective for a `DTensor`."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What `get_peft_model_state_dict` and `save_pretrained` read of an FSDP2 model (`state_dict=`), gathered.

    The entries of `model.state_dict()` that an adapter file can hold, each gathered whole, one tensor at a time:
    the diff pruning state, `modules_to_save` copies, and the input and output embeddings (PEFT's
    `save_embedding_layers="auto"` saves them when `embed_tokens` or `lm_head` is targeted). Other base weights are
    left out and never gathered. Collective: call it on every rank. Unsharded, it returns these entries as they are.
    """
    embeddings = [
        getattr(model, getter)() if hasattr(model, getter) else None
        for getter in ("get_input_embeddings", "get_output_embeddings")
    ]
    prefixes = tuple(
        f"{name}." for name, module in model.named_modules() if any(module is e for e in embeddings if e is not None)
    )
    return {
        key: full_tensor(value)
        for key, value in model.state_dict().items()
        if ".diff_pruning_state." in key or ".modules_to_save." in key or key.startswith(prefixes)
    }


def local_start(tensor: torch.Tensor) -> int:
    """The flat position, in the whole tensor, of this rank's first entry of an FSDP2 `DTensor` (0 if not one)."""
    if not isinstance(tensor, DTensor):
        return 0
    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return offset[0] * math.prod(tensor.shape[1:]) if offset else 0


def shard_group(tensors) -> dist.ProcessGroup | None:
    """The process group the sharded `tensors` are split over (None: the default group)."""
    groups = {}
    for tensor in tensors:
        if isinstance(tensor, DTensor):
            if tensor.device_mesh.ndim != 1 or not all(p.is_shard() for p in tensor.placements):
                raise NotImplementedError(
                    "Diff pruning reduces over FSDP shards on a 1-d device mesh; this tensor is placed as "
                    f"{tensor.placements} on a {tensor.device_mesh.ndim}-d mesh (HSDP is not supported)."
                )
            group = tensor.device_mesh.get_group()
            # each fully_shard call may build its own mesh: groups over the same ranks are one
            groups.setdefault(tuple(dist.get_process_group_ranks(group)), group)
        else:
            groups.setdefault(tuple(range(dist.get_world_size())), None)
    if len(groups) > 1:
        raise NotImplementedError(f"The diff pruning state is sharded over different sets of ranks: {list(groups)}.")
    return next(iter(groups.values()), None)


@torch.no_grad()
def flat_entries(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`tensor.reshape(-1)[positions]`, also for an FSDP2 `DTensor` (collective then: each rank fills in the entries
    it holds and one all-reduce combines them)."""
    if not isinstance(tensor, DTensor):
        return tensor.reshape(-1)[positions]
    local, start = local_part(tensor)
    mine = (positions >= start) & (positions < start + local.numel())
    # float64 holds every value of the narrower float dtypes exactly; the other ranks add zeros
    values = torch.zeros(positions.shape, dtype=torch.float64, device=local.device)
    values[mine] = local[positions[mine] - start].double()
    dist.all_reduce(values, group=shard_group([tensor]))
    return values.to(tensor.dtype)


@torch.no_grad()
def sharded_weighted_l0(states, weights: L0Weights) -> torch.Tensor:
    """The penalty `_state_penalty` sums, over all ranks, for diff states whose logits are FSDP shards.

    Each rank sums `sigmoid(alpha - shift)` over its entries of every gated tensor (and of its group logit); one
    all-reduce of these per-tensor sums gives the global ones, combined as on one device. Collective: every rank
    must call it. Not differentiable (the training loss gets its penalty from the forward pass).
    """
    alphas, groups = [], []
    for state in states:
        for name in state.tensor_names:
            if not state.is_sparse(name):
                alphas.append((state, getattr(state, f"{name}_alpha")))
                groups.append(getattr(state, f"{name}_group_alpha", None))
    tensors = [alpha for _, alpha in alphas] + [g for g in groups if g is not None]
    group = shard_group(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = torch.zeros(2 * len(alphas), dtype=torch.float32, device=device)
    for i, ((state, alpha), group_alpha) in enumerate(zip(alphas, groups, strict=True)):
        shift = l0_shift(state.stretch)
        sums[2 * i] = torch.sigmoid(local_part(alpha)[0].float() - shift).sum()
        if group_alpha is not None:
            sums[2 * i + 1] = torch.sigmoid(local_part(group_alpha)[0].float() - shift).sum()
    dist.all_reduce(sums, group=group)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for i, group_alpha in enumerate(groups):
        total = total + combine_penalty(sums[2 * i], None if group_alpha is None else sums[2 * i + 1], weights)
    return total


@torch.no_grad()
def sharded_top_entries(
    diffs: list[torch.Tensor], groups: list[list[int]], budgets: list[int], top_positions, keys: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The `budgets[g]` entries of largest `keys` of each group `groups[g]` of FSDP2-sharded diffs, as
    `(positions, values)` per diff, the same on every rank and the same as ranking the whole tensors on one device.

    `diffs` are `DTensor`s sharded on dim 0, or whole tensors (the same on every rank); `keys` (what the entries are
    ranked by, e.g. their magnitudes) are sharded like them. A group's entries are
    ranked in the order of its tensors, flat, and ties at the threshold go to the lowest positions
    (`top_positions`, the one-device rule). Each rank ranks only its own entries and sends its `budget` best
    (magnitude, position, value) per group; one all-gather of these candidates gives every rank all of them, and
    the global top of a group is always among its candidates (an entry beaten by fewer than `budget` others in the
    group is beaten by fewer on its own rank). Per rank this holds a flat fp32 copy of its entries of one group and
    their magnitudes (8 bytes per local entry) and `world_size * budget` candidates (16 bytes each); no tensor is
    gathered.
    """
    group = shard_group(diffs)
    world = dist.get_world_size(group)
    device = diffs[0].device
    sizes = [d.numel() for d in diffs]
    magnitudes, positions, values = [], [], []
    for members, budget in zip(groups, budgets, strict=True):
        offsets = [0]
        for index in members[:-1]:
            offsets.append(offsets[-1] + sizes[index])
        local = [local_part(diffs[i]) for i in members]
        flat = torch.cat([part.float() for part, _ in local])
        flat_keys = torch.cat([local_part(keys[i])[0].reshape(-1).float() for i in members])
        chosen = top_positions(flat_keys, min(budget, flat.numel()))
        # the global position (within the group) of each chosen entry, from the local part it lies in
        bounds = torch.tensor([0] + [part.numel() for part, _ in local], device=device).cumsum(0)
        part_of = torch.searchsorted(bounds, chosen, right=True) - 1
        first = torch.tensor(
            [offset + start for (_, start), offset in zip(local, offsets, strict=True)], device=device
        )
        padding = budget - chosen.numel()  # a rank with fewer entries than the budget pads with never-kept rows
        kept = flat[chosen]
        magnitudes.append(torch.cat([flat_keys[chosen], torch.full((padding,), -math.inf, device=device)]))
        where = first[part_of] + chosen - bounds[part_of]
        positions.append(torch.cat([where, torch.full((padding,), -1, dtype=torch.int64, device=device)]))
        values.append(torch.cat([kept, torch.zeros(padding, device=device)]))
        del flat, flat_keys
    packed = [torch.cat(t) for t in (magnitudes, positions, values)]
    gathered = []
    for tensor in packed:
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor, group=group)
        gathered.append(torch.stack(parts))
    result: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(diffs)
    start = 0
    for members, budget in zip(groups, budgets, strict=True):
        mags, pos, vals = (t[:, start : start + budget].reshape(-1) for t in gathered)
        start += budget
        real = pos >= 0
        mags, pos, vals = mags[real], pos[real], vals[real]
        order = pos.argsort()
        mags, pos, vals = mags[order], pos[order], vals[order]
        kept = top_positions(mags, budget)
        pos, vals = pos[kept], vals[kept]
        offset = 0
        for index in members:
            inside = (pos >= offset) & (pos < offset + sizes[index])
            result[index] = (pos[inside] - offset, vals[inside])
            offset += sizes[index]
    return result
