"""PEFT's dtype contract for diff pruning state: `autocast_adapter_dtype=True` (the default) keeps diffs, gate
logits and sparse values in fp32 on a half-precision base, `False` keeps them in the base dtype; the gate math runs
in fp32 either way."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_CASES, no_grad_logits, training_losses
from peft import PeftModel, get_peft_model
from torch import nn

import peft_diffprune.diff_pruning.layer as layer_module
from peft_diffprune import DiffPruningConfig, expected_l0, project_to_sparsity
from peft_diffprune.diff_pruning.gates import L0_BLOCK
from peft_diffprune.diff_pruning.gates import expected_l0 as gate_expected_l0


STATE_MARK = ".diff_pruning_state."
# bert: nn.Linear (fast path), nn.Embedding (row path), LayerNorm (functional_call); gpt2: Conv1D (functional_call)
MODEL_NAMES = ["bert", "gpt2"]


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the diff states (diffs, logits, group logits, positions, values)."""
    return {key: value for key, value in model.state_dict().items() if STATE_MARK in key}


def bf16_model(model_name: str, autocast_adapter_dtype: bool, **config_kwargs) -> PeftModel:
    case = MODEL_CASES[model_name]
    config = DiffPruningConfig(task_type=case.task_type, init_weights=False, **config_kwargs)
    return get_peft_model(case.model(dtype=torch.bfloat16), config, autocast_adapter_dtype=autocast_adapter_dtype)


def bf16_batch(model_name: str) -> dict[str, torch.Tensor]:
    return {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in MODEL_CASES[model_name].batch().items()
    }


def assert_state_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    tensors = adapter_tensors(model)
    assert tensors
    for key, tensor in tensors.items():
        expected = torch.uint8 if key.endswith("_positions") else dtype
        assert tensor.dtype == expected, key


@pytest.mark.parametrize("autocast, state_dtype", [(True, torch.float32), (False, torch.bfloat16)])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_state_dtype_follows_autocast_adapter_dtype(model_name, autocast, state_dtype):
    model = bf16_model(model_name, autocast, structured=True)
    assert any(key.endswith("_group_alpha") for key in adapter_tensors(model))
    assert_state_dtypes(model, state_dtype)

    # projection keeps the adapter's dtype; the positions stay a uint8 code
    project_to_sparsity(model, 0.05)
    assert any(key.endswith("_positions") for key in adapter_tensors(model))
    assert_state_dtypes(model, state_dtype)
    model.to(torch.float16)  # a cast of the model never touches the positions
    assert_state_dtypes(model, torch.float16)


def test_fp32_base_keeps_fp32_state():
    model = get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(task_type="SEQ_CLS"))
    assert_state_dtypes(model, torch.float32)


def sgd_losses(model: PeftModel, batch: dict[str, torch.Tensor]) -> list[float]:
    # plain SGD keeps the step in the parameters' dtype, so a bf16 state really trains in bf16
    return training_losses(model, batch, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5))


