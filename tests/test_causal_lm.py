"""Causal language models end to end (`task_type="CAUSAL_LM"`): training, generation with the KV cache, projection,
save and load, merging; tied input embedding and LM head sharing one diff; gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import CAUSAL_LM_CASES, VOCAB_SIZE, training_losses
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_diffprune import DiffPruningConfig, expected_l0, project_to_sparsity
from peft_diffprune.diff_pruning.layer import DiffPruningLayer
from peft_diffprune.diff_pruning.model import get_tuner
from peft_diffprune.diff_pruning.sparse import base_parameter_count


CAUSAL_LMS = list(CAUSAL_LM_CASES)
TIED = ["gpt2", "llama_tied"]
TIED_PAIRS = {"gpt2": ["wte", "lm_head"], "llama_tied": ["embed_tokens", "lm_head"]}
STATE_MARK = ".diff_pruning_state."


def adapted(model_name: str, seed: int = 0, **config_kwargs) -> PeftModel:
    config = DiffPruningConfig(task_type="CAUSAL_LM", init_weights=False, **config_kwargs)
    return get_peft_model(CAUSAL_LM_CASES[model_name].model(seed), config)


def prompt() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 5), generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def greedy(model: nn.Module, use_cache: bool = True) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.generate(**prompt(), max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=2)


def eval_logits(model: nn.Module, model_name: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**CAUSAL_LM_CASES[model_name].batch()).logits


def train_steps(model: PeftModel, model_name: str, steps: int = 4) -> list[float]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return training_losses(model, CAUSAL_LM_CASES[model_name].batch(), optimizer, steps)


@pytest.mark.parametrize("model_name", CAUSAL_LMS)
def test_causal_lm_end_to_end(model_name, tmp_path):
    model = adapted(model_name, l0_lambda=1e-4)
    losses = train_steps(model, model_name)
    assert losses[-1] < losses[0], losses

    for stage in ("gated", "sparse"):
        if stage == "sparse":
            project_to_sparsity(model, 0.2)
            assert train_steps(model, model_name, steps=2)  # the fixed-mask stage trains too
        logits, tokens = eval_logits(model, model_name), greedy(model)
        assert tokens.shape == (2, 11)
        assert torch.equal(greedy(model, use_cache=False), tokens), stage
        with model.disable_adapter():
            assert not torch.allclose(eval_logits(model, model_name), logits), stage
        model.merge_adapter()
        torch.testing.assert_close(eval_logits(model, model_name), logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(greedy(model), tokens), stage
        model.unmerge_adapter()

    model.save_pretrained(tmp_path)
    # adapter state only: PEFT's default would add the base model's input and output embeddings to the file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(STATE_MARK in key for key in saved), sorted(k for k in saved if STATE_MARK not in k)
    loaded = PeftModel.from_pretrained(CAUSAL_LM_CASES[model_name].model(0), tmp_path)
    assert torch.equal(eval_logits(loaded, model_name), logits)
    assert torch.equal(greedy(loaded), tokens)

    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, DiffPruningLayer) for m in merged.modules())
    torch.testing.assert_close(eval_logits(merged, model_name), logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(greedy(merged), tokens)


# ----------------------------------------------------------------------------------------------------------------
# tied input embedding and LM head


def tied_pair(model: PeftModel) -> tuple[DiffPruningLayer, DiffPruningLayer]:
    base = model.get_base_model()
    return base.get_input_embeddings(), base.get_output_embeddings()


def shared_delta(model: PeftModel) -> torch.Tensor:
    """The dense diff of the shared weight: deterministic gate times diff, or the scattered sparse values."""
    embedding, _ = tied_pair(model)
    return embedding.get_delta_weight("default", "weight")


def by_hand(model_name: str, delta: torch.Tensor, lm_head_only: bool = False) -> nn.Module:
    """The base model with `W + delta` as its tied weight (or, to show both uses matter, as the LM head's only)."""
    reference = CAUSAL_LM_CASES[model_name].model(0)
    with torch.no_grad():
        if lm_head_only:
            head = reference.get_output_embeddings()
            head.weight = nn.Parameter(head.weight + delta)
        else:
            reference.get_input_embeddings().weight.add_(delta)
    return reference


@pytest.mark.parametrize("model_name", TIED)
def test_tied_embedding_and_lm_head_share_one_diff(model_name, tmp_path):
    # only the tied pair carries a diff, so that the model is the base model with one changed weight
    model = adapted(model_name, target_modules=TIED_PAIRS[model_name])
    embedding, head = tied_pair(model)
    assert isinstance(embedding, DiffPruningLayer) and isinstance(head, DiffPruningLayer)
    assert embedding.get_base_layer().weight is head.get_base_layer().weight
    assert head._shared_diff[0] is embedding
    # one diff: the LM head holds no state of its own for the shared weight
    head_state = [name for name, _ in head.named_parameters() if STATE_MARK in name]
    assert head_state == []

    for stage in ("gated", "sparse"):
        if stage == "sparse":
            report = project_to_sparsity(model, 0.05)
            config = model.peft_config["default"]
            key = next(k for k in config.kept_pattern if k.endswith(("wte.weight", "embed_tokens.weight")))
            assert not any("lm_head" in k for k in config.kept_pattern)
            # the shared tensor is counted once, in the budget and in the report
            total = base_parameter_count(get_tuner(model))
            assert total == sum(p.numel() for p in CAUSAL_LM_CASES[model_name].model(0).parameters())
            assert report.kept == round(0.05 * total)
            assert [t.name for t in report.tensors].count(key) == 1 and not any(
                "lm_head" in t.name for t in report.tensors
            )
        delta = shared_delta(model)
        assert delta.count_nonzero() > 0
        logits = eval_logits(model, model_name)
        torch.testing.assert_close(logits, eval_logits(by_hand(model_name, delta), model_name), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(logits, eval_logits(by_hand(model_name, delta, lm_head_only=True), model_name))

        # merged once into the one shared weight, restored bit for bit
        weight = embedding.get_base_layer().weight
        original = weight.detach().clone()
        model.merge_adapter()
        expected = original.reshape(-1).index_add(0, *shared_entries(model)).view_as(original)
        assert torch.equal(weight, expected)
        torch.testing.assert_close(eval_logits(model, model_name), logits, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
        assert torch.equal(weight, original)

    # stored once, loaded into both uses
    model.save_pretrained(tmp_path)
    saved = [key for key in load_file(tmp_path / "adapter_model.safetensors") if "diff_pruning_state" in key]
    assert saved and all("wte" in key or "embed_tokens" in key for key in saved)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(
            CAUSAL_LM_CASES[model_name].model(0), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage
        )
        assert torch.equal(eval_logits(loaded, model_name), logits)
        loaded_embedding, loaded_head = tied_pair(loaded)
        assert isinstance(loaded_head, DiffPruningLayer) and loaded_head._shared_diff[0] is loaded_embedding
        # PEFT saves targeted embedding layers in full; loading them with assign=True must not untie them
        assert loaded_embedding.get_base_layer().weight is loaded_head.get_base_layer().weight
        merged = loaded.merge_and_unload()
        assert merged.get_input_embeddings().weight is merged.get_output_embeddings().weight
        torch.testing.assert_close(eval_logits(merged, model_name), logits, rtol=1e-5, atol=1e-6)


def shared_entries(model: PeftModel) -> tuple[torch.Tensor, torch.Tensor]:
    embedding, _ = tied_pair(model)
    state = embedding.diff_pruning_state["default"]
    return state.sparse_delta("weight", embedding.get_base_layer().weight.numel())


@pytest.mark.parametrize("model_name", TIED)
def test_tied_weight_is_penalised_once_and_trained_by_both_uses(model_name):
    model = adapted(model_name, l0_lambda=1e-3)
    alphas = [p for name, p in model.named_parameters() if name.endswith("_alpha")]
    expected = sum(torch.sigmoid(a.detach().double()).sum().item() for a in alphas)
    assert expected_l0(model).item() == pytest.approx(expected, rel=1e-6)

    model.train()
    embedding, _ = tied_pair(model)
    torch.manual_seed(0)
    model(**CAUSAL_LM_CASES[model_name].batch()).loss.backward()
    # the LM head's use of the shared diff reaches every row, the lookup alone only the rows of the batch
    grad = embedding.diff_pruning_state["default"].weight_diff.grad
    assert (grad.abs().sum(1) > 0).all()


@pytest.mark.parametrize("target", [["lm_head"], ["wte"]])
def test_targeting_one_of_a_tied_pair_raises(target):
    with pytest.raises(ValueError, match="tied weights") as error:
        get_peft_model(CAUSAL_LM_CASES["gpt2"].model(), DiffPruningConfig(target_modules=target))
    other = "transformer.wte" if target == ["lm_head"] else "lm_head"
    assert other in str(error.value)


def test_lm_head_in_modules_to_save_keeps_its_own_copy():
    model = get_peft_model(
        CAUSAL_LM_CASES["gpt2"].model(), DiffPruningConfig(task_type="CAUSAL_LM", modules_to_save=["lm_head"])
    )
    embedding = model.get_base_model().get_input_embeddings()
    assert isinstance(embedding, DiffPruningLayer)
    assert any(name.startswith("base_model.model.lm_head.modules_to_save") for name, _ in model.named_parameters())


# ----------------------------------------------------------------------------------------------------------------
# gradient checkpointing


def checkpointed_grads(model_name: str, **checkpointing_kwargs) -> dict[str, torch.Tensor]:
    model = adapted(model_name, l0_lambda=1e-3, structured=True)
    if checkpointing_kwargs:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        assert model.get_base_model().is_gradient_checkpointing
    model.train()
    torch.manual_seed(0)
    model(**CAUSAL_LM_CASES[model_name].batch()).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(model_name, use_reentrant):
    """torch's checkpoint restores the RNG state before recomputing a layer (`preserve_rng_state=True`, the default),
    so the recomputed forward draws the same gates."""
    reference = checkpointed_grads(model_name)
    grads = checkpointed_grads(model_name, use_reentrant=use_reentrant)
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_without_the_rng_state_resamples_the_gates():
    """Shows what `preserve_rng_state` protects: without it the recomputed layers draw other gates."""
    reference = checkpointed_grads("llama")
    grads = checkpointed_grads("llama", use_reentrant=False, preserve_rng_state=False)
    assert any(not torch.allclose(grads[name], reference[name]) for name in grads if "layers.0" in name)
