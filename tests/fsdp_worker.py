"""Diff pruning under FSDP on 2 CPU ranks, against the same model unsharded; run by tests/test_fsdp.py.

`torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR`: every rank builds the same seeded tiny model twice,
shards one copy (FSDP2 `fully_shard` or FSDP1 `use_orig_params=True`, one unit per transformer block and the root),
feeds both the same batch with the same gate noise, and rank 0 writes the largest differences it saw to
`OUT_DIR/results.json` (keys `{fsdp}/{model}/{check}`); the test asserts on them.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel


sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import MODEL_CASES  # noqa: E402

import peft_diffprune  # noqa: E402, F401  (registers the method)
from peft_diffprune import (  # noqa: E402
    DiffPruningConfig,
    gather_adapter_state_dict,
    project_to_sparsity,
    shard_embedding_rows,
)
from peft_diffprune.diff_pruning import gates  # noqa: E402
from peft_diffprune.diff_pruning.distributed import sharded_top_entries  # noqa: E402
from peft_diffprune.diff_pruning.layer import DiffState  # noqa: E402
from peft_diffprune.diff_pruning.sparse import _top_positions, base_parameter_count  # noqa: E402


BLOCKS = ("BertLayer", "LlamaDecoderLayer")
CONFIGS = {
    # structured with its own group weight on BERT, plain gates on Llama; both with a dense task head
    "bert": {"task_type": "SEQ_CLS", "structured": True, "group_l0_lambda": 5e-3},
    "llama": {"task_type": "CAUSAL_LM", "modules_to_save": ["lm_head"]},
}
#: rows sharding supports plain gates only (structured gates raise)
UNSTRUCTURED = {"structured": False, "group_l0_lambda": None}
RESULTS: dict[str, float] = {}


def build(model_name: str, **config_kwargs):
    config = DiffPruningConfig(**{"l0_lambda": 1e-3, "init_weights": False, **CONFIGS[model_name], **config_kwargs})
    return get_peft_model(MODEL_CASES[model_name].model(), config)


def shard(model, kind: str):
    block_types = {type(m) for m in model.modules() if type(m).__name__ in BLOCKS}
    if kind == "fsdp1":
        return FullyShardedDataParallel(
            model, use_orig_params=True, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy(block_types)
        )
    for module in list(model.modules()):
        if type(module) in block_types:
            fully_shard(module)
    return fully_shard(model)


def clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def check_ddp() -> None:
    """DDP holds the whole model on each rank: the same losses and gradients as one process."""
    batch = MODEL_CASES["bert"].batch()
    ref = build("bert")
    ddp = DistributedDataParallel(copy.deepcopy(ref))
    train_steps(ref, ddp, "ddp", "ddp/bert/gated", batch, steps=2)


def full_grads(model, kind: str) -> dict[str, torch.Tensor]:
    if kind == "ddp":
        return {n.removeprefix("module."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    if kind == "fsdp1":
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            # FSDP1's flat parameter needs a gradient as a whole, so the frozen base weights get one too
            return {
                clean(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.requires_grad
            }
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}


def record(key: str, value: float) -> None:
    RESULTS[key] = max(RESULTS.get(key, 0.0), float(value))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def train_steps(ref, sharded, kind: str, key: str, batch, steps: int, first_step: int = 0) -> None:
    """`steps` AdamW steps on both models, recording the loss and gradient differences of each."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, sharded)]
    ref.train(), sharded.train()
    for step in range(first_step, first_step + steps):
        losses = []
        for model in (ref, sharded):
            torch.manual_seed(step)  # the same gate noise for both models, on every rank
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss)
        record(f"{key}/loss", max_diff(*losses))
        ref_grads, sharded_grads = dict(ref.named_parameters()), full_grads(sharded, kind)
        expected = {n for n, p in ref_grads.items() if p.grad is not None}
        assert set(sharded_grads) == expected, (key, sorted(set(sharded_grads) ^ expected)[:4])
        scale = max(g.grad.abs().max().item() for g in ref_grads.values() if g.grad is not None)
        record(f"{key}/grads", max(max_diff(ref_grads[n].grad, g) for n, g in sharded_grads.items()) / scale)
        for opt in opts:
            opt.step()
            opt.zero_grad()


