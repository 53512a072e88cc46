"""The recipe's pieces: the stage schedule, per-group clipping, the loss terms apart, the closing table."""

from __future__ import annotations

import json
from unittest.mock import patch

import pytest
import torch
from conftest import MODEL_CASES
from peft import get_peft_model

from peft_diffprune import (
    DiffPruningConfig,
    DiffPruningSchedule,
    LossTerms,
    clip_grad_norm_per_group,
    get_tuner,
    param_groups,
    project_to_sparsity,
    stage_scheduler,
)
from peft_diffprune.diff_pruning.sparse import base_parameter_count
from peft_diffprune.recipe.results import load_results, results_table


def _gated(l0_lambda: float = 1e-3):
    return get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(task_type="SEQ_CLS", l0_lambda=l0_lambda))


def test_stage_scheduler_keeps_the_gate_logits_constant_and_decays_the_rest():
    model = _gated()
    optimizer = torch.optim.SGD(param_groups(model, lr=1.0, alpha_lr=0.1))
    scheduler = stage_scheduler(optimizer, num_warmup_steps=2, num_training_steps=6)
    seen = []
    for _ in range(7):
        seen.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert [lrs["diff"] for lrs in seen] == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25, 0])
    assert [lrs["alpha"] for lrs in seen] == [0.1] * 7


def test_clip_grad_norm_per_group_clips_each_group_to_the_norm():
    model = _gated()
    model.train()
    model(**MODEL_CASES["bert"].batch()).loss.backward()
    optimizer = torch.optim.SGD(param_groups(model, lr=1.0))
    before = [
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g["params"]])) for g in optimizer.param_groups
    ]
    total = clip_grad_norm_per_group(optimizer, 1e-4)
    after = [
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g["params"]])) for g in optimizer.param_groups
    ]
    assert min(before) > 1e-4  # both groups are clipped, each to the norm (a global clip leaves each below it)
    assert [a.item() for a in after] == pytest.approx([1e-4, 1e-4], rel=1e-2)
    assert total.item() == pytest.approx(torch.linalg.vector_norm(torch.stack(before)).item())


def test_loss_terms_give_the_task_loss_exactly_and_the_l0_term_apart():
    model = _gated()
    model.train()
    batch = MODEL_CASES["bert"].batch()
    with LossTerms(model) as terms:
        loss = model(**batch).loss
        tuner = get_tuner(model)
        with patch.object(type(tuner), "l0_penalty", side_effect=AssertionError("a second pass over the logits")):
            measured = terms.measure()  # the L0 term is the one the forward added, not computed again
    penalty = get_tuner(model).l0_penalty()
    assert torch.equal(measured["l0_term"], penalty.detach())
    # the model adds the penalty to its loss in fp32: the recorded task loss is that sum's first term, exactly
    assert torch.equal(loss.detach(), measured["task_loss"] + penalty.detach())
    assert measured["expected_density"].item() == pytest.approx(
        get_tuner(model).expected_l0().item() / base_parameter_count(get_tuner(model))
    )
    # the hook is gone: a new forward records nothing
    terms.task_loss = None
    model(**batch)
    assert terms.task_loss is None


def test_loss_terms_after_projection_have_no_l0_term():
    model = _gated()
    project_to_sparsity(model, 0.01)
    model.train()
    with LossTerms(model) as terms:
        loss = model(**MODEL_CASES["bert"].batch()).loss
        measured = terms.measure()
    assert set(measured) == {"task_loss"} and torch.equal(measured["task_loss"], loss.detach())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha_learning_rate": 0}, "alpha_learning_rate must be positive"),
        ({"fixmask_learning_rate": -1.0}, "fixmask_learning_rate must be positive"),
        ({"fixmask_epochs": -1}, "fixmask_epochs must be >= 0"),
        ({"target_sparsity": 0}, "target_sparsity must be in"),
    ],
)
def test_schedule_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffPruningSchedule(**kwargs)


def _results(method: str, score: float, **extra) -> dict:
    return {
        "task": "rte",
        "method": method,
        "main_metric": "accuracy",
        "metrics": {"validation": {"accuracy": score}},
        "adapter_bytes": 1234567,
        "total_wall_seconds": 75.4,
        **extra,
    }


def test_results_table_lines_up_methods_and_reference():
    rows = [
        _results("diff_pruning", 0.61234, kept=113566),
        {**_results("full", 0.6, trainable_parameters=7), "label": "full (reference)"},
    ]
    lines = results_table(rows).splitlines()
    assert lines[0].split() == ["method", "dev", "accuracy", "kept", "entries", "adapter", "bytes", "wall", "time"]
    assert lines[1].split() == ["diff_pruning", "0.6123", "113,566", "1,234,567", "1m", "15s"]
    assert lines[2].split() == ["full", "(reference)", "0.6000", "7", "1,234,567", "1m", "15s"]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns


def test_load_results_names_what_is_wrong(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"method": "full"}))
    with pytest.raises(ValueError, match="lacks"):
        load_results(tmp_path)
    with pytest.raises(ValueError, match="not a readable results.json"):
        load_results(tmp_path / "nothing.json")
    (tmp_path / "results.json").write_text(json.dumps(_results("full", 0.5)))
    assert load_results(tmp_path)["method"] == "full"
