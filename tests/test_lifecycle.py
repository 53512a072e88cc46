"""The lifecycle of a diff pruning adapter on tiny random transformers, table-driven as PEFT's `test_custom_models.py`.

Every row of `TEST_CASES` (a model family from `conftest.MODEL_CASES` and `DiffPruningConfig` keyword arguments) runs
through the same checks: identity at init, which parameters get diffs, what an optimizer step changes, the L0 term in
the loss, merging and unloading, disabling, several adapters, saving and loading. Dtype and bug-specific checks
follow the table.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_CASES
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from peft_diffprune import DiffPruningConfig, expected_l0, param_groups, project_to_sparsity
from peft_diffprune.diff_pruning.layer import DiffPruningLayer


ADAPTER_MARK = ".diff_pruning_state."
HEAD_MARK = ".modules_to_save."
L0_LAMBDA = 1e-2

TEST_CASES = [
    # (id, model family, DiffPruningConfig kwargs)
    ("bert", "bert", {}),
    ("bert-structured", "bert", {"structured": True}),
    ("bert-structured-sum", "bert", {"structured": True, "group_penalty": "sum", "init_weights": False}),
    ("bert-subset", "bert", {"target_modules": ["query", "LayerNorm"]}),
    ("bert-random-init", "bert", {"init_weights": False}),
    # Louizos et al.'s stretch has a non-zero shift log(-l / r) in E[L0]
    ("bert-louizos-stretch", "bert", {"stretch": (-0.1, 1.1), "alpha_init": 2.0, "structured": True}),
    ("roberta", "roberta", {}),
    ("roberta-structured", "roberta", {"structured": True}),
    ("roberta-subset", "roberta", {"target_modules": ["value", "word_embeddings"]}),
    ("roberta-random-init", "roberta", {"init_weights": False}),
    ("gpt2", "gpt2", {}),
    ("gpt2-structured", "gpt2", {"structured": True}),
    ("gpt2-subset", "gpt2", {"target_modules": ["c_attn", "ln_1"]}),
    ("gpt2-random-init", "gpt2", {"init_weights": False}),
    ("t5", "t5", {}),
    ("t5-structured", "t5", {"structured": True}),
    ("t5-subset", "t5", {"target_modules": ["q", "layer_norm", "relative_attention_bias"]}),
    ("t5-random-init", "t5", {"init_weights": False}),
    ("llama", "llama", {}),
    ("llama-structured", "llama", {"structured": True}),
    ("llama-subset", "llama", {"target_modules": ["q_proj", "input_layernorm"]}),
    ("llama-random-init", "llama", {"init_weights": False}),
    ("vit", "vit", {}),
    ("vit-structured", "vit", {"structured": True}),
    ("vit-subset", "vit", {"target_modules": ["patch_embeddings.projection", "query"]}),
    ("vit-random-init", "vit", {"init_weights": False}),
]

#: Parameters registered directly on a module diff pruning cannot wrap get no diff (documented in
#: DiffPruningConfig.target_modules); in these models that is ViT's class token and position embeddings.
RAW_PARAMETERS = {"vit": {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}}

MODEL_NAMES = list(MODEL_CASES)
CASE_PARAMS = [pytest.param(model_name, kwargs, id=case_id) for case_id, model_name, kwargs in TEST_CASES]


def make_config(model_name: str, adapter_kwargs: dict, **overrides) -> DiffPruningConfig:
    kwargs = {"task_type": MODEL_CASES[model_name].task_type, **adapter_kwargs, **overrides}
    return DiffPruningConfig(**kwargs)


def make_models(model_name: str, adapter_kwargs: dict, **overrides) -> tuple[nn.Module, PeftModel]:
    """A reference copy of the base model and the adapted model (same seed, so the same weights)."""
    case = MODEL_CASES[model_name]
    base = case.model()
    reference = copy.deepcopy(base)
    # new adapter layers start in training mode whatever the base model's mode: set the mode explicitly
    return reference, get_peft_model(base, make_config(model_name, adapter_kwargs, **overrides)).eval()


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def seeded_loss(model: nn.Module, batch: dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(**batch).loss


def adapter_params(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    mark = f"{ADAPTER_MARK}{adapter_name}."
    return {name: param for name, param in model.named_parameters() if mark in name}


def head_params(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    mark = f"{HEAD_MARK}{adapter_name}."
    return {name: param for name, param in model.named_parameters() if mark in name}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer that is not adapter state."""
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict(keep_vars=True).items()
        if ADAPTER_MARK not in name and HEAD_MARK not in name
    }


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    changed = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not changed, f"changed: {changed[:5]}"


