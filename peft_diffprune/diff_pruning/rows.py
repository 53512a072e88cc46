"""Embeddings sharded by rows under FSDP2: each rank keeps its rows and serves the rows the others look up.

FSDP2 gathers a unit's parameters whole for its forward and forms their gradients whole in backward. For the word
embedding of a gated model that is the base table, its diff `w` and its gate logits `alpha` (3 x 94 MB for
BERT-base's 30522 x 768 table in fp32), then the gradients of `w` and `alpha` (2 x 94 MB): the largest unit of the
model, for a batch that reads a few thousand rows of it. [`shard_embedding_rows`] instead keeps the table sharded by
rows (`DTensor`s placed `Shard(0)`, left out of FSDP with `fully_shard(..., ignored_params=...)`), and a forward
exchanges only the rows the batch uses:

1. each rank sends the sorted unique ids of its batch to the ranks that hold them (one all-to-all of counts, one of
   ids);
2. each rank builds the rows asked of it, `theta + z * w` with gates sampled for those rows only (deterministic in
   eval), and sends them back (one all-to-all of rows: `unique ids x hidden size` per rank);
3. backward sends each rank's gradient of its rows to their owners (one all-to-all), which apply the gate's
   backward to their shard: its gradients are formed for the local rows only.

Per rank this holds the shard (`1 / world` of the table and of its state) and the rows of one batch, never the
table. The penalty covers every row: each rank sums it over its shard and one all-reduce of a scalar gives the total.
Gradients are the average over ranks, as FSDP's reduce-scatter gives them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .distributed import local_start
from .gates import deterministic_gate, hard_concrete_delta_and_penalty


class _AllToAll(torch.autograd.Function):
    """`rows` split by destination (`send_sizes`) to every rank, gathered by source (`recv_sizes`); backward sends
    the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows, send_sizes, recv_sizes, group):
        ctx.sizes, ctx.group = (send_sizes, recv_sizes), group
        return _all_to_all(rows, send_sizes, recv_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        send_sizes, recv_sizes = ctx.sizes
        return _all_to_all(grad.contiguous(), recv_sizes, send_sizes, ctx.group), None, None, None


def _all_to_all(rows: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group) -> torch.Tensor:
    out = rows.new_empty((sum(recv_sizes), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_sizes, send_sizes, group=group)
    return out


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients (each rank's loss holds
    the total)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    """The identity, with its gradient scaled (by `1 / world`: the average over ranks that FSDP would take)."""

    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def is_row_sharded(layer: nn.Module) -> bool:
    """Whether `layer` (a diff pruning `Embedding`) was sharded by [`shard_embedding_rows`]."""
    return getattr(layer, "row_bounds", None) is not None


def _check_layer(name: str, layer: nn.Module, tied: bool) -> None:
    base = layer.get_base_layer()
    fix = f"leave {name!r} to fully_shard (do not shard it by rows)"
    if tied or layer._shared_diff[0] is not None:
        raise NotImplementedError(
            f"{name!r} shares its weight with another module (a tied LM head): sharding it by rows would need the "
            f"LM head's product sharded by vocabulary too, which is not implemented; {fix}."
        )
    if base.max_norm is not None or not (type(base) is nn.Embedding or hasattr(base, "embed_scale")):
        raise NotImplementedError(
            f"{name!r} is a {type(base).__name__} with a forward of its own (max_norm or a subclass); row sharding "
            f"supports nn.Embedding and its scaled variants; {fix}."
        )
    for adapter, state in layer.diff_pruning_state.items():
        unsupported = [
            n
            for n in state.tensor_names
            if hasattr(state, f"{n}_group_alpha") or hasattr(state, f"{n}_pool_positions")
        ]
        if unsupported:
            raise NotImplementedError(
                f"Adapter {adapter!r} of {name!r} has structured gates or a candidate pool, which row sharding does "
                f"not support; {fix}."
            )


def shard_embedding_rows(model: nn.Module, mesh=None, modules: list[str] | None = None) -> set[nn.Parameter]:
    """Shard the wrapped input embedding of `model` (or the wrapped embeddings named in `modules`) by rows.

    Their base weight and every gated diff and gate logit become `DTensor` parameters sharded on dim 0 over `mesh`
    (by default a 1-d mesh of all ranks), and their forward exchanges only the rows each batch uses (see the module
    docstring). Returns the parameters, for FSDP to leave alone: call it after `get_peft_model` and before
    `fully_shard` of the module that contains the embedding, and pass them on::

        params = shard_embedding_rows(model)
        for block in blocks:
            fully_shard(block)
        fully_shard(model, ignored_params=params)

    Collective: call it on every rank, with the same model. The optimizer, `l0_penalty()`, `project_to_sparsity`,
    `gather_adapter_state_dict` and torch's distributed checkpoint take the sharded parameters like FSDP's own.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_embedding_rows shards over a process group: call dist.init_process_group first.")
    wrapped = {name: m for name, m in model.named_modules() if hasattr(m, "diff_pruning_state")}
    embeddings = {name: m for name, m in wrapped.items() if isinstance(m.get_base_layer(), nn.Embedding)}
    if modules is None:
        inputs = model.get_input_embeddings()
        modules = [name for name, m in embeddings.items() if m is inputs]
        if not modules:
            raise ValueError(
                "The input embedding of this model is not wrapped by diff pruning (is it in target_modules?): "
                "nothing to shard by rows."
            )
    missing = [name for name in modules if name not in embeddings]
    if missing:
        raise ValueError(f"{missing[0]!r} is not an embedding wrapped by diff pruning; wrapped: {sorted(embeddings)}.")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = getattr(output, "weight", None)
    if mesh is None:
        device = next(iter(embeddings[modules[0]].get_base_layer().parameters())).device
        mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"shard_embedding_rows shards over a 1-d device mesh; got a {mesh.ndim}-d one (HSDP is not supported): "
            "pass mesh=None or a 1-d mesh."
        )
    sharded = set()
    for name in modules:
        layer = embeddings[name]
        base = layer.get_base_layer()
        tied = output_weight is not None and output_weight is base.weight
        _check_layer(name, layer, tied)
        owners = [(base, "weight")] + [
            (state, f"{n}_{suffix}")
            for state in layer.diff_pruning_state.values()
            for n in state.tensor_names
            for suffix in ("diff", "alpha")
            if not state.is_sparse(n)
        ]
        for owner, attr in owners:
            param = owner._parameters[attr]
            shard = nn.Parameter(
                distribute_tensor(param.detach(), mesh, [Shard(0)]), requires_grad=param.requires_grad
            )
            owner._parameters[attr] = shard
            sharded.add(shard)
        starts = torch.tensor([local_start(base.weight) // base.embedding_dim])
        everyone = [torch.empty_like(starts) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, starts, group=mesh.get_group())
        layer.row_bounds = [int(s) for s in torch.cat(everyone)] + [base.num_embeddings]
        layer.row_group = mesh.get_group()
        layer._eval_cache = None
    return sharded


def _local(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """This rank's rows of a row-sharded parameter; its gradient is averaged over the ranks, as FSDP does."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return _ScaleGrad.apply(local, 1.0 / world) if local.requires_grad else local


def _sparse_rows(state, name: str, rows: torch.Tensor, first_row: int, shape) -> torch.Tensor:
    """Rows `rows` (local row numbers, sorted) of the sparse diff `name` of a table of `shape`: zeros but for the
    kept entries that fall in them (differentiable in the kept values)."""
    width = shape[1]
    positions = state.positions(name, shape[0] * width)
    values = getattr(state, f"{name}_values")
    out = values.new_zeros((rows.numel(), width))
    if not rows.numel():
        return out
    row = positions // width - first_row
    slot = torch.searchsorted(rows, row).clamp_(max=rows.numel() - 1)
    hit = rows[slot] == row
    return out.index_put((slot[hit], positions[hit] % width), values[hit])


def row_sharded_forward(layer: nn.Module, states: list, x: torch.Tensor) -> torch.Tensor:
    """The forward of a row-sharded diff pruning embedding (see the module docstring). Collective."""
    group, bounds = layer.row_group, layer.row_bounds
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    base = layer.get_base_layer()
    first_row = bounds[rank]
    ids, inverse = torch.unique(x.reshape(-1), return_inverse=True)
    if ids.numel() and (ids[0] < 0 or ids[-1] >= base.num_embeddings):
        bad = int(ids[0] if ids[0] < 0 else ids[-1])
        raise IndexError(f"Token id {bad} is out of range for an embedding of {base.num_embeddings} rows.")
    # how many of my unique ids each rank holds, and how many of its rows each rank asks of me
    asked = torch.diff(torch.searchsorted(ids, torch.tensor(bounds, device=ids.device)))
    asked_of_me = torch.empty_like(asked)
    dist.all_to_all_single(asked_of_me, asked, group=group)
    send_sizes, recv_sizes = asked.tolist(), asked_of_me.tolist()
    requested = _all_to_all(ids, send_sizes, recv_sizes, group) - first_row
    rows, requests = torch.unique(requested, return_inverse=True)

    table = base.weight.to_local()[rows]
    sample = layer.training
    gated_sum = None
    for state in states:
        if "weight" not in state.tensor_names:
            continue
        if state.is_sparse("weight"):
            delta = _sparse_rows(state, "weight", rows, first_row, base.weight.shape)
        else:
            w, alpha = _local(state.weight_diff, world), _local(state.weight_alpha, world)
            if sample:
                weights = state.penalty_weights()
                delta, penalty = hard_concrete_delta_and_penalty(w, alpha, state.stretch, None, rows, None, weights)
                if weights is not None:
                    state.record_penalty("weight", _SumOverRanks.apply(penalty, group))
            else:
                delta = deterministic_gate(alpha[rows], state.stretch) * w[rows]
        gated_sum = delta if gated_sum is None else gated_sum + delta
    if gated_sum is not None:
        if base.padding_idx is not None:
            # as in full fine-tuning, the padding row is used but never trained
            padding = (rows + first_row == base.padding_idx).unsqueeze(1)
            gated_sum = torch.where(padding, gated_sum.detach(), gated_sum)
        table = table + gated_sum.to(table.dtype)
    embed_scale = layer._get_embed_scale()
    if embed_scale is not None:
        table = table * embed_scale.to(table.dtype)
    served = _AllToAll.apply(table[requests], recv_sizes, send_sizes, group)
    return F.embedding(inverse, served).view(*x.shape, -1)