def eval_logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def adapter_state(model) -> dict[str, torch.Tensor]:
    """FSDP1 and unsharded: PEFT's call as is; FSDP2 needs the gathered adapter state (the file's entries)."""
    state_dict = gather_adapter_state_dict(model) if any(isinstance(p, DTensor) for p in model.parameters()) else None
    return {k: v.clone() for k, v in get_peft_model_state_dict(model, state_dict=state_dict).items()}


def check_gated(kind: str, model_name: str, out_dir: Path) -> None:
    key = f"{kind}/{model_name}"
    case = MODEL_CASES[model_name]
    batch = case.batch()
    ref = build(model_name)
    sharded = shard(copy.deepcopy(ref), kind)
    train_steps(ref, sharded, kind, f"{key}/gated", batch, steps=2)
    record(f"{key}/gated/eval", max_diff(eval_logits(ref, batch), eval_logits(sharded, batch)))
    tuner = ref.base_model
    record(f"{key}/gated/l0_penalty", abs(tuner.l0_penalty().item() - sharded.base_model.l0_penalty().item()))

    # PEFT's convention: the adapter state of the wrapped model, loaded into a fresh unwrapped one
    fresh = build(model_name, init_weights=True)
    set_peft_model_state_dict(fresh, adapter_state(sharded))
    record(f"{key}/gated/round_trip", max_diff(eval_logits(fresh, batch), eval_logits(sharded, batch)))

    # projection, from the same trained weights: the same positions and values as unsharded, on every rank
    ref = fresh
    ref_report = project_to_sparsity(ref, 0.05)
    if kind == "fsdp1":
        # FSDP1 cannot change its wrapped modules: the unwrapped copy made of its adapter state is projected
        with pytest.raises(ValueError, match="FSDP1"):
            project_to_sparsity(sharded, 0.05)
        sparse = adapter_state(ref)
    else:
        report = project_to_sparsity(sharded, 0.05)
        record(f"{key}/projection/kept", abs(ref_report.kept - report.kept) + (ref_report.kept == 0))
        ref_sparse, sparse = adapter_state(ref), adapter_state(sharded)
        assert set(ref_sparse) == set(sparse), (key, set(ref_sparse) ^ set(sparse))
        record(f"{key}/projection/state", max(max_diff(ref_sparse[k], sparse[k]) for k in sparse))
        record(f"{key}/projection/eval", max_diff(eval_logits(ref, batch), eval_logits(sharded, batch)))
        # save_pretrained: written by rank 0, the same files as unsharded
        state_dict = gather_adapter_state_dict(sharded)
        sharded.save_pretrained(
            out_dir / f"{key}/sharded", state_dict=state_dict, is_main_process=dist.get_rank() == 0
        )
        if dist.get_rank() == 0:
            ref.save_pretrained(out_dir / f"{key}/ref")
            files = [load_file(out_dir / f"{key}/{which}/adapter_model.safetensors") for which in ("sharded", "ref")]
            assert set(files[0]) == set(files[1]), key
            record(f"{key}/save", max(max_diff(files[0][k], files[1][k]) for k in files[0]))
            configs = [
                json.loads((out_dir / f"{key}/{w}/adapter_config.json").read_text()) for w in ("sharded", "ref")
            ]
            # target_modules is written from a set: compare lists as sets
            configs = [{k: sorted(v) if isinstance(v, list) else v for k, v in c.items()} for c in configs]
            record(f"{key}/save_config", configs[0] != configs[1])
        dist.barrier()

    # fixed-mask stage: rebuild in the sparse state from the (small) adapter state, shard again
    rebuilt = get_peft_model(case.model(), copy.deepcopy(ref.peft_config["default"]))
    set_peft_model_state_dict(rebuilt, sparse)
    rebuilt = shard(rebuilt, kind)
    assert any(isinstance(m, DiffState) and m.tensor_names for m in rebuilt.modules())
    train_steps(ref, rebuilt, kind, f"{key}/sparse", batch, steps=2)
    record(f"{key}/sparse/eval", max_diff(eval_logits(ref, batch), eval_logits(rebuilt, batch)))


