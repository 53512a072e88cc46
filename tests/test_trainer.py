"""DiffPruningTrainer: both stages in one train(), the sparse save, resume from either stage, the logged terms."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CASES, NUM_LABELS, SEQ_LEN, VOCAB_SIZE
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from peft_diffprune import DiffPruningConfig, DiffPruningSchedule, DiffPruningTrainer, checkpoint_stage
from peft_diffprune.diff_pruning.sparse import base_parameter_count


TARGET_SPARSITY = 0.01
GATED_STEPS, FIXMASK_STEPS = 4, 3


def _dataset(n: int = 32) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(1, VOCAB_SIZE, (n, SEQ_LEN), generator=generator).tolist(),
            "labels": torch.randint(0, NUM_LABELS, (n,), generator=generator).tolist(),
        }
    )


def _trainer(output_dir, l0_lambda: float = 1e-3, max_grad_norm: float = 1.0, **schedule) -> DiffPruningTrainer:
    model = get_peft_model(
        MODEL_CASES["bert"].model(),
        DiffPruningConfig(task_type="SEQ_CLS", target_sparsity=TARGET_SPARSITY, l0_lambda=l0_lambda),
    )
    args = TrainingArguments(
        str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_grad_norm=max_grad_norm,
        max_steps=GATED_STEPS,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        seed=0,
        data_seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    schedule = {"fixmask_max_steps": FIXMASK_STEPS, "alpha_learning_rate": 0.1, **schedule}
    return DiffPruningTrainer(model, args, train_dataset=_dataset(), diff_pruning=DiffPruningSchedule(**schedule))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("trainer")
    trainer = _trainer(output_dir)
    trainer.train()
    trainer.save_model()
    return trainer, output_dir


def test_train_runs_both_stages_with_projection_between(trained):
    trainer, output_dir = trained
    config = trainer.model.peft_config["default"]
    assert trainer.stage == "fixmask"
    assert sum(config.kept_pattern.values()) == round(TARGET_SPARSITY * base_parameter_count(trainer.model.base_model))
    logs = trainer.state.log_history
    assert trainer.state.global_step == FIXMASK_STEPS  # the fixed-mask stage counts its own steps
    assert sum("loss" in log for log in logs) == FIXMASK_STEPS  # this train() call's history
    assert (output_dir / "gated" / "checkpoint-4").is_dir() and (output_dir / "fixmask" / "checkpoint-2").is_dir()
    assert checkpoint_stage(output_dir / "gated" / "checkpoint-4") == "gated"
    assert checkpoint_stage(output_dir / "fixmask" / "checkpoint-2") == "fixmask"
    # a checkpoint after projection holds the sparse state
    assert json.loads((output_dir / "fixmask" / "checkpoint-2" / "adapter_config.json").read_text())["kept_pattern"]
    assert not json.loads((output_dir / "gated" / "checkpoint-4" / "adapter_config.json").read_text())["kept_pattern"]


def test_save_model_writes_the_sparse_adapter(trained):
    trainer, output_dir = trained
    saved = load_file(output_dir / "adapter_model.safetensors")
    assert not any(name.endswith(("_alpha", "_diff")) for name in saved)
    assert any(name.endswith("_values") for name in saved)
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["kept_pattern"] == trainer.model.peft_config["default"].kept_pattern
    base = MODEL_CASES["bert"].model()
    loaded = PeftModel.from_pretrained(base, output_dir).eval()
    batch = MODEL_CASES["bert"].batch()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trainer.model(**batch).logits)


def test_gated_logs_carry_task_loss_and_l0_term_apart(tmp_path):
    trainer = _trainer(tmp_path, fixmask_max_steps=1)
    trainer.args.save_strategy = "no"
    tracked = []

    class Tracker(TrainerCallback):  # what report_to's tracker callbacks receive
        def on_log(self, args, state, control, logs=None, **kwargs):
            tracked.append(dict(logs))

    trainer.add_callback(Tracker())
    trainer.train()
    assert [log for log in tracked if "loss" in log][0].keys() >= {"task_loss", "l0_term", "expected_density"}
    assert any("projection/kept" in log for log in tracked)
    # the gated stage's history is in its own TrainerState
    gated_logs = [log for log in trainer.stage_log_history["gated"] if "loss" in log]
    assert len(gated_logs) == GATED_STEPS
    for log in gated_logs:
        # `loss` is the objective: the task loss plus the L0 term, to float rounding
        assert log["loss"] == pytest.approx(log["task_loss"] + log["l0_term"], rel=1e-4)
        assert 0 < log["expected_density"] <= 1
        assert log["task_loss"] < 3 and log["l0_term"] > 1  # 1e-3 x ~5,000 gates: the L0 term dominates `loss`
    fixmask_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all("l0_term" not in log and log["task_loss"] == pytest.approx(log["loss"]) for log in fixmask_logs)


def _train_watching_steps(trainer, watch) -> list:
    """Train, recording `watch(group)` for every parameter group just before each optimizer step."""
    seen = []
    original_step = torch.optim.AdamW.step

    def step(optimizer, *args, **kwargs):
        seen.append({group["name"]: watch(group) for group in optimizer.param_groups})
        return original_step(optimizer, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        trainer.train()
    finally:
        torch.optim.AdamW.step = original_step
    return seen


def test_gate_logits_keep_a_constant_learning_rate_while_the_diffs_decay(tmp_path):
    trainer = _trainer(tmp_path, fixmask_max_steps=1)
    trainer.args.save_strategy = "no"
    seen = _train_watching_steps(trainer, lambda group: group["lr"])
    gated = seen[:GATED_STEPS]
    assert [lrs["alpha"] for lrs in gated] == [0.1] * GATED_STEPS
    assert [lrs["diff"] for lrs in gated] == pytest.approx([1e-3 * (1 - s / GATED_STEPS) for s in range(GATED_STEPS)])
    assert set(seen[GATED_STEPS]) == {"diff"}  # after projection: no gate logits


def test_gradients_are_clipped_per_group(tmp_path):
    trainer = _trainer(tmp_path, fixmask_max_steps=1)
    trainer.args.save_strategy = "no"
    trainer.args.max_grad_norm = 3e-4  # below both groups' norms
    norms = _train_watching_steps(
        trainer, lambda group: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in group["params"]])).item()
    )
    # a global clip would leave each group below the norm: the two norms add up
    assert len(norms) == GATED_STEPS + 1
    for group_norms in norms:
        # clip_grad_norm_ divides by the norm + 1e-6
        assert all(norm == pytest.approx(3e-4, rel=5e-3) for norm in group_norms.values())


@pytest.mark.parametrize("checkpoint", ["gated/checkpoint-2", "fixmask/checkpoint-2"])
def test_resume_from_either_stage_matches_the_uninterrupted_run(trained, checkpoint, tmp_path):
    _, reference_dir = trained
    trainer = _trainer(reference_dir)
    trainer.args.output_dir = str(tmp_path)
    trainer.train(resume_from_checkpoint=str(reference_dir / checkpoint))
    trainer.save_model()
    reference = load_file(reference_dir / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(resumed[key], tensor, msg=key)


def test_resume_true_takes_the_latest_checkpoint_of_the_later_stage(trained, tmp_path):
    _, reference_dir = trained
    trainer = _trainer(reference_dir)
    assert trainer._find_checkpoint(str(reference_dir), True) == str(reference_dir / "fixmask" / "checkpoint-3")


def test_optimizer_in_backward_trains_and_resumes_as_the_ordinary_optimizer(tmp_path):
    adapters = {}
    checkpoint = str(tmp_path / "in_backward" / "gated" / "checkpoint-2")
    for name, in_backward, resume in (("ordinary", False, None), ("in_backward", True, None), ("resumed", True, True)):
        trainer = _trainer(tmp_path / name, max_grad_norm=0.0, optimizer_in_backward=in_backward)
        trainer.train(resume_from_checkpoint=checkpoint if resume else None)
        trainer.save_model()
        adapters[name] = load_file(tmp_path / name / "adapter_model.safetensors")
        if in_backward:
            assert all(p.grad is None for p in trainer.model.parameters())
    for key, tensor in adapters["ordinary"].items():
        torch.testing.assert_close(adapters["in_backward"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(adapters["resumed"][key], adapters["in_backward"][key], msg=key)


@pytest.mark.parametrize("args", [{"max_grad_norm": 1.0}, {"gradient_accumulation_steps": 2, "max_grad_norm": 0}])
def test_optimizer_in_backward_refuses_clipping_and_accumulation(args, tmp_path):
    model = get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="cannot be clipped per group nor accumulated"):
        DiffPruningTrainer(
            model,
            TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, **args),
            train_dataset=_dataset(),
            diff_pruning=DiffPruningSchedule(optimizer_in_backward=True),
        )


def test_an_optimizer_of_ones_own_is_refused(tmp_path):
    model = get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW(model.parameters())
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="builds the optimizer and scheduler of each stage"):
        DiffPruningTrainer(model, args, train_dataset=_dataset(), optimizers=(optimizer, None))


def test_the_l0_term_counts_once_per_step_under_gradient_accumulation(tmp_path):
    """A causal LM normalises its loss over the accumulated tokens (`num_items_in_batch`) and Trainer sums the
    micro-batches; the model's forward adds the whole L0 term to each, which the trainer brings back to one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), DiffPruningConfig(task_type="CAUSAL_LM", l0_lambda=1e-3))
    ids = torch.randint(3, VOCAB_SIZE, (16, SEQ_LEN), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = DiffPruningTrainer(
        model, args, train_dataset=dataset, diff_pruning=DiffPruningSchedule(fixmask_epochs=0)
    )
    trainer.train()
    logs = [log for log in trainer.stage_log_history["gated"] if "loss" in log]
    assert len(logs) == 3
    for log in logs:
        assert log["task_loss"] == pytest.approx(math.log(VOCAB_SIZE), rel=0.1)
        assert log["loss"] == pytest.approx(log["task_loss"] + log["l0_term"], rel=1e-4)


DDP_SCRIPT = """
import gc, os, sys, torch, weakref
sys.path.insert(0, {tests!r})
import test_trainer
from transformers import TrainerCallback
wrappers = []
class KeepWrapper(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        wrapped = trainer.model_wrapped
        wrappers.append((weakref.ref(wrapped), type(wrapped).__name__))
trainer = test_trainer._trainer(sys.argv[1])
trainer.add_callback(KeepWrapper())
trainer.train()
gc.collect()
# the last stage ran wrapped in DDP, and nothing holds that wrapper once train() has returned
released = wrappers[-1][1] == "DistributedDataParallel" and wrappers[-1][0]() is None
trainer.save_model()
metrics = trainer.evaluate(trainer.train_dataset)
rank = torch.distributed.get_rank()
# one file per rank: the two ranks' stdout share torchrun's pipe, and their lines can interleave
os.makedirs(sys.argv[1], exist_ok=True)
with open(os.path.join(sys.argv[1], f"rank{{rank}}.txt"), "w") as f:
    f.write(f"WORLD {{trainer.args.world_size}} STAGE {{trainer.stage}} RELEASED {{released}} EVAL {{'eval_loss' in metrics}}")
# Left to the interpreter's teardown, gloo's threads sometimes abort there ("terminate called without an active
# exception", CI once, while Trainer still held the group in its DDP wrapper). So: every rank done, the trainer
# dropped, the group destroyed while the interpreter is whole, and no teardown after it.
torch.distributed.barrier()
del trainer
gc.collect()
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_two_processes_train_both_stages_under_ddp(tmp_path):
    """Each stage is a fresh `Trainer.train()`: stage 2 wraps the projected model in a new DDP, not the old one."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # an abort prints each thread's Python stack
    result = subprocess.run(
        [*command, str(script), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, f"stdout:\n{result.stdout[-1500:]}\nstderr:\n{result.stderr[-3000:]}"
    for rank in (0, 1):
        # the DDP wrapper is gone after train() (it held the process group), and evaluating still works
        assert (tmp_path / "out" / f"rank{rank}.txt").read_text() == "WORLD 2 STAGE fixmask RELEASED True EVAL True"
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sum(saved["kept_pattern"].values()) == round(
        TARGET_SPARSITY * base_parameter_count(_trainer(tmp_path / "x").model.base_model)
    )
    assert checkpoint_stage(tmp_path / "out" / "fixmask" / "checkpoint-2") == "fixmask"


@pytest.mark.parametrize("in_backward", [False, True], ids=["adamw", "in-backward"])
def test_the_stage_optimizer_is_fused_adamw_on_cpu(tmp_path, in_backward):
    """Torch's fused AdamW where it runs (several times faster on CPU than the default), not elsewhere."""
    from peft_diffprune.recipe import fused_adamw_supported

    trainer = _trainer(tmp_path, max_grad_norm=0.0, optimizer_in_backward=in_backward)
    assert all(group["fused"] for group in trainer.create_optimizer().param_groups)
    cpu, meta = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert fused_adamw_supported([{"params": [cpu]}]) and not fused_adamw_supported([{"params": [cpu, meta]}])


def test_threaded_dropout_draws_every_mask_of_both_stages(tmp_path, monkeypatch):
    """enable_threaded_dropout(model) before train(): the hooks stay with the model through projection, so both
    stages draw their masks threaded (8 dropouts a forward: embeddings, pooled output, 3 per layer)."""
    from test_checkpointing import with_dropout

    from peft_diffprune import enable_threaded_dropout
    from peft_diffprune.diff_pruning import dropout as threaded

    monkeypatch.setattr(threaded, "MIN_ENTRIES", 0)  # the tiny model's activations
    draws = []
    draw = threaded.bernoulli_mask
    monkeypatch.setattr(threaded, "bernoulli_mask", lambda shape, keep: draws.append(shape) or draw(shape, keep))
    trainer = _trainer(tmp_path)
    enable_threaded_dropout(with_dropout(trainer.model))
    trainer.train()
    assert len(draws) == 8 * (GATED_STEPS + FIXMASK_STEPS)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
