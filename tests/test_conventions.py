"""PEFT's layer conventions: the size attributes of wrapped layers, and which adapters train after loading."""

from __future__ import annotations

import pytest
from conftest import MODEL_CASES
from peft import LNTuningConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

from peft_diffprune import DiffPruningConfig
from peft_diffprune.diff_pruning.layer import DiffPruningLayer


class AllLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 5)
        self.embedding = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(3, 4, kernel_size=3)
        self.conv1d = Conv1D(7, 6)  # transformers' GPT-2 layer: weight (nx=6, nf=7)
        self.layer_norm = nn.LayerNorm(6)
        self.rms_norm = nn.RMSNorm(6)
        self.llama_norm = LlamaRMSNorm(6)


def wrapped(config) -> dict[str, nn.Module]:
    model = get_peft_model(AllLayers(), config)
    return {name.rpartition(".")[2]: m for name, m in model.base_model.model.named_children()}


EXPECTED = {
    "linear": {"in_features": 6, "out_features": 5},
    "embedding": {"in_features": 11, "out_features": 6, "num_embeddings": 11, "embedding_dim": 6},
    "conv": {"in_features": 3, "out_features": 4, "in_channels": 3, "out_channels": 4},
    "conv1d": {"in_features": 6, "out_features": 7, "nf": 7},
    "layer_norm": {"in_features": 6, "out_features": 6, "normalized_shape": (6,)},
    "rms_norm": {"in_features": 6, "out_features": 6, "normalized_shape": (6,)},
    "llama_norm": {"in_features": 6, "out_features": 6, "normalized_shape": (6,)},
}


def test_every_wrapped_layer_exposes_its_sizes():
    layers = wrapped(DiffPruningConfig(target_modules=list(EXPECTED)))
    for name, attributes in EXPECTED.items():
        assert isinstance(layers[name], DiffPruningLayer), name
        for attr, value in attributes.items():
            assert getattr(layers[name], attr) == value, (name, attr)


def test_sizes_match_peft_lora():
    lora_targets = ["linear", "embedding", "conv", "conv1d"]
    ours = wrapped(DiffPruningConfig(target_modules=lora_targets))
    lora = wrapped(LoraConfig(target_modules=lora_targets, r=2))
    for name in lora_targets:
        assert (ours[name].in_features, ours[name].out_features) == (lora[name].in_features, lora[name].out_features)


def test_norm_layers_expose_what_peft_ln_tuning_exposes_and_more():
    norms = ["layer_norm", "rms_norm", "llama_norm"]
    ours = wrapped(DiffPruningConfig(target_modules=norms))
    ln_tuning = wrapped(LNTuningConfig(target_modules=norms))
    for name in norms:
        peft_attributes = {"in_features", "out_features"}
        assert peft_attributes <= set(vars(ln_tuning[name])), name
        assert all(getattr(ours[name], attr) is not None for attr in peft_attributes), name


def adapter_requires_grad(model: nn.Module) -> dict[str, set[bool]]:
    """For each adapter name: the `requires_grad` flags of its parameters (adapter state and task head copies)."""
    flags: dict[str, set[bool]] = {}
    for name, param in model.named_parameters():
        for adapter_name in ("default", "other"):
            if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                flags.setdefault(adapter_name, set()).add(param.requires_grad)
    return flags


def config_for(method: str):
    if method == "lora":
        return LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], init_lora_weights=False)
    return DiffPruningConfig(task_type="SEQ_CLS", target_modules=["query", "value"], init_weights=False)


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    folders = {}
    for method in ("lora", "diff_pruning"):
        folders[method] = tmp_path_factory.mktemp(method)
        get_peft_model(MODEL_CASES["bert"].model(), config_for(method)).save_pretrained(folders[method])
    return folders


def trainability(folder, first_trainable: bool) -> list[dict[str, set[bool]]]:
    """requires_grad per adapter after from_pretrained, after load_adapter("other", is_trainable=True), and after
    switching to "other"."""
    model = PeftModel.from_pretrained(MODEL_CASES["bert"].model(), folder, is_trainable=first_trainable)
    steps = [adapter_requires_grad(model)]
    model.load_adapter(folder, "other", is_trainable=True)
    steps.append(adapter_requires_grad(model))
    model.set_adapter("other")
    steps.append(adapter_requires_grad(model))
    return steps


@pytest.mark.parametrize("first_trainable", [True, False], ids=["trainable", "inference"])
def test_trainable_adapters_after_loading_match_lora(saved_adapters, first_trainable):
    ours = trainability(saved_adapters["diff_pruning"], first_trainable)
    assert ours == trainability(saved_adapters["lora"], first_trainable)
    # PEFT 0.21: from_pretrained trains the loaded adapter only if asked; load_adapter(..., is_trainable=True) makes
    # the new adapter trainable beside the active one; set_adapter trains the active one only
    assert ours[0] == {"default": {first_trainable}}
    assert ours[1] == {"default": {first_trainable}, "other": {True}}
    assert ours[2] == {"default": {False}, "other": {True}}