def check_resume(out_dir: Path) -> None:
    """FSDP2, gated stage: 2 steps, a torch distributed checkpoint of model and optimizer, a fresh sharded model
    resumed from it for 2 more steps, against 4 uninterrupted steps."""
    batch = MODEL_CASES["bert"].batch()

    def run(model, opt, steps):
        model.train()
        for step in steps:
            torch.manual_seed(step)
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()

    def fresh():
        model = shard(build("bert"), "fsdp2")
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    straight, straight_opt = fresh()
    run(straight, straight_opt, range(4))
    first, first_opt = fresh()
    run(first, first_opt, range(2))
    model_state, optim_state = get_state_dict(first, first_opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=out_dir / "dcp")
    resumed, resumed_opt = fresh()
    model_state, optim_state = get_state_dict(resumed, resumed_opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=out_dir / "dcp")
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    run(resumed, resumed_opt, range(2, 4))
    params = dict(straight.named_parameters())
    record(
        "fsdp2/bert/resume/params",
        max(max_diff(params[n].full_tensor(), p.full_tensor()) for n, p in resumed.named_parameters()),
    )
    losses = []
    for model in (straight, resumed):
        model.train()
        torch.manual_seed(4)
        with torch.no_grad():
            losses.append(model(**batch).loss)
    record("fsdp2/bert/resume/loss", max_diff(*losses))


