"""Diff pruning under FSDP on CPU: FSDP1 in one process (PEFT's own convention) and both FSDP versions on 2 ranks.

The 2-rank checks run in one `torchrun --nproc_per_node 2 tests/fsdp_worker.py` launch (see that file), which
compares a sharded model with the same model unsharded, step by step; the tests below assert on what it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import MODEL_CASES, REPO_ROOT, no_grad_logits
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel

from peft_diffprune import DiffPruningConfig


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


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_fsdp2_save_pretrained_writes_the_unsharded_files(two_ranks, model):
    assert two_ranks[f"fsdp2/{model}/save"] == 0
    assert two_ranks[f"fsdp2/{model}/save_config"] == 0


def test_fsdp2_resume_from_distributed_checkpoint(two_ranks):
    assert two_ranks["fsdp2/bert/resume/params"] == 0
    assert two_ranks["fsdp2/bert/resume/loss"] == 0
