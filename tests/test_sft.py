"""examples/sft.py: TRL's SFTTrainer with the diff pruning recipe on a tiny Llama built in code."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REPO_ROOT
from peft import PeftModel
from safetensors.torch import load_file


pytest.importorskip("trl")

spec = importlib.util.spec_from_file_location("sft_example", REPO_ROOT / "examples" / "sft.py")
sft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sft)

GATED_STEPS, FIXMASK_STEPS, TARGET_SPARSITY = 30, 10, 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sft")
    argv = [
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(GATED_STEPS),
        "--fixmask_max_steps",
        str(FIXMASK_STEPS),
    ]
    return sft.main([*argv, "--target_sparsity", str(TARGET_SPARSITY)]), output_dir


def test_the_gated_stage_trains_the_gates_under_sfttrainer(run):
    trainer, _ = run
    logs = [log for log in trainer.stage_log_history["gated"] if "loss" in log]
    # SFTTrainer computes its loss from the fused LM head, without the model's penalty: the recipe adds it
    assert all(log["loss"] == pytest.approx(log["task_loss"] + log["l0_term"], rel=0.05) for log in logs)
    # the penalty closes gates (without it: 0.9413 to 0.9406 in 60 steps)
    assert logs[-1]["expected_density"] < logs[0]["expected_density"] - 0.05
    assert logs[-1]["task_loss"] < logs[0]["task_loss"]
    fixmask = [log for log in trainer.stage_log_history["fixmask"] if "loss" in log]
    assert fixmask and all("l0_term" not in log and log["task_loss"] == pytest.approx(log["loss"]) for log in fixmask)


def test_saved_adapter_is_sparse_and_reloads(run):
    trainer, output_dir = run
    saved = load_file(output_dir / "adapter_model.safetensors")
    assert not any(name.endswith(("_alpha", "_diff")) for name in saved)
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and "lm_head" not in " ".join(config["kept_pattern"])
    tokenizer = trainer.processing_class
    torch.manual_seed(0)  # the example's --seed, before it builds the model
    base = sft.tiny_llama(tokenizer)
    prompt = tokenizer("what colour is grass ?", return_tensors="pt")
    trainer.model.eval()
    loaded = PeftModel.from_pretrained(base, output_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**prompt).logits, trainer.model(**prompt).logits)