@pytest.mark.parametrize("autocast", [True, False], ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("structured", [False, True], ids=["unstructured", "structured"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_training_steps_decrease_the_loss(model_name, structured, autocast):
    model = bf16_model(model_name, autocast, structured=structured, l0_lambda=1e-4)
    batch = bf16_batch(model_name)
    losses = sgd_losses(model, batch)
    assert losses[-1] < losses[0], losses
    assert_state_dtypes(model, torch.float32 if autocast else torch.bfloat16)

    # the fixed-mask stage (sparse values, the sampled-gradient nn.Linear path) trains in that dtype too
    project_to_sparsity(model, 0.2)
    losses = sgd_losses(model, batch)
    assert losses[-1] < losses[0], losses
    assert_state_dtypes(model, torch.float32 if autocast else torch.bfloat16)


def test_expected_l0_of_bf16_logits_is_summed_in_fp32():
    """2^25 bf16 logits (two blocks): the fp32 block sum matches an fp64 reference, as a bf16 total cannot be."""
    generator = torch.Generator().manual_seed(0)
    alpha = (torch.randn(1 << 25, generator=generator) * 3 + 2).to(torch.bfloat16).requires_grad_()
    assert alpha.numel() > L0_BLOCK
    reference = torch.sigmoid(alpha.detach().double()).sum()

    value = gate_expected_l0(alpha, (-1.5, 1.5))
    assert value.dtype == torch.float32
    assert abs(value.double() - reference) / reference < 1e-6
    # a bf16 total alone is 0.2% off
    assert abs(torch.sigmoid(alpha.detach()).sum(dtype=torch.bfloat16).double() - reference) / reference > 1e-3

    value.backward()
    assert alpha.grad.dtype == torch.bfloat16
    s = torch.sigmoid(alpha.detach().double())
    # fp32 sigmoids saturate to exactly 1 beyond alpha = 17, where s (1 - s) < 1e-7
    torch.testing.assert_close(alpha.grad.double(), s * (1 - s), rtol=2**-8, atol=1e-7)


def penalty_reference(model: PeftModel) -> float:
    """`E[L0]` over every gated tensor, in fp64."""
    return sum(
        torch.sigmoid(value.double()).sum().item()
        for key, value in adapter_tensors(model).items()
        if key.endswith("_alpha") and not key.endswith("_group_alpha")
    )


def test_model_penalty_with_bf16_state_matches_fp64():
    model = bf16_model("bert", False)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("_alpha"):
                param.copy_(torch.randn_like(param, dtype=torch.float32) * 3)
    assert expected_l0(model).item() == pytest.approx(penalty_reference(model), rel=1e-6)


def fp32_twin(model: PeftModel) -> PeftModel:
    """The same model, base and adapter state upcast to fp32 (the same values)."""
    return copy.deepcopy(model).to(torch.float32)


def seeded_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.train()
    torch.manual_seed(0)
    model(**batch).loss.backward()
    return {key: p.grad for key, p in model.named_parameters() if STATE_MARK in key and p.requires_grad}


@pytest.mark.parametrize("structured", [False, True], ids=["unstructured", "structured"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_bf16_state_gradients_match_fp32(model_name, structured, monkeypatch):
    """Same gates (same seed), same values: the bf16 model's adapter gradients are the fp32 ones within bf16
    tolerance, in the parameters' dtype, on every path (Linear fast path, Embedding rows, functional_call)."""
    model = bf16_model(model_name, False, structured=structured, l0_lambda=1e-3)
    reference = fp32_twin(model)
    fast_path_calls = []
    gated_diff_linear = layer_module.gated_diff_linear
    monkeypatch.setattr(
        layer_module, "gated_diff_linear", lambda x, *a: fast_path_calls.append(x.dtype) or gated_diff_linear(x, *a)
    )

    grads = seeded_grads(model, bf16_batch(model_name))
    reference_grads = seeded_grads(reference, MODEL_CASES[model_name].batch())

    if model_name == "bert":  # nn.Linear layers train through the fused autograd function in bf16 too
        assert fast_path_calls.count(torch.bfloat16) == fast_path_calls.count(torch.float32) > 0
    assert grads.keys() == reference_grads.keys()
    assert any(key.endswith("_group_alpha") for key in grads) == structured
    for key, grad in grads.items():
        expected = reference_grads[key]
        assert grad is not None and grad.dtype == torch.bfloat16, key
        scale = expected.abs().max().item()
        torch.testing.assert_close(grad.float(), expected, rtol=0, atol=0.1 * scale + 1e-6, msg=key)
    # overall agreement is much tighter than the worst entry
    flat, flat_reference = (torch.cat([g.float().reshape(-1) for g in d.values()]) for d in (grads, reference_grads))
    assert torch.nn.functional.cosine_similarity(flat, flat_reference, dim=0) > 0.9999


@pytest.mark.parametrize("projected", [False, True], ids=["gated", "sparse"])
@pytest.mark.parametrize("autocast", [True, False], ids=["fp32-state", "bf16-state"])
def test_save_load_round_trip(tmp_path, autocast, projected):
    model = bf16_model("bert", autocast).eval()
    if projected:
        project_to_sparsity(model, 0.05)
    batch = bf16_batch("bert")
    expected = no_grad_logits(model, batch)
    saved = adapter_tensors(model)
    model.save_pretrained(tmp_path)

    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(
            MODEL_CASES["bert"].model(dtype=torch.bfloat16),
            tmp_path,
            autocast_adapter_dtype=autocast,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        assert_state_dtypes(loaded, torch.float32 if autocast else torch.bfloat16)
        assert adapter_tensors(loaded).keys() == saved.keys()
        for key, value in adapter_tensors(loaded).items():
            assert torch.equal(value, saved[key]), key
        assert torch.equal(no_grad_logits(loaded, batch), expected)

    # the other precision on load: a bf16 adapter is upcast, an fp32 one rounded (losslessly here: its values were
    # drawn in bf16)
    other = PeftModel.from_pretrained(
        MODEL_CASES["bert"].model(dtype=torch.bfloat16), tmp_path, autocast_adapter_dtype=not autocast
    )
    assert_state_dtypes(other, torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(no_grad_logits(other, batch), expected)


def test_load_adapter_follows_autocast_adapter_dtype(tmp_path):
    bf16_model("bert", False).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(MODEL_CASES["bert"].model(dtype=torch.bfloat16), tmp_path)
    model.load_adapter(tmp_path, "bf16", autocast_adapter_dtype=False)
    dtypes = {
        name: {v.dtype for k, v in adapter_tensors(model).items() if f"{STATE_MARK}{name}." in k}
        for name in ("default", "bf16")
    }
    assert dtypes == {"default": {torch.float32}, "bf16": {torch.bfloat16}}
