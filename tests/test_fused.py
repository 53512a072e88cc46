"""The fused gate kernels (diff_pruning/fused.py) against the eager gate code of gates.py.

For the same seed, both paths must draw the same noise and give the same gates, outputs, penalties and gradients of
`w`, `alpha`, the bias's diff and the group logit. The suite runs the kernels uncompiled (conftest.py); one test here
compiles them (Inductor, a few seconds, shapes dynamic so that one graph serves every size).
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from peft_diffprune.diff_pruning import fused, gates
from peft_diffprune.diff_pruning.functional import gated_diff_linear


STRETCH = (-1.5, 1.5)
WEIGHTS = {"product": gates.L0Weights(0.01, 0.02), "sum": gates.L0Weights(0.01, 0.02, "sum")}
#: bf16 state: the fused path rounds the gradient of alpha once, the eager one twice (task part, then penalty's)
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3}}


@pytest.fixture
def fused_mode():
    """Run the body under a given mode, and restore the suite's afterwards."""
    yield fused.set_mode
    fused.set_mode(None)


def _layer_step(dtype=torch.float32, structured=False, group_penalty="product", rows=False, penalty=True):
    """Forward and backward of a gated linear layer (with a gated bias) and of a gated tensor (only `rows` of it
    if `rows`), all from seed 3: outputs, penalties and the gradients of every input."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0, shift=0.0, grad=True):
        value = (torch.randn(*shape, generator=generator) * scale + shift).to(dtype)
        return value.requires_grad_(grad)

    w, alpha = tensor(24, 16, scale=0.1), tensor(24, 16, scale=2.0, shift=1.0)  # gates at 0, at 1 and between
    w_bias, alpha_bias = tensor(24, scale=0.1), tensor(24, scale=2.0, shift=1.0)
    weight, bias, x = tensor(24, 16, grad=False), tensor(24, grad=False), tensor(5, 16)
    group_alpha = torch.full((1,), 0.5, requires_grad=True) if structured else None
    weights = WEIGHTS[group_penalty] if penalty else None
    torch.manual_seed(3)
    group = gates.sample_group_gate(group_alpha, STRETCH) if structured else None
    out, weight_penalty, bias_penalty = gated_diff_linear(
        x, weight, bias, STRETCH, (w, alpha, group, group_alpha), (w_bias, alpha_bias, None, None), weights
    )
    delta, penalty_value = gates.hard_concrete_delta_and_penalty(
        w, alpha, STRETCH, group, torch.tensor([1, 5, 7]) if rows else None, group_alpha, weights
    )
    loss = (out.float() ** 2).sum() + (delta.float() * torch.linspace(-1, 1, delta.shape[-1])).sum()
    if penalty:
        loss = loss + 3 * weight_penalty + 5 * bias_penalty + 7 * penalty_value
    loss.backward()
    results = {"out": out, "delta": delta, "weight_penalty": weight_penalty, "bias_penalty": bias_penalty}
    results["penalty"] = penalty_value
    leaves = {"x": x, "w": w, "alpha": alpha, "w_bias": w_bias, "alpha_bias": alpha_bias, "group_alpha": group_alpha}
    results.update({f"grad_{name}": leaf.grad for name, leaf in leaves.items() if leaf is not None})
    return {name: value.detach() for name, value in results.items()}


def _assert_same(fused_results, eager_results, dtype):
    assert fused_results.keys() == eager_results.keys()
    for name, value in eager_results.items():
        torch.testing.assert_close(fused_results[name], value, **TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "case",
    [{}, {"rows": True}, {"penalty": False}, {"structured": True}, {"structured": True, "group_penalty": "sum"}],
    ids=["plain", "rows", "no-penalty", "structured", "structured-sum"],
)
def test_fused_math_matches_the_eager_gates(fused_mode, dtype, case):
    fused_mode("off")
    eager = _layer_step(dtype, **case)
    fused_mode("eager")
    _assert_same(_layer_step(dtype, **case), eager, dtype)


@pytest.mark.parametrize("redraw", [False, True], ids=["kept", "redrawn"])
def test_same_seed_same_gates(redraw, monkeypatch):
    """The fused sample draws its noise from torch's default generator, as the eager one: the same gates, kept from
    forward or drawn again for backward (without moving the generator)."""
    monkeypatch.setattr(gates, "_redraw", redraw)
    alpha, w = torch.linspace(-3, 5, 300), torch.ones(300)
    torch.manual_seed(5)
    z, draw, delta, elements = gates.gate_forward(w, alpha, None, STRETCH, open_sum=True)
    assert (z is None, draw is None) == (redraw, not redraw)
    if redraw:
        after = torch.get_rng_state()
        z = gates.redrawn_gate(draw, alpha, STRETCH, w.dtype)  # the forward's gate, drawn again
        assert torch.equal(torch.get_rng_state(), after)
    torch.manual_seed(5)
    reference = gates.sample_gate_from_noise(alpha, torch.rand(300), STRETCH)
    torch.testing.assert_close(z, reference)
    torch.testing.assert_close(delta, reference)
    torch.testing.assert_close(elements, torch.sigmoid(alpha - gates.l0_shift(STRETCH)).sum())
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
    reason="Inductor's CPU backend needs a C++ compiler (the fallback is tested below)",
)
@pytest.mark.parametrize(
    ("redraw", "kernels"), [(False, {"sample", "adapted", "grads"}), (True, {"sampled", "gate", "adapted", "grads"})]
)
def test_compiled_kernels_match_the_eager_gates(fused_mode, caplog, monkeypatch, redraw, kernels):
    """Inductor's kernels (compiled here: about 10 s, once per machine, then cached) give the eager code's values,
    with the gates kept for backward (the default) and drawn again there."""
    monkeypatch.setattr(fused, "_compiled", {})
    gates.set_redraw_gates(redraw)
    try:
        fused_mode("off")
        eager = _layer_step()
        fused_mode("compile")
        with caplog.at_level(logging.WARNING, logger=fused.__name__):
            compiled = _layer_step()
    finally:
        gates.set_redraw_gates(None)
    assert not [r for r in caplog.records if r.name == fused.__name__], "compiling the fused gate kernels failed"
    assert set(fused._compiled) == kernels
    _assert_same(compiled, eager, torch.float32)


def test_a_failing_compile_falls_back_to_the_eager_gates(fused_mode, monkeypatch, caplog):
    """Where Inductor cannot compile (no C++ compiler), one warning says so and the eager code runs, same values."""
    fused_mode("off")
    eager = _layer_step()

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return compiled

    fused_mode("compile")
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        first = _layer_step()
        second = _layer_step()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "(RuntimeError: no C++ compiler found)" in warnings[0]
    assert "PEFT_DIFFPRUNE_FUSED_GATES=off" in warnings[0]
    _assert_same(first, eager, torch.float32)
    _assert_same(second, eager, torch.float32)


def test_bad_mode_is_refused(fused_mode, monkeypatch):
    with pytest.raises(ValueError, match="must be one of"):
        fused_mode("fast")
    monkeypatch.setenv(fused.ENV_VAR, "yes")
    fused_mode(None)
    with pytest.raises(ValueError, match="PEFT_DIFFPRUNE_FUSED_GATES must be one of"):
        fused.mode()


def test_a_bad_redraw_setting_is_refused(monkeypatch):
    monkeypatch.setattr(gates, "_redraw", None)
    monkeypatch.setenv(gates.REDRAW_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="PEFT_DIFFPRUNE_REDRAW_GATES must be '0'"):
        gates.redraw_gates()
    monkeypatch.setenv(gates.REDRAW_ENV_VAR, "1")
    assert gates.redraw_gates()
