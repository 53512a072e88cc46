"""Two ranks (`torchrun --nproc_per_node 2 tests/pool_worker.py OUT_DIR`, gloo, CPU) training a candidate pool under
DDP, FSDP2 and FSDP1, against the same model unsharded in the same process (tests/test_pool.py asserts on what this
records). Each rank scores its own batches: the pool (and each regrowth) must still be the same on every rank."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import MODEL_CASES
from fsdp_worker import RESULTS, record, shard, train_steps
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

from peft_diffprune import (
    DiffPruningConfig,
    enable_lean_activations,
    enable_threaded_dropout,
    regrow_pool,
    select_pool,
)
from peft_diffprune.diff_pruning import activations
from peft_diffprune.diff_pruning import dropout as threaded
from peft_diffprune.diff_pruning.layer import DiffPruningLayer
from peft_diffprune.diff_pruning.pool import is_pool


def pool_model():
    case = MODEL_CASES["bert"]
    config = DiffPruningConfig(
        task_type="SEQ_CLS", target_sparsity=0.05, candidate_pool=3.0, l0_lambda=1e-3, init_weights=False
    )
    model = get_peft_model(case.model(), config)
    select_pool(model, [case.batch(10 + dist.get_rank())])  # a different batch on each rank
    return model


def positions(model) -> torch.Tensor:
    """Every pool position of the model, in module order, as one tensor."""
    out = []
    for module in model.modules():
        if isinstance(module, DiffPruningLayer) and "default" in module.diff_pruning_state:
            state = module.diff_pruning_state["default"]
            out += [getattr(state, f"{n}_pool_positions") for n in state.tensor_names if is_pool(state, n)]
    return torch.cat(out)


def differs_across_ranks(tensor: torch.Tensor) -> float:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return float(any(not torch.equal(gathered[0], other) for other in gathered[1:]))


def check_ddp() -> None:
    model = pool_model()
    record("ddp/pool_positions_differ", differs_across_ranks(positions(model)))
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    batch = MODEL_CASES["bert"].batch()
    train_steps(reference, ddp, "ddp", "ddp/pool", batch, steps=2)
    # close some gates and regrow from a different batch on each rank
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_alpha"):
                param[::4] = -5.0
    grown = regrow_pool(model, [MODEL_CASES["bert"].batch(20 + dist.get_rank())])
    record("ddp/regrown_none", float(grown == 0))
    record("ddp/regrown_positions_differ", differs_across_ranks(positions(model)))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    record("ddp/params_differ", differs_across_ranks(params))


def check_sharded(kind: str) -> None:
    model = pool_model()
    reference = copy.deepcopy(model)
    sharded = shard(model, kind)
    train_steps(reference, sharded, kind, f"{kind}/pool", MODEL_CASES["bert"].batch(), steps=2)
    # the same with lean saved activations on the sharded model only: its gradients are still the plain model's
    lean_model = pool_model()
    lean_reference = copy.deepcopy(lean_model)
    lean_sharded = shard(lean_model, kind)
    enable_lean_activations(lean_sharded)
    lean_packs = []
    pack = activations._pack

    def counted(tensor, recipes):
        packed = pack(tensor, recipes)
        lean_packs.append(not isinstance(packed, activations._Kept))
        return packed

    activations._pack, min_entries, activations.MIN_ENTRIES = counted, activations.MIN_ENTRIES, 0  # tiny tensors
    try:
        train_steps(lean_reference, lean_sharded, kind, f"{kind}/pool_lean", MODEL_CASES["bert"].batch(), steps=2)
    finally:
        activations._pack, activations.MIN_ENTRIES = pack, min_entries
    record(f"{kind}/pool_lean/recipes", sum(lean_packs))  # saved tensors kept as recipes: lean was on
    check_threaded_dropout(kind)
    try:
        regrow_pool(sharded, [MODEL_CASES["bert"].batch()])
        record(f"{kind}/regrow_refused", 0.0)
    except ValueError as error:
        record(f"{kind}/regrow_refused", float("before sharding" in str(error)))


def check_threaded_dropout(kind: str) -> None:
    """With dropout on and threaded dropout on both models, the sharded pool trains as the unsharded one: the same
    seed draws the same masks under FSDP's hooks (attention dropout inside sdpa included)."""
    model = pool_model()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    reference = copy.deepcopy(model)
    sharded = shard(model, kind)
    for each in (reference, sharded):
        enable_threaded_dropout(each)
    draws = []
    mask, min_entries = threaded.bernoulli_mask, threaded.MIN_ENTRIES
    threaded.bernoulli_mask = lambda shape, keep: draws.append(len(shape)) or mask(shape, keep)
    threaded.MIN_ENTRIES = 0  # tiny tensors
    try:
        train_steps(reference, sharded, kind, f"{kind}/pool_threaded", MODEL_CASES["bert"].batch(), steps=2)
    finally:
        threaded.bernoulli_mask, threaded.MIN_ENTRIES = mask, min_entries
    record(f"{kind}/pool_threaded/attention_masks", float(draws.count(4)))


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    check_ddp()
    for kind in ("fsdp2", "fsdp1"):
        check_sharded(kind)
    if dist.get_rank() == 0:
        (out_dir / "results.json").write_text(json.dumps(RESULTS, indent=1, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