def assert_plain_training_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """A model without adapters adds no L0 term: its training loss equals its eval loss (the models have no dropout)."""
    with torch.no_grad():
        eval_loss = model.eval()(**batch).loss
        train_loss = model.train()(**batch).loss
    model.eval()
    assert torch.equal(train_loss, eval_loss)


def randomize_adapter(model: nn.Module, adapter_name: str = "default", seed: int = 1) -> None:
    """Make an adapter non-identity: random diffs, and gate logits spread so that deterministic gates are 0, 1 and
    in between; task heads get a small random change too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_params(model, adapter_name).items():
            if name.endswith("_diff"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            else:
                param.copy_(torch.empty(param.shape).uniform_(-1.0, 4.0, generator=generator))
        for param in head_params(model, adapter_name).values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def deterministic_deltas(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The eval-time diff of every adapted base parameter, written out: `clamp(sigmoid(alpha) (r - l) + l, 0, 1) * w`,
    times the group gate in the structured variant. Keys are base state-dict names (`...query.base_layer.weight`)."""
    left, right = model.peft_config[adapter_name].stretch

    def gate(alpha: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(alpha) * (right - left) + left).clamp(0, 1)

    params = {name: param.detach() for name, param in adapter_params(model, adapter_name).items()}
    deltas = {}
    for name, diff in params.items():
        if not name.endswith("_diff"):
            continue
        module_name, tensor = name.split(f"{ADAPTER_MARK}{adapter_name}.")
        stem = f"{module_name}{ADAPTER_MARK}{adapter_name}.{tensor.removesuffix('diff')}"
        delta = gate(params[f"{stem}alpha"]) * diff
        if f"{stem}group_alpha" in params:
            delta = delta * gate(params[f"{stem}group_alpha"])
        deltas[f"{module_name}.base_layer.{tensor.removesuffix('_diff')}"] = delta
    return deltas


def matches(module_name: str, targets: list[str]) -> bool:
    return any(module_name == t or module_name.endswith(f".{t}") for t in targets)


def expected_adapter_names(
    base: nn.Module, model_name: str, adapter_kwargs: dict, adapter_name: str = "default"
) -> set[str]:
    """Names of the diff state every targeted base parameter should have, worked out from the base model alone."""
    case = MODEL_CASES[model_name]
    owners: dict[int, list[str]] = {}
    for module_name, module in base.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module_name)
    targets = adapter_kwargs.get("target_modules")
    kinds = ("diff", "alpha", "group_alpha") if adapter_kwargs.get("structured") else ("diff", "alpha")
    names = set()
    for module_name, module in base.named_modules():
        if matches(module_name, list(case.head)) or any(module_name.startswith(f"{h}.") for h in case.head):
            continue
        if targets is not None and not matches(module_name, targets):
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)) and not type(module).__name__.endswith(
            ("LayerNorm", "RMSNorm", "Conv1D")
        ):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if owners[id(param)][0] != module_name:  # a tied weight has one diff, held by its first user
                continue
            names |= {
                f"base_model.model.{module_name}{ADAPTER_MARK}{adapter_name}.{param_name}_{kind}" for kind in kinds
            }
    return names


