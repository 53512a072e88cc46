"""The optimizer step in backward (recipe/optim.py): the same training as the ordinary optimizer, gradients freed in
backward, what it cannot do refused, and checkpoints that resume."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import MODEL_CASES
from peft import get_peft_model

from peft_diffprune import DiffPruningConfig, param_groups
from peft_diffprune.recipe import clip_grad_norm_per_group, stage_scheduler
from peft_diffprune.recipe.optim import OptimizerInBackward


def _gated_bert() -> torch.nn.Module:
    return get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(task_type="SEQ_CLS", l0_lambda=1e-3)).train()


def _setup(in_backward: bool, fused: bool = False, warmup: int = 1):
    model = _gated_bert()
    groups = param_groups(model, lr=1e-2, alpha_lr=0.1, weight_decay=0.01)
    optimizer = (OptimizerInBackward if in_backward else torch.optim.AdamW)(groups, fused=fused)
    return model, optimizer, stage_scheduler(optimizer, num_warmup_steps=warmup, num_training_steps=6)


def _train(model, optimizer, scheduler, steps: range) -> None:
    batch = MODEL_CASES["bert"].batch()
    for step in steps:
        torch.manual_seed(step)  # the same gate noise in both runs
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [False, True])
def test_same_parameters_and_state_as_the_ordinary_optimizer(fused):
    runs = {}
    for in_backward in (False, True):
        model, optimizer, scheduler = _setup(in_backward, fused)
        _train(model, optimizer, scheduler, range(4))
        runs[in_backward] = (_trainable(model), optimizer.state_dict(), scheduler.get_last_lr())
    (ordinary, ordinary_state, ordinary_lr), (in_backward, in_backward_state, in_backward_lr) = runs[False], runs[True]
    assert ordinary_lr == in_backward_lr and ordinary_lr[0] < 1e-2 and ordinary_lr[1] == 0.1  # diffs decay, gates not
    initial = _trainable(_gated_bert())
    for name, value in ordinary.items():
        assert not torch.equal(value, initial[name]), name  # both groups trained
        torch.testing.assert_close(in_backward[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert in_backward_state["state"].keys() == ordinary_state["state"].keys()
    for index, state in ordinary_state["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(in_backward_state["state"][index][key], value, rtol=1e-5, atol=1e-6)


def test_gradients_are_freed_in_backward():
    model, optimizer, _ = _setup(in_backward=True, warmup=0)
    before = _trainable(model)
    seen = []
    # count the gradients alive when each parameter's own update runs: the hook order is backward's
    for param in before:
        model.get_parameter(param).register_post_accumulate_grad_hook(
            lambda _: seen.append(sum(p.grad is not None for p in model.parameters()))
        )
    model(**MODEL_CASES["bert"].batch()).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is None for p in trainable)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    # at no point were all gradients alive together
    assert max(seen) < len(trainable) / 4, (max(seen), len(trainable))


def test_gradient_accumulation_is_refused():
    model, optimizer, _ = _setup(in_backward=True)
    batch = MODEL_CASES["bert"].batch()
    model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match="gradient accumulation is not possible"):
        model(**batch).loss.backward()
    optimizer.step()
    model(**batch).loss.backward()  # after step() the next backward is the next optimizer step


def test_per_group_clipping_and_closures_are_refused():
    model, optimizer, _ = _setup(in_backward=True)
    model(**MODEL_CASES["bert"].batch()).loss.backward()
    with pytest.raises(ValueError, match=r"max_grad_norm=0"):
        clip_grad_norm_per_group(optimizer, 1.0)
    with pytest.raises(ValueError, match="takes no closure"):
        optimizer.step(lambda: 0.0)


def test_a_process_group_of_two_is_refused(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="before data parallelism averages it"):
        _setup(in_backward=True)


def test_resuming_from_a_checkpoint_repeats_the_uninterrupted_run():
    model, optimizer, scheduler = _setup(in_backward=True)
    _train(model, optimizer, scheduler, range(2))
    buffer = io.BytesIO()
    torch.save(
        {"model": _trainable(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer
    )
    _train(model, optimizer, scheduler, range(2, 5))
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed, resumed_optimizer, resumed_scheduler = _setup(in_backward=True)
    resumed.load_state_dict(checkpoint["model"], strict=False)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    _train(resumed, resumed_optimizer, resumed_scheduler, range(2, 5))
    for name, value in _trainable(model).items():
        torch.testing.assert_close(resumed.get_parameter(name), value, rtol=0, atol=0, msg=name)
