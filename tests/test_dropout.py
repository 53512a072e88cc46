"""Threaded dropout (`threaded_dropout`, `enable_threaded_dropout`): masks drawn over threads and kept as bits, the
same dropout otherwise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_CASES
from test_checkpointing import with_dropout

from peft_diffprune import (
    disable_threaded_dropout,
    enable_lean_activations,
    enable_threaded_dropout,
    threaded_dropout,
)
from peft_diffprune.diff_pruning import activations
from peft_diffprune.diff_pruning import dropout as threaded


def torch_masks(shape, keep):
    """The mask torch's CPU dropout draws: the same random draws in the same order as `F.dropout`."""
    return torch.empty(shape).bernoulli_(keep).bool()


@pytest.fixture
def every_size(monkeypatch):
    """The tiny models' activations are below `MIN_ENTRIES`: thread every dropout."""
    monkeypatch.setattr(threaded, "MIN_ENTRIES", 0)
    monkeypatch.setattr(activations, "MIN_ENTRIES", 0)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entries_are_kept_with_probability_1_minus_p_and_scaled_as_torch_does(p, dtype):
    torch.manual_seed(0)
    x = torch.randn(256, 1024, dtype=dtype).requires_grad_()
    with threaded_dropout():
        out = F.dropout(x, p)
    assert type(out.grad_fn).__name__ == threaded.DROPOUT_NODE
    kept = out != 0
    n = kept.numel()
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))
    scale = F.dropout(torch.ones(1024, dtype=dtype), p).max()  # torch's own 1 / (1 - p) in this dtype
    assert torch.equal(out[kept], x[kept] * scale) and not out[~kept].any()
    # the mask is kept as bits
    assert [t.dtype for t in out.grad_fn.saved_tensors] == [torch.uint8]
    assert out.grad_fn.saved_tensors[0].numel() == n // 8
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, grad * (kept.to(dtype) * scale))


def test_a_seed_gives_the_same_masks_on_any_number_of_threads():
    x = torch.randn(4096, 1024)  # 4 chunks of noise
    outs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            torch.manual_seed(0)
            with threaded_dropout():
                outs.append(F.dropout(x, 0.1))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    with threaded_dropout():
        assert not torch.equal(outs[0], F.dropout(x, 0.1))  # a new draw without a new seed


@pytest.mark.parametrize(
    "case",
    ["eval", "p=0", "p=1", "inplace", "small", "float64"],
)
def test_a_dropout_it_does_not_take_is_torchs_bit_for_bit(case):
    x = torch.randn(256, 1024, dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "small":
        x = x[:8, :8].clone()
    kwargs = {
        "eval": {"p": 0.1, "training": False},
        "p=0": {"p": 0.0},
        "p=1": {"p": 1.0},
        "inplace": {"p": 0.1, "inplace": True},
    }.get(case, {"p": 0.1})
    torch.manual_seed(0)
    expected = F.dropout(x.clone(), **kwargs)
    torch.manual_seed(0)
    with threaded_dropout():
        out = F.dropout(x.clone(), **kwargs)
    assert torch.equal(out, expected)
    assert torch.equal(torch.rand(3), (torch.manual_seed(0), F.dropout(x.clone(), **kwargs), torch.rand(3))[2])


@pytest.mark.parametrize(
    "mask,causal,gqa",
    [
        ("none", False, False),
        ("none", True, False),
        ("bool", False, False),
        ("float", False, False),
        ("none", False, True),
    ],
)
def test_attention_with_dropout_is_sdpas_math(monkeypatch, mask, causal, gqa):
    torch.manual_seed(0)
    q = torch.randn(4, 8, 64, 32, requires_grad=True)
    k, v = (torch.randn(4, 4 if gqa else 8, 64, 32, requires_grad=True) for _ in range(2))
    attn_mask = {"none": None, "bool": torch.rand(64, 64) > 0.3, "float": torch.randn(4, 1, 64, 64)}[mask]
    if mask == "bool":
        attn_mask[:, 0] = True
    kwargs = {"attn_mask": attn_mask, "is_causal": causal, "enable_gqa": gqa}
    # without dropout: torch's own
    with threaded_dropout():
        assert torch.equal(
            F.scaled_dot_product_attention(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs)
        )
    # every entry kept: the attention without dropout, scaled by 1 / (1 - p)
    monkeypatch.setattr(threaded, "bernoulli_mask", lambda shape, keep: torch.ones(shape, dtype=torch.bool))
    with threaded_dropout():
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, **kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs) * threaded._scale(0.2, torch.float32)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def _bert(seed: int = 0):
    model = with_dropout(MODEL_CASES["bert"].model(seed))
    model.config._attn_implementation = "sdpa"
    return model.train()