def check_gate_fill() -> None:
    """FSDP2, gates half closed and a budget above the open entries: projection with fill="gate" keeps the same
    closed entries as unsharded (ranked by sigmoid(alpha) * |w| on each rank, then over the ranks)."""
    ref = build("llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith("_alpha"):
                param.copy_(torch.randn(param.shape, generator=generator))
    sharded = shard(copy.deepcopy(ref), "fsdp2")
    project_to_sparsity(ref, 0.8, fill="gate")
    project_to_sparsity(sharded, 0.8, fill="gate")
    ref_sparse, sparse = adapter_state(ref), adapter_state(sharded)
    assert set(ref_sparse) == set(sparse), set(ref_sparse) ^ set(sparse)
    values = [k for k in sparse if k.endswith("_values")]
    record("fsdp2/gate_fill", max(max_diff(ref_sparse[k], sparse[k]) for k in sparse if k not in values))
    # a kept value is z * w, and a shard of a small tensor can fall in the scalar tail of torch's vectorised sigmoid
    # where the whole tensor does not (AVX2: tensors under 16 entries): the values agree to an ulp or so
    record(
        "fsdp2/gate_fill/values",
        max(max_diff(ref_sparse[k], sparse[k]) / ref_sparse[k].abs().max().item() for k in values),
    )


def noise_of_logit(alpha: torch.Tensor) -> torch.Tensor:
    """Gate noise as a function of each gate's logit alone: the same gates whichever rank samples an entry, so that
    a row-sharded embedding (each row sampled by the rank that holds it) and the unsharded model draw alike."""
    return torch.frac(alpha.detach().float().abs() * 977.0).clamp(0.01, 0.99)


def train_on_halves(ref, sharded, key: str, batch, local, twin=None, steps: int = 2) -> None:
    """`steps` AdamW steps of `ref` on `batch` and of `sharded` on each rank's part `local` of it: the ranks' mean
    loss and FSDP's averaged gradients against the unsharded ones, and against those of `twin`, a sharded model
    trained on the same parts (`{key}/twin/...`): splitting the batch alone changes the float rounding."""
    world = dist.get_world_size()
    models = [m for m in (ref, sharded, twin) if m is not None]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for model in models:
        model.train()
    for _ in range(steps):
        losses = []
        for model in models:
            loss = model(**(batch if model is ref else local)).loss
            loss.backward()
            if model is not ref:
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss = loss / world
            losses.append(loss)
        expected = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        scale = max(g.abs().max().item() for g in expected.values())
        grads = full_grads(sharded, "fsdp2")
        assert set(grads) == set(expected), (key, sorted(set(grads) ^ set(expected))[:4])
        record(f"{key}/loss", max_diff(losses[0], losses[1]))
        record(f"{key}/grads", max(max_diff(expected[n], g) for n, g in grads.items()) / scale)
        if twin is not None:
            twin_grads = full_grads(twin, "fsdp2")
            record(f"{key}/twin/loss", max_diff(losses[1], losses[2]))
            record(f"{key}/twin/grads", max(max_diff(twin_grads[n], g) for n, g in grads.items()) / scale)
        for opt in opts:
            opt.step()
            opt.zero_grad()


def shard_rows(model):
    """FSDP2 units as `shard` makes them, the input embedding sharded by rows and left out of FSDP."""
    params = shard_embedding_rows(model)
    embedding = model.get_input_embeddings()
    assert embedding.get_base_layer().weight in params
    for module in list(model.modules()):
        if type(module).__name__ in BLOCKS:
            fully_shard(module)
    return fully_shard(model, ignored_params=params)


def check_rows(model_name: str) -> None:
    """FSDP2 with the input embedding sharded by rows, each rank its own half of the batch, against the unsharded
    model on the whole batch: loss (penalty included), gradients and eval outputs over 2 AdamW steps, the penalty
    outside forward, the adapter state, projection, and the sparse stage rebuilt with the rows sharded again."""
    key = f"rows/{model_name}"
    case = MODEL_CASES[model_name]
    ref = build(model_name, **UNSTRUCTURED)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith("_alpha"):
                param.copy_(torch.randn(param.shape, generator=generator) + 2.0)
    batch = case.batch()
    rank, world = dist.get_rank(), dist.get_world_size()
    share = next(iter(batch.values())).shape[0] // world
    local = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}

    sharded = shard_rows(copy.deepcopy(ref))
    original_noise = gates._uniform_noise
    gates._uniform_noise = noise_of_logit
    try:
        # the twin: FSDP2 with the embedding gathered whole, on the same halves
        twin = shard(copy.deepcopy(ref), "fsdp2")
        train_on_halves(ref, sharded, f"{key}/gated", batch, local, twin)
        # every id in rank 0's rows: rank 1 serves none and its shard gets the penalty's gradient only
        few = {**batch, "input_ids": batch["input_ids"] % 10 + 3}
        if case.task_type == "CAUSAL_LM":
            few["labels"] = few["input_ids"].clone()
        few_local = {k: v[rank * share : (rank + 1) * share] for k, v in few.items()}
        models = [copy.deepcopy(ref) for _ in range(3)]
        train_on_halves(
            models[0], shard_rows(models[1]), f"{key}/one_owner", few, few_local, shard(models[2], "fsdp2"), steps=1
        )
    finally:
        gates._uniform_noise = original_noise
    record(f"{key}/gated/eval", max_diff(eval_logits(ref, local), eval_logits(sharded, local)))
    penalties = (ref.base_model.l0_penalty().item(), sharded.base_model.l0_penalty().item())
    record(f"{key}/gated/l0_penalty", abs(penalties[0] - penalties[1]) / penalties[0])
    fresh = build(model_name, **UNSTRUCTURED, init_weights=True)
    set_peft_model_state_dict(fresh, adapter_state(sharded))
    record(f"{key}/gated/round_trip", max_diff(eval_logits(fresh, batch), eval_logits(ref, batch)))

    project_to_sparsity(ref, 0.05)
    project_to_sparsity(sharded, 0.05)
    ref_sparse, sparse = adapter_state(ref), adapter_state(sharded)
    assert set(ref_sparse) == set(sparse), (key, set(ref_sparse) ^ set(sparse))
    record(f"{key}/projection/state", max(max_diff(ref_sparse[k], sparse[k]) for k in sparse))
    record(f"{key}/projection/eval", max_diff(eval_logits(ref, local), eval_logits(sharded, local)))

    # fixed-mask stage: rebuilt in the sparse state, its embedding sharded by rows again, its kept values by FSDP
    rebuilt = get_peft_model(case.model(), copy.deepcopy(ref.peft_config["default"]))
    set_peft_model_state_dict(rebuilt, sparse)
    rebuilt = shard_rows(rebuilt)
    train_on_halves(ref, rebuilt, f"{key}/sparse", batch, local)
    record(f"{key}/sparse/eval", max_diff(eval_logits(ref, local), eval_logits(rebuilt, local)))