@pytest.mark.parametrize("model_name, adapter_kwargs", CASE_PARAMS)
class TestLifecycle:
    def test_identity_at_init(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs)
        batch = MODEL_CASES[model_name].batch()
        if not adapter_kwargs.get("init_weights", True):
            assert not torch.allclose(logits(model, batch), logits(reference, batch))
            return
        assert torch.equal(logits(model, batch), logits(reference, batch))
        # in training mode the gates are sampled, but with w = 0 every sampled diff is exactly zero (no dropout)
        reference.train()
        model.train()
        torch.manual_seed(0)
        assert torch.equal(model(**batch).logits.detach(), reference(**batch).logits.detach())

    def test_training_samples_gates(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        randomize_adapter(model)
        batch = MODEL_CASES[model_name].batch()
        model.train()

        def sampled(seed: int) -> torch.Tensor:
            torch.manual_seed(seed)
            return model(**batch).logits.detach()

        assert torch.equal(sampled(0), sampled(0))
        assert not torch.allclose(sampled(0), sampled(1))
        # sampled in training mode with or without grad mode, as dropout is: reentrant gradient checkpointing runs
        # the forward under no_grad and recomputes it with grad, and both must draw the same gates
        with_grad = sampled(0)
        torch.manual_seed(0)
        # (T5 itself rounds differently in the two modes)
        torch.testing.assert_close(logits(model, batch), with_grad, rtol=0, atol=1e-5)
        assert not torch.allclose(logits(model.eval(), batch), with_grad, rtol=0, atol=1e-5)

    def test_eval_output_independent_of_grad_mode(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        randomize_adapter(model)
        batch = MODEL_CASES[model_name].batch()
        with_grad = model(**batch).logits.detach()
        without_grad = logits(model, batch)
        # the base models themselves differ by float rounding between the two modes (T5)
        torch.testing.assert_close(without_grad, with_grad, rtol=0, atol=1e-5)
        assert torch.equal(logits(model, batch), without_grad)  # second call: from the eval cache

    def test_targeted_parameters_and_trainable_set(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs)
        expected = expected_adapter_names(reference, model_name, adapter_kwargs)
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}

        assert expected and set(adapter_params(model)) == expected
        assert trainable == expected | set(head_params(model))
        head = MODEL_CASES[model_name].head
        assert bool(head_params(model)) == bool(head)
        for name, param in adapter_params(model).items():
            assert param.dtype == torch.float32, name
            alpha_init = adapter_kwargs.get("alpha_init", 5.0)
            if name.endswith("_alpha") and not name.endswith("group_alpha"):
                assert torch.equal(param, torch.full_like(param, alpha_init)), name
            if name.endswith("group_alpha"):
                # (1,), not 0-d: FSDP2 cannot shard scalar parameters
                assert param.shape == (1,) and param.item() == alpha_init, name
            if name.endswith("_diff") and adapter_kwargs.get("init_weights", True):
                assert not param.any(), name

    def test_trainable_parameter_count(self, model_name, adapter_kwargs, capsys):
        reference, model = make_models(model_name, adapter_kwargs)
        adapter = adapter_params(model)
        diffs = sum(p.numel() for name, p in adapter.items() if name.endswith("_diff"))
        groups = sum(p.numel() for name, p in adapter.items() if name.endswith("_group_alpha"))
        alphas = sum(p.numel() for name, p in adapter.items() if name.endswith("_alpha")) - groups
        head = sum(p.numel() for p in head_params(model).values())
        head_prefixes = tuple(f"{name}." for name in MODEL_CASES[model_name].head)
        base = sum(p.numel() for name, p in reference.named_parameters() if not name.startswith(head_prefixes))
        budget = min(round(0.005 * base), diffs)

        trainable, total = model.get_nb_trainable_parameters()
        model.print_trainable_parameters()

        # PEFT's counts: every parameter with requires_grad, of every parameter of the PeftModel
        assert trainable == diffs + alphas + groups + head == sum(p.numel() for p in [*adapter.values()]) + head
        assert total == sum(p.numel() for p in model.parameters())
        expected = (
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f} "
            f"(dense diffs w ({diffs:,}) and gate logits alpha ({alphas:,}"
            + (f", and {groups:,} group logits" if groups else "")
            + ") of the gated stage"
            + (f", plus {head:,} in the task head (modules_to_save)" if head else "")
            + f"; projection will keep {budget:,} entries = {100 * budget / base:.3g}% of the base model's {base:,} "
            "parameters)\n"
        )
        assert capsys.readouterr().out == expected

    def test_param_groups(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        groups = {group["name"]: group for group in param_groups(model, lr=1e-2, alpha_lr=0.1)}

        alphas = [p for n, p in adapter_params(model).items() if n.endswith("_alpha")]
        others = [p for n, p in adapter_params(model).items() if n.endswith("_diff")] + list(
            head_params(model).values()
        )
        assert {id(p) for p in groups["alpha"]["params"]} == {id(p) for p in alphas}
        assert {id(p) for p in groups["diff"]["params"]} == {id(p) for p in others}
        assert groups["alpha"]["lr"] == 0.1 and groups["diff"]["lr"] == 1e-2
        assert groups["alpha"]["weight_decay"] == 0.0
        # torch's fused AdamW steps them (`torch.optim.AdamW(param_groups(...))` is fused on CPU)
        assert groups["alpha"]["fused"] is True and groups["diff"]["fused"] is True

    def test_optimizer_step_changes_only_diffs_gates_and_head(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        batch = MODEL_CASES[model_name].batch()
        model.train()
        optimizer = torch.optim.AdamW(param_groups(model, lr=1e-2, alpha_lr=0.1))
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        frozen_before = base_state(model)

        seeded_loss(model, batch).backward()
        optimizer.step()

        assert_same_tensors(base_state(model), frozen_before)
        trainable = {**adapter_params(model), **head_params(model)}
        for name, param in model.named_parameters():
            if name not in trainable:
                assert param.grad is None and torch.equal(param, before[name]), name
                continue
            has_grad = param.grad is not None and bool(param.grad.any())
            assert has_grad == (not torch.equal(param, before[name])), name
        alphas = {n: p for n, p in trainable.items() if n.endswith("_alpha")}
        diffs = {n: p for n, p in trainable.items() if n.endswith("_diff")}
        # the L0 penalty reaches every gate logit; the task loss reaches (almost) every diff
        assert all(not torch.equal(p, before[n]) for n, p in alphas.items())
        assert sum(not torch.equal(p, before[n]) for n, p in diffs.items()) >= 0.75 * len(diffs)
        assert all(not torch.equal(p, before[n]) for n, p in head_params(model).items())

    def test_l0_term_in_training_loss(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs, l0_lambda=L0_LAMBDA)
        batch = MODEL_CASES[model_name].batch()
        config = model.peft_config["default"]
        model.train()
        alphas = {n: p for n, p in adapter_params(model).items() if n.endswith("_alpha")}

        def loss_and_alpha_grads(l0_lambda: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            config.l0_lambda = l0_lambda
            model.zero_grad()
            loss = seeded_loss(model, batch)
            loss.backward()
            return loss.detach(), {
                n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in alphas.items()
            }

        task_loss, task_grads = loss_and_alpha_grads(0.0)
        total_loss, total_grads = loss_and_alpha_grads(L0_LAMBDA)

        penalty = L0_LAMBDA * expected_l0(model).item()
        assert (total_loss - task_loss).item() == pytest.approx(penalty, rel=1e-4)
        for name, alpha in alphas.items():
            penalty_grad = L0_LAMBDA * analytic_penalty_grad(model, name, alpha, config)
            torch.testing.assert_close(total_grads[name] - task_grads[name], penalty_grad, rtol=1e-3, atol=1e-8)
            assert total_grads[name].ne(0).all(), name

    def test_no_l0_term_in_eval(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs, l0_lambda=L0_LAMBDA)
        batch = MODEL_CASES[model_name].batch()
        with torch.no_grad():
            loss = model(**batch).loss
            model.peft_config["default"].l0_lambda = 0.0
            assert torch.equal(model(**batch).loss, loss)
            if adapter_kwargs.get("init_weights", True):
                assert torch.equal(reference(**batch).loss, loss)

    def test_expected_l0_at_init(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        diffs = [p for n, p in adapter_params(model).items() if n.endswith("_diff")]
        num_entries = sum(p.numel() for p in diffs)

        value = expected_l0(model)

        assert value.dtype == torch.float32 and value.dim() == 0
        config = model.peft_config["default"]
        p_open = open_probability(torch.tensor(config.alpha_init, dtype=torch.float64), config).item()
        if not config.structured:
            expected = num_entries * p_open
        elif config.group_penalty == "sum":
            expected = (num_entries + len(diffs)) * p_open
        else:
            expected = num_entries * p_open**2
        assert value.item() == pytest.approx(expected, rel=1e-5)
        value.backward()
        for name, param in adapter_params(model).items():
            if name.endswith("_alpha") and not name.endswith("group_alpha"):
                assert param.grad is not None and (param.grad > 0).all(), name

    def test_merge_unmerge(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        randomize_adapter(model)
        batch = MODEL_CASES[model_name].batch()
        adapted = logits(model, batch)
        original = base_state(model)

        model.merge_adapter()
        merged_state = base_state(model)
        merged = logits(model, batch)
        model.unmerge_adapter()

        # the merged weights are the adapted weights, bit for bit
        assert torch.equal(merged, adapted)
        for name, delta in deterministic_deltas(model).items():
            torch.testing.assert_close(merged_state[name] - original[name], delta, rtol=0, atol=1e-6)
        assert any(not torch.equal(merged_state[n], original[n]) for n in original)
        assert_same_tensors(base_state(model), original)
        assert torch.equal(logits(model, batch), adapted)

    def test_merge_and_unload(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs, l0_lambda=L0_LAMBDA)
        randomize_adapter(model)
        batch = MODEL_CASES[model_name].batch()
        adapted = logits(model, batch)

        merged = model.merge_and_unload()

        assert not any(isinstance(m, (BaseTunerLayer, DiffPruningLayer)) for m in merged.modules())
        assert merged.state_dict().keys() == reference.state_dict().keys()
        assert torch.equal(logits(merged, batch), adapted)
        assert_plain_training_loss(merged, batch)

    def test_unload(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs, l0_lambda=L0_LAMBDA)
        randomize_adapter(model)
        trained_head = {
            name.split(HEAD_MARK)[0].removeprefix("base_model.model.")
            + name.split(HEAD_MARK)[1].removeprefix("default"): param.detach().clone()
            for name, param in head_params(model).items()
        }
        batch = MODEL_CASES[model_name].batch()

        unloaded = model.unload()

        assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
        # PEFT keeps the trained copy of the task head; everything else is the base model again
        expected = {**reference.state_dict(), **trained_head}
        assert_same_tensors(dict(unloaded.state_dict()), expected)
        if not trained_head:
            assert torch.equal(logits(unloaded, batch), logits(reference, batch))
        assert_plain_training_loss(unloaded, batch)

    def test_disable_adapter(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs, l0_lambda=L0_LAMBDA)
        randomize_adapter(model)
        batch = MODEL_CASES[model_name].batch()
        adapted = logits(model, batch)

        with model.disable_adapter():
            disabled = logits(model, batch)
            model.train()
            disabled_loss = seeded_loss(model, batch)

        assert torch.equal(disabled, logits(reference, batch))
        # exactly the base model's training loss: no L0 term
        assert torch.equal(disabled_loss, seeded_loss(reference.train(), batch))
        model.eval()
        assert torch.equal(logits(model, batch), adapted)

    def test_multiple_adapters(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs)
        randomize_adapter(model)
        batch = MODEL_CASES[model_name].batch()
        default_out = logits(model, batch)
        default_names = set(adapter_params(model))

        torch.manual_seed(5)
        model.add_adapter("other", make_config(model_name, adapter_kwargs, init_weights=False))

        other_names = set(adapter_params(model, "other"))
        assert other_names == expected_adapter_names(reference, model_name, adapter_kwargs, "other")
        assert {n.replace(".other.", ".default.") for n in other_names} == default_names
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        assert trainable == default_names | set(head_params(model))
        assert torch.equal(logits(model, batch), default_out)

        model.set_adapter("other")
        other_out = logits(model, batch)
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        assert trainable == other_names | set(head_params(model, "other"))
        assert not torch.allclose(other_out, default_out)
        assert not torch.allclose(other_out, logits(reference, batch))

        model.base_model.set_adapter("default", inference_mode=True)
        assert not any(param.requires_grad for name, param in model.named_parameters() if "diff_pruning" in name)
        model.set_adapter("default")
        assert {n for n, p in model.named_parameters() if p.requires_grad} == default_names | set(head_params(model))
        assert torch.equal(logits(model, batch), default_out)
        model.delete_adapter("other")
        assert not any(".other" in name for name in model.state_dict())
        assert "other" not in model.peft_config
        assert torch.equal(logits(model, batch), default_out)

    def test_save_and_load(self, model_name, adapter_kwargs, tmp_path):
        _, model = make_models(model_name, adapter_kwargs)
        randomize_adapter(model)
        batch = MODEL_CASES[model_name].batch()
        adapted = logits(model, batch)
        model.save_pretrained(tmp_path)

        loaded = PeftModel.from_pretrained(MODEL_CASES[model_name].model(), tmp_path).eval()

        ignored = ("inference_mode", "modules_to_save")  # PEFT sets the first and appends the task head again
        saved_config, loaded_config = (
            {k: v for k, v in m.peft_config["default"].to_dict().items() if k not in ignored} for m in (model, loaded)
        )
        assert loaded_config == saved_config
        assert_same_tensors(
            {n: p.detach() for n, p in adapter_params(loaded).items()},
            {n: p.detach() for n, p in adapter_params(model).items()},
        )
        assert torch.equal(logits(loaded, batch), adapted)
        assert not any(p.requires_grad for p in loaded.parameters())
        # loaded for further training, the same parameters are trainable as before saving
        trainable = PeftModel.from_pretrained(MODEL_CASES[model_name].model(), tmp_path, is_trainable=True)
        assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
            n for n, p in model.named_parameters() if p.requires_grad
        }


def open_probability(alpha: torch.Tensor, config: DiffPruningConfig) -> torch.Tensor:
    """P(z != 0) = sigmoid(alpha - log(-l / r))."""
    left, right = config.stretch
    return torch.sigmoid(alpha - math.log(-left / right))


def analytic_penalty_grad(model: PeftModel, name: str, alpha: torch.Tensor, config: DiffPruningConfig) -> torch.Tensor:
    """d E[L0] / d alpha written out: the derivative of the open probability, weighted by the group's open
    probability (gate logits) or by the group's expected count (group logits) in the structured product form."""
    p = open_probability(alpha.detach(), config)
    derivative = p * (1 - p)
    if not config.structured or config.group_penalty == "sum":
        return derivative
    params = dict(model.named_parameters())
    if name.endswith("group_alpha"):
        return open_probability(params[name.removesuffix("group_alpha") + "alpha"].detach(), config).sum() * derivative
    return open_probability(params[name.removesuffix("alpha") + "group_alpha"].detach(), config) * derivative


def cast_batch(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def test_trainable_parameters_printed_in_each_stage(capsys, tmp_path):
    """The tiny BERT (6,896 parameters outside its 51-parameter head) at 1%: gated, projected, loaded for inference."""
    model = get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(task_type="SEQ_CLS", target_sparsity=0.01))
    model.print_trainable_parameters()
    project_to_sparsity(model)
    model.print_trainable_parameters()
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(MODEL_CASES["bert"].model(), tmp_path).print_trainable_parameters()
    # gated: 2 x 6,896 + 51 of 6,896 + 51 (the original head) + 51 + 13,792; projected: 69 + 51 of 6,896 + 102 + 69
    assert capsys.readouterr().out.splitlines() == [
        "trainable params: 13,843 || all params: 20,790 || trainable%: 66.5849 (dense diffs w (6,896) and gate logits "
        "alpha (6,896) of the gated stage, plus 51 in the task head (modules_to_save); projection will keep 69 "
        "entries = 1% of the base model's 6,896 parameters)",
        "trainable params: 120 || all params: 7,067 || trainable%: 1.6980 (kept entries of the sparse diff: 69 "
        "values at fixed positions = 1% of the base model's 6,896 parameters, plus 51 in the task head "
        "(modules_to_save))",
        "trainable params: 0 || all params: 7,067 || trainable%: 0.0000 (frozen, loaded for inference: kept entries "
        "of the sparse diff: 69 values at fixed positions = 1% of the base model's 6,896 parameters, plus 51 in the "
        "task head (modules_to_save))",
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_low_precision_base_model(model_name, dtype):
    case = MODEL_CASES[model_name]
    model = get_peft_model(
        case.model(dtype=dtype), make_config(model_name, {"structured": True, "init_weights": False})
    )
    batch = cast_batch(case.batch(), dtype)

    assert {p.dtype for p in adapter_params(model).values()} == {torch.float32}
    model.train()
    loss = seeded_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    diffs = [p for n, p in adapter_params(model).items() if n.endswith("_diff")]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in diffs)
    assert sum(bool(p.grad.any()) for p in diffs) >= 0.9 * len(diffs)

    model.eval()
    adapted = logits(model, batch)
    assert adapted.dtype == dtype and adapted.isfinite().all()
    original = base_state(model)
    model.merge_adapter()
    # merging adds the same rounded diff at the same positions, so the merged model computes the same thing
    assert torch.equal(logits(model, batch), adapted)
    model.unmerge_adapter()
    assert_same_tensors(base_state(model), original)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_autocast_on_fp32_model(model_name):
    case = MODEL_CASES[model_name]
    _, model = make_models(model_name, {"structured": True, "init_weights": False})
    batch = case.batch()
    reference_logits = logits(model, batch)

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = seeded_loss(model, batch)
    loss.backward()

    assert torch.isfinite(loss)
    diffs = [p for n, p in adapter_params(model).items() if n.endswith("_diff")]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in diffs)
    assert sum(bool(p.grad.any()) for p in diffs) >= 0.9 * len(diffs)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = logits(model, batch)
    torch.testing.assert_close(autocast_logits.float(), reference_logits, rtol=0, atol=0.1)


# PEFT's ModulesToSaveWrapper allows one active adapter only, so models without a task head
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_two_active_adapters(model_name):
    _, model = make_models(model_name, {}, l0_lambda=L0_LAMBDA)
    randomize_adapter(model)
    model.add_adapter("other", make_config(model_name, {}, l0_lambda=L0_LAMBDA))
    randomize_adapter(model, "other", seed=2)
    batch = MODEL_CASES[model_name].batch()
    one = logits(model, batch)

    model.base_model.set_adapter(["default", "other"])
    both = logits(model, batch)
    model.base_model.merge_adapter(["default", "other"])
    merged = logits(model, batch)
    model.unmerge_adapter()

    assert not torch.allclose(both, one)
    torch.testing.assert_close(both, merged, rtol=0, atol=1e-5)
    model.train()
    with_penalty = seeded_loss(model, batch)
    for config in model.peft_config.values():
        config.l0_lambda = 0.0
    penalty = L0_LAMBDA * (expected_l0(model, "default") + expected_l0(model, "other")).item()
    assert (with_penalty - seeded_loss(model, batch)).item() == pytest.approx(penalty, rel=1e-4)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_base_parameter_has_a_diff(model_name):
    """The paper (and the config docstring) put a diff on every parameter outside the task head, except parameters
    registered directly on a module diff pruning cannot wrap, which the docstring names."""
    reference, model = make_models(model_name, {})
    owners: dict[int, list[str]] = {}
    for name, param in reference.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    head = MODEL_CASES[model_name].head
    untied = [names[0] for names in owners.values() if len(names) == 1]
    expected = {name for name in untied if not any(name.startswith(f"{h}.") for h in head)}

    module_name = {n: n.rpartition(".")[0] for n in expected}
    diffed = {
        n
        for n in expected
        if f"base_model.model.{module_name[n]}{ADAPTER_MARK}default.{n.rpartition('.')[2]}_diff"
        in adapter_params(model)
    }
    assert expected - diffed == RAW_PARAMETERS.get(model_name, set())


def test_custom_model_without_task_type_adds_l0_term():
    """Without a task type PEFT returns a plain PeftModel, whose forward calls the base model directly (this once
    bypassed the tuner's forward, and with it the L0 term)."""
    case = MODEL_CASES["vit"]
    model = get_peft_model(case.model(), DiffPruningConfig(modules_to_save=["classifier"], l0_lambda=L0_LAMBDA))
    batch = case.batch()
    model.train()

    with_penalty = seeded_loss(model, batch)
    model.peft_config["default"].l0_lambda = 0.0
    without_penalty = seeded_loss(model, batch)

    penalty = L0_LAMBDA * expected_l0(model).item()
    assert penalty > 1
    assert (with_penalty - without_penalty).item() == pytest.approx(penalty, rel=1e-4)


def test_l0_term_with_tuple_outputs():
    """With return_dict=False the loss is the first element of the tuple; it must carry the L0 term too."""
    _, model = make_models("bert", {}, l0_lambda=L0_LAMBDA)
    batch = MODEL_CASES["bert"].batch()
    model.train()

    loss = seeded_loss(model, batch)
    torch.manual_seed(0)
    tuple_loss = model(**batch, return_dict=False)[0]

    assert loss.item() > L0_LAMBDA * expected_l0(model).item()  # the dict output has the L0 term
    assert torch.equal(tuple_loss, loss)


def test_fp16_l0_term_with_many_gates():
    """E[L0] counts every open gate, beyond fp16's maximum of 65504 on any real model: the L0 term must be formed in
    fp32 (a vocabulary of 5000 gives 80k gated embedding entries on a model that is still tiny)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    base = BertForSequenceClassification(config).to(torch.float16)
    model = get_peft_model(base, DiffPruningConfig(task_type="SEQ_CLS")).train()
    batch = {"input_ids": torch.randint(0, 5000, (2, 8)), "labels": torch.tensor([0, 1])}

    outputs = model(**batch)
    outputs.loss.backward()

    num_open = expected_l0(model).item()
    assert num_open > torch.finfo(torch.float16).max
    assert outputs.loss.dtype == torch.float16
    task_loss = F.cross_entropy(outputs.logits.float(), batch["labels"]).item()
    assert outputs.loss.item() == pytest.approx(
        task_loss + model.peft_config["default"].l0_lambda * num_open, abs=2e-3
    )
    alphas = [p for n, p in adapter_params(model).items() if n.endswith("_alpha")]
    assert all(p.grad is not None and p.grad.isfinite().all() and p.grad.any() for p in alphas)


def test_cast_after_eval_forward():
    """The eval cache of adapted weights must notice `Module.to(dtype)`, which swaps `.data` in place."""
    case = MODEL_CASES["bert"]
    _, model = make_models("bert", {}, init_weights=False)
    batch = case.batch()
    logits(model, batch)  # fills the eval cache

    model.to(torch.bfloat16)

    _, fresh = make_models("bert", {}, init_weights=False)
    assert torch.equal(logits(model, batch), logits(fresh.to(torch.bfloat16), batch))


def test_padding_row_gets_no_gradient_in_training():
    """As in full fine-tuning (and in the eval path), the diff of an embedding's padding row is never trained."""
    _, model = make_models("bert", {}, init_weights=False)
    embedding = model.base_model.model.bert.embeddings.word_embeddings
    padding_idx = embedding.get_base_layer().padding_idx
    state = embedding.diff_pruning_state["default"]
    input_ids = torch.tensor([[padding_idx, 5, 6, padding_idx]])
    model.train()

    torch.manual_seed(0)
    embedding(input_ids).sum().backward()

    assert state.weight_diff.grad[5].any()
    assert not state.weight_diff.grad[padding_idx].any()