def _step(model, batch, seed: int = 1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_with_torchs_masks_a_model_is_the_plain_model(monkeypatch, every_size):
    """The same masks give the same logits and gradients: only the draw changes (hidden dropouts through
    `nn.Dropout`, attention dropout inside sdpa)."""
    batch = MODEL_CASES["bert"].batch()
    model = _bert()
    logits, grads = _step(model, batch)
    calls = []
    monkeypatch.setattr(
        threaded, "bernoulli_mask", lambda shape, keep: calls.append(shape) or torch_masks(shape, keep)
    )
    enable_threaded_dropout(model)
    threaded_logits, threaded_grads = _step(model, batch)
    # embeddings, the pooled output, and per layer: attention weights, attention output, feed-forward output
    assert len(calls) == 2 + 3 * model.config.num_hidden_layers
    assert any(len(shape) == 4 for shape in calls)
    torch.testing.assert_close(threaded_logits, logits)
    assert grads.keys() == threaded_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(threaded_grads[name], grad, msg=name)
    disable_threaded_dropout(model)
    calls.clear()
    assert torch.equal(_step(model, batch)[0], logits) and not calls


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_layers_draw_the_same_masks_again(every_size, reentrant):
    batch = MODEL_CASES["bert"].batch()
    model = _bert()
    enable_threaded_dropout(model)
    logits, grads = _step(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed_logits, checkpointed_grads = _step(model, batch)
    assert torch.equal(checkpointed_logits, logits)
    assert grads.keys() == checkpointed_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(checkpointed_grads[name], grad), name


def test_lean_activations_rebuild_the_attention_weights_bit_for_bit(every_size):
    batch = MODEL_CASES["bert"].batch()
    model = _bert()
    enable_threaded_dropout(model)
    logits, grads = _step(model, batch)
    packed = []
    pack = activations._pack

    def counted(tensor, recipes=frozenset(activations.RECIPES)):
        out = pack(tensor, recipes)
        base = tensor if tensor._base is None else tensor._base
        packed.append((type(base.grad_fn).__name__, base.dim(), type(out)))
        return out

    enable_lean_activations(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(activations, "_pack", counted)
        lean_logits, lean_grads = _step(model, batch)
    assert torch.equal(lean_logits, logits)
    for name, grad in grads.items():
        assert torch.equal(lean_grads[name], grad), name
    # the dropped-out attention weights, saved by their product with the values, rebuilt from the softmax and the bits
    weights = [kind for node, dim, kind in packed if node == threaded.DROPOUT_NODE and dim == 4]
    assert weights == [activations._Recomputed] * model.config.num_hidden_layers
    # the pooled output's dropout too (its input, tanh's output, is kept by tanh); the embeddings' output is kept
    kinds = {kind for node, dim, kind in packed if node == threaded.DROPOUT_NODE and dim == 2}
    assert kinds == {activations._Recomputed}


def test_the_context_is_left_when_a_forward_fails(every_size):
    model = _bert()
    enable_threaded_dropout(model)
    enable_threaded_dropout(model)  # again: nothing changes
    assert len(model._threaded_dropout_hooks) == 2 * len(list(model.modules()))
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model(input_ids=None)
    assert getattr(threaded._active, "mode", None) is None
    x = torch.randn(8, 8)
    torch.manual_seed(0)
    expected = F.dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(F.dropout(x, 0.5), expected)  # torch's dropout outside a forward
