"""Selective activation checkpointing (`selective_checkpointing`) and checkpointed scoring of a candidate pool."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import CAUSAL_LM_CASES, MODEL_CASES
from peft import get_peft_model
from test_pool import assert_same_step, pool_model, pool_states, randomise
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peft_diffprune import DiffPruningConfig, select_pool, selective_checkpointing
from peft_diffprune.diff_pruning.checkpointing import checkpointed_layers, enable_checkpointing
from peft_diffprune.diff_pruning.pool import pool_positions


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def with_dropout(model: nn.Module, p: float = 0.1) -> nn.Module:
    """The tiny models are dropout-free; dropout makes the recomputation's random draws matter."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    return model


def build(model_name: str, method: str, checkpointing: str | None, dropout: bool = False):
    case = {**MODEL_CASES, **CAUSAL_LM_CASES}[model_name]
    if method == "pool":
        model = pool_model(case)
    else:
        config = DiffPruningConfig(task_type=case.task_type, target_sparsity=0.05, l0_lambda=1e-2)
        model = get_peft_model(case.model(), config)
    if dropout:
        with_dropout(model)
    if checkpointing == "selective":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=selective_checkpointing())
    elif checkpointing == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "pool":
        select_pool(model, [case.batch(1)])
    randomise(model)
    return model, case


def train_step(model, batch, seed: int = 0):
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    counter = _CountOps()
    loss = model(**batch).loss
    with counter:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.counts


@pytest.mark.parametrize(
    "model_name,method,dropout",
    [("bert", "pool", True), ("llama", "pool", False), ("bert", "dense", True), ("gpt2", "pool", False)],
)
def test_selective_checkpointing_gives_the_gradients_of_training_without_it(model_name, method, dropout):
    model, case = build(model_name, method, None, dropout)
    reference = train_step(model, case.batch())[:2]
    model, _ = build(model_name, method, "selective", dropout)
    assert checkpointed_layers(model)
    assert_same_step(reference, train_step(model, case.batch())[:2])


def test_selective_checkpointing_recomputes_the_elementwise_work_not_the_products():
    # backward reruns a checkpointed layer's GELU and layer norms in both modes; the matrix products (addmm, in
    # the forward only) rerun under full checkpointing and come from the cache under selective checkpointing
    aten = torch.ops.aten
    counts = {}
    for mode in (None, "full", "selective"):
        model, case = build("bert", "pool", mode)
        counts[mode] = train_step(model, case.batch())[2]
    assert counts[None][aten.gelu.default] == 0 and counts[None][aten.addmm.default] == 0
    layers = MODEL_CASES["bert"].model().config.num_hidden_layers
    for mode in ("full", "selective"):
        assert counts[mode][aten.gelu.default] == layers, mode
        assert counts[mode][aten.native_layer_norm.default] >= 2 * layers, mode
    assert counts["full"][aten.addmm.default] >= 6 * layers  # query, key, value, output, intermediate, output
    assert counts["selective"][aten.addmm.default] == 0


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
def test_choosing_a_pool_checkpoints_its_layers_in_eval_mode(model_name, mode, training):
    # transformers checkpoints a layer only in training mode, and scoring runs in eval mode (no dropout): with
    # checkpointing on, scoring checkpoints anyway, with the eval forward and no KV cache (which a causal LM in eval
    # mode would fill twice, once more in the recomputation), and chooses the same pool
    case = {**MODEL_CASES, **CAUSAL_LM_CASES}[model_name]
    chosen = {}
    for checkpointing in (None, mode):
        model = with_dropout(pool_model(case))
        if checkpointing == "selective":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=selective_checkpointing())
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train(training)
        calls = []
        for layer in checkpointed_layers(model):
            function = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _f=function, _calls=calls, **k: (
                _calls.append(1) or _f(*a, **k)
            )
        flags = {name: module.training for name, module in model.named_modules()}
        select_pool(model, [case.batch(1), case.batch(2)])
        assert {name: module.training for name, module in model.named_modules()} == flags
        assert len(calls) == (2 * case.model().config.num_hidden_layers if checkpointing else 0)
        chosen[checkpointing] = {key: pool_positions(*value).clone() for key, value in pool_states(model).items()}
    assert chosen[mode].keys() == chosen[None].keys()
    for key, positions in chosen[mode].items():
        assert torch.equal(positions, chosen[None][key]), key


def test_enable_checkpointing_modes():
    case = MODEL_CASES["bert"]
    for mode, context in (("full", None), ("selective", selective_checkpointing()["context_fn"])):
        model = pool_model(case)
        enable_checkpointing(model, mode)
        layers = checkpointed_layers(model)
        assert len(layers) == case.model().config.num_hidden_layers
        assert layers[0]._gradient_checkpointing_func.keywords.get("context_fn") is context
        assert layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is False
    model = pool_model(case)
    enable_checkpointing(model, "none")
    assert not checkpointed_layers(model)
    with pytest.raises(ValueError, match="selective"):
        enable_checkpointing(model, "partial")