def check_until_target() -> None:
    """`penalty_until_target` on FSDP2 (tiny BERT, structured, some group gates closed; and with the embedding sharded
    by rows): the global count of open gates equals the unsharded one, and the loss of a training step does too,
    with a budget below the open entries (penalty on) and one between them and the entries a closed group holds
    (penalty off; counting the closed groups' entries would turn it on). FSDP1 refuses."""
    batch = MODEL_CASES["bert"].batch()
    original_noise = gates._uniform_noise
    for kind, extra in (("fsdp2", {}), ("rows", UNSTRUCTURED)):
        ref = build("bert", penalty_until_target=True, **extra)
        tuner = ref.base_model
        with torch.no_grad():
            for name, param in ref.named_parameters():
                closes = name.endswith("group_alpha" if kind == "fsdp2" else "_alpha")
                if closes and ("query" in name or "key" in name):
                    param.fill_(-10.0)  # query and key closed: by their group gates alone on structured BERT
        total = base_parameter_count(tuner)
        open_entries = int(tuner._open_entries("default"))
        for regime, budget in (("on", open_entries // 2), ("off", open_entries + 10)):
            ref.peft_config["default"].target_sparsity = budget / total
            sharded = shard_rows(copy.deepcopy(ref)) if kind == "rows" else shard(copy.deepcopy(ref), "fsdp2")
            record(f"until_target/{kind}/count", abs(int(sharded.base_model._open_entries("default")) - open_entries))
            losses = []
            gates._uniform_noise = noise_of_logit  # each row of a row-sharded embedding is drawn by its owner
            try:
                for model in (ref, sharded):
                    model.train()
                    losses.append(model(**batch).loss)
            finally:
                gates._uniform_noise = original_noise
            record(f"until_target/{kind}/{regime}/loss", max_diff(*losses))
            penalty = tuner.last_l0_penalty()
            record(f"until_target/{kind}/{regime}/penalty", float(penalty) if regime == "off" else float(penalty <= 0))
    sharded = shard(build("bert", penalty_until_target=True), "fsdp1")
    sharded.train()
    with pytest.raises(NotImplementedError, match="FSDP1"):
        sharded(**batch)


def check_ties() -> None:
    """The distributed top-k against `_top_positions` on whole tensors, with many ties at the threshold spread
    over both ranks' shards and one tensor smaller than the world (a rank holds none of it)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randint(-3, 4, (7, 5), generator=generator).float(),
        torch.randint(-3, 4, (1, 3), generator=generator).float(),
        torch.randint(-3, 4, (6,), generator=generator).float(),
    ]
    shards = [distribute_tensor(t, mesh, [Shard(0)]) for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    offsets = [0, 35, 38]
    worst = 0.0
    for budget in (1, 9, 20, 44):
        kept = tuple(_top_positions(flat.abs(), budget).tolist())
        entries = sharded_top_entries(shards, [[0, 1, 2]], [budget], _top_positions, [s.abs() for s in shards])
        got = [int(p) + offsets[i] for i, (positions, _) in enumerate(entries) for p in positions]
        values = torch.cat([v for _, v in entries])
        worst = max(worst, float(tuple(got) != kept), max_diff(values, flat[list(kept)]))
    for i, t in enumerate(tensors):
        budget = t.numel() // 3
        ((positions, values),) = sharded_top_entries([shards[i]], [[0]], [budget], _top_positions, [shards[i].abs()])
        expected = _top_positions(t.reshape(-1).abs(), budget)
        worst = max(worst, float(not torch.equal(positions, expected)), max_diff(values, t.reshape(-1)[expected]))
    record("fsdp2/ties", worst)


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for kind in ("fsdp2", "fsdp1"):
        for model_name in CONFIGS:
            check_gated(kind, model_name, out_dir)
    check_resume(out_dir)
    check_ties()
    check_gate_fill()
    check_ddp()
    for model_name in CONFIGS:
        check_rows(model_name)
    check_until_target()
    if dist.get_rank() == 0:
        (out_dir / "results.json").write_text(json.dumps(RESULTS, indent=1, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
