"""Diff pruning under FSDP on CPU: FSDP1 in one process (PEFT's own convention) and both FSDP versions on 2 ranks.

The 2-rank checks run in one `torchrun --nproc_per_node 2 tests/fsdp_worker.py` launch (see that file), which
compares a sharded model with the same model unsharded, step by step; the tests below assert on what it measured.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import CAUSAL_LM_CASES, MODEL_CASES, REPO_ROOT, no_grad_logits
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from peft_diffprune import DiffPruningConfig, shard_embedding_rows
from peft_diffprune.diff_pruning import model as model_module
from peft_diffprune.diff_pruning.layer import active_penalty_terms


WORKER = REPO_ROOT / "tests" / "fsdp_worker.py"
KINDS_AND_MODELS = [(kind, model) for kind in ("fsdp2", "fsdp1") for model in ("bert", "llama")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, float]:
    out_dir = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER), str(out_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads((out_dir / "results.json").read_text())


@pytest.fixture
def one_rank_group():
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_rank_group")
def test_fsdp1_wrapped_eval_and_state_dict_round_trip():
    """FSDP1 with `use_orig_params=True` hands the base layer plain-tensor views in both `_parameters` and the
    instance dict; a swap of `_parameters` alone left the diffs out of the wrapped model's outputs."""
    case = MODEL_CASES["bert"]
    batch = case.batch()
    model = get_peft_model(case.model(), DiffPruningConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    expected = no_grad_logits(model, batch)
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    torch.testing.assert_close(no_grad_logits(wrapped, batch), expected, rtol=0, atol=1e-6)
    fresh = get_peft_model(case.model(), DiffPruningConfig(task_type="SEQ_CLS")).eval()
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(wrapped))
    torch.testing.assert_close(no_grad_logits(fresh, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kind", "model"), KINDS_AND_MODELS)
@pytest.mark.parametrize("stage", ["gated", "sparse"])
def test_training_matches_unsharded(two_ranks, kind, model, stage):
    """Same batch and gate noise: the loss (penalty included), every gradient and the eval outputs of the sharded
    model equal the unsharded one's, over 2 AdamW steps (gated stage: BERT structured, Llama plain gates; sparse
    stage: the projected adapter rebuilt and sharded again); the heads are `modules_to_save`."""
    key = f"{kind}/{model}/{stage}"
    assert two_ranks[f"{key}/loss"] <= 1e-6
    assert two_ranks[f"{key}/grads"] <= 1e-5
    assert two_ranks[f"{key}/eval"] <= 1e-6


def test_ddp_matches_one_process(two_ranks):
    assert two_ranks["ddp/bert/gated/loss"] <= 1e-6
    assert two_ranks["ddp/bert/gated/grads"] <= 1e-5


@pytest.mark.parametrize(("kind", "model"), KINDS_AND_MODELS)
def test_penalty_outside_forward_is_global(two_ranks, kind, model):
    # l0_penalty() of the sharded model sums its shards over the ranks: about 6 here, equal to float precision
    assert two_ranks[f"{kind}/{model}/gated/l0_penalty"] <= 1e-5


@pytest.mark.parametrize(("kind", "model"), KINDS_AND_MODELS)
def test_adapter_state_round_trip_from_wrapped_model(two_ranks, kind, model):
    assert two_ranks[f"{kind}/{model}/gated/round_trip"] <= 1e-6


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_fsdp2_projection_keeps_the_unsharded_positions_and_values(two_ranks, model):
    assert two_ranks[f"fsdp2/{model}/projection/kept"] == 0
    assert two_ranks[f"fsdp2/{model}/projection/state"] == 0
    assert two_ranks[f"fsdp2/{model}/projection/eval"] == 0


def test_sharded_top_k_tie_rule(two_ranks):
    assert two_ranks["fsdp2/ties"] == 0


def test_fsdp2_gate_fill_keeps_the_unsharded_entries(two_ranks):
    assert two_ranks["fsdp2/gate_fill"] == 0  # the positions, exactly
    assert two_ranks["fsdp2/gate_fill/values"] < 1e-6  # the values, to an ulp or two of fp32


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_fsdp2_save_pretrained_writes_the_unsharded_files(two_ranks, model):
    assert two_ranks[f"fsdp2/{model}/save"] == 0
    assert two_ranks[f"fsdp2/{model}/save_config"] == 0


def test_fsdp2_resume_from_distributed_checkpoint(two_ranks):
    assert two_ranks["fsdp2/bert/resume/params"] == 0
    assert two_ranks["fsdp2/bert/resume/loss"] == 0


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_embedding_sharded_by_rows_matches(two_ranks, model):
    """FSDP2 with the input embedding sharded by rows (`shard_embedding_rows`), each rank its half of the batch.

    Against FSDP2 with the embedding gathered whole on the same halves ("twin"): the same loss and gradients up to
    the order of float sums. Against the unsharded model on the whole batch: as close as splitting the batch allows
    (the twin is as far from it: 3e-5 relative in Llama's gradients). Then the penalty outside forward, the
    adapter state, projection and the fixed-mask stage with the rows sharded again."""
    key = f"rows/{model}"
    assert two_ranks[f"{key}/gated/twin/loss"] <= 1e-6
    assert two_ranks[f"{key}/gated/twin/grads"] <= 1e-6
    assert two_ranks[f"{key}/one_owner/twin/loss"] <= 1e-6  # every id on rank 0: rank 1 serves no row
    assert two_ranks[f"{key}/one_owner/twin/grads"] <= 1e-6
    assert two_ranks[f"{key}/gated/loss"] <= 1e-5
    assert two_ranks[f"{key}/gated/grads"] <= 1e-4
    assert two_ranks[f"{key}/gated/eval"] <= 1e-5
    assert two_ranks[f"{key}/gated/l0_penalty"] <= 1e-6
    assert two_ranks[f"{key}/gated/round_trip"] <= 1e-5
    assert two_ranks[f"{key}/projection/state"] <= 1e-5
    assert two_ranks[f"{key}/projection/eval"] <= 1e-5
    assert two_ranks[f"{key}/sparse/loss"] <= 1e-5
    assert two_ranks[f"{key}/sparse/grads"] <= 1e-4
    assert two_ranks[f"{key}/sparse/eval"] <= 1e-5


@pytest.mark.parametrize("kind", ["fsdp2", "rows"])
def test_penalty_until_target_counts_open_gates_over_the_ranks(two_ranks, kind):
    """The open gates counted over the shards (FSDP2 on structured BERT with closed group gates; the embedding
    sharded by rows) equal the unsharded count; the penalty is on below the budget and off at it, as unsharded.
    FSDP1 refuses (its root unit is whole on every rank inside forward)."""
    assert two_ranks[f"until_target/{kind}/count"] == 0
    for regime in ("on", "off"):
        assert two_ranks[f"until_target/{kind}/{regime}/loss"] <= 1e-6
        assert two_ranks[f"until_target/{kind}/{regime}/penalty"] == 0


def _gated(case_name: str, **kwargs):
    case = {**MODEL_CASES, **CAUSAL_LM_CASES}[case_name]
    config = DiffPruningConfig(task_type=case.task_type, init_weights=False, l0_lambda=1e-3, **kwargs)
    return case, get_peft_model(case.model(), config)


@pytest.mark.usefixtures("one_rank_group")
class TestEmbeddingRowsOnOneRank:
    """`shard_embedding_rows` on a one-rank group: every row is local, so the model must equal the unsharded one
    bit for bit (the same rows sampled in the same order), in training and in eval."""

    @pytest.mark.parametrize("case_name", ["bert", "roberta"])
    def test_equals_the_unsharded_model(self, case_name):
        case, ref = _gated(case_name)
        sharded = copy.deepcopy(ref)
        params = shard_embedding_rows(sharded)
        embedding = sharded.get_input_embeddings()
        state = embedding.diff_pruning_state["default"]
        assert {id(p) for p in params} == {
            id(embedding.get_base_layer().weight),
            id(state.weight_diff),
            id(state.weight_alpha),
        }
        assert all(isinstance(p, DTensor) for p in params)
        batch = case.batch()
        padding = embedding.get_base_layer().padding_idx
        if padding is not None:  # RoBERTa: the padding row is looked up, but never trained
            batch["input_ids"][1, 1] = padding
        for model in (ref, sharded):
            model.train()
            torch.manual_seed(0)
            model(**batch).loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        grads = {n: p.grad for n, p in sharded.named_parameters() if p.grad is not None}
        assert set(grads) == set(ref_grads)
        for name, grad in grads.items():
            grad = grad.to_local() if isinstance(grad, DTensor) else grad
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)
        if padding is not None:
            assert state.weight_diff.grad.to_local()[padding].abs().sum() == 0
        torch.testing.assert_close(
            no_grad_logits(sharded.eval(), batch), no_grad_logits(ref.eval(), batch), rtol=0, atol=0
        )
        with sharded.disable_adapter(), ref.disable_adapter():
            torch.testing.assert_close(no_grad_logits(sharded, batch), no_grad_logits(ref, batch), rtol=0, atol=0)

    def test_an_id_out_of_range_raises(self):
        case, model = _gated("bert")
        shard_embedding_rows(model)
        batch = case.batch()
        batch["input_ids"][0, 0] = model.config.vocab_size
        with pytest.raises(IndexError, match="out of range"):
            model(**batch)

    @pytest.mark.parametrize(
        ("case_name", "kwargs", "error", "match"),
        [
            ("llama_tied", {}, NotImplementedError, "tied LM head"),
            ("bert", {"structured": True}, NotImplementedError, "structured gates"),
            ("bert", {"target_modules": ["query"]}, ValueError, "not wrapped"),
        ],
    )
    def test_refuses_what_it_does_not_support(self, case_name, kwargs, error, match):
        _, model = _gated(case_name, **kwargs)
        with pytest.raises(error, match=match):
            shard_embedding_rows(model)

    def test_refuses_a_2d_mesh(self):
        _, model = _gated("bert")
        with pytest.raises(NotImplementedError, match="1-d device mesh"):
            shard_embedding_rows(model, mesh=init_device_mesh("cpu", (1, 1)))


def test_embedding_rows_need_a_process_group():
    _, model = _gated("bert")
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_embedding_rows(model)


class _TwoBranches(nn.Module):
    """A model without a task type whose `unused` layer is never called in forward."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.used(x)
        return (nn.functional.cross_entropy(logits, labels), logits)


class TestPenaltyFromTheGateNodes:
    """The penalty of every sampled tensor comes from the node that samples its gates (see gates.py)."""

    def test_loss_carries_l0_penalty_without_a_separate_pass(self, monkeypatch):
        case = MODEL_CASES["bert"]
        model = get_peft_model(case.model(), DiffPruningConfig(task_type="SEQ_CLS", l0_lambda=1e-3, structured=True))
        model.train()
        batch = case.batch()
        torch.manual_seed(0)
        loss = model(**batch).loss
        with model.disable_adapter():
            torch.manual_seed(0)
            task_loss = model(**batch).loss
        penalty = model.base_model.l0_penalty()
        # outside forward, l0_penalty() builds its own nodes; in a training forward no tensor needs one
        monkeypatch.setattr(model_module, "tensor_penalty", lambda *a: pytest.fail("penalty computed apart"))
        torch.manual_seed(0)
        again = model(**batch).loss
        torch.testing.assert_close(again, loss, rtol=0, atol=0)
        # the adapter starts as the identity: the losses differ by the penalty alone
        torch.testing.assert_close(loss - task_loss, penalty, rtol=0, atol=1e-6)
        assert active_penalty_terms() is None

    def test_a_layer_not_called_in_forward_is_still_penalised(self):
        torch.manual_seed(0)
        model = get_peft_model(_TwoBranches(), DiffPruningConfig(target_modules=["used", "unused"], l0_lambda=0.5))
        model.train()
        x, labels = torch.randn(2, 4), torch.tensor([0, 2])
        loss, _ = model(x, labels=labels)
        task_loss = nn.functional.cross_entropy(model.base_model.model.used(x), labels)
        assert loss.item() - task_loss.item() == pytest.approx(model.base_model.l0_penalty().item(), rel=1e-5)
        loss.backward()
        unused_alpha = model.base_model.model.unused.diff_pruning_state["default"].weight_alpha
        assert unused_alpha.grad is not None and (unused_alpha.grad > 0).all()

    def test_a_forward_that_raised_does_not_leak_its_terms(self):
        case = MODEL_CASES["bert"]
        model = get_peft_model(case.model(), DiffPruningConfig(task_type="SEQ_CLS"))
        model.train()
        batch = case.batch()
        with pytest.raises(IndexError):  # in the loss, after every layer has recorded its terms
            model(**{**batch, "labels": batch["labels"] + 10})
        torch.manual_seed(0)
        loss = model(**batch).loss
        assert active_penalty_terms() is None
        with model.disable_adapter():
            torch.manual_seed(0)
            task_loss = model(**batch).loss
        torch.testing.assert_close(loss - task_loss, model.base_model.l0_penalty(), rtol=0, atol=1e-6)


def test_scalar_group_logits_of_older_gated_checkpoints_load():
    """Group logits are (1,) tensors now (fully_shard refuses scalar parameters); 0-d ones, as older gated
    checkpoints hold, still load."""
    case = MODEL_CASES["bert"]
    config = DiffPruningConfig(task_type="SEQ_CLS", structured=True)
    model = get_peft_model(case.model(), config)
    state = {k: v.reshape(()) if k.endswith("group_alpha") else v for k, v in get_peft_model_state_dict(model).items()}
    state = {k: torch.full_like(v, 1.25) if k.endswith("group_alpha") else v for k, v in state.items()}
    assert any(v.dim() == 0 for v in state.values())
    set_peft_model_state_dict(model, state)
    groups = [p for n, p in model.named_parameters() if n.endswith("group_alpha")]
    assert groups and all(p.shape == (1,) and p.item() == 1.25 for p in groups)
