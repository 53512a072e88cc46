"""Tests for sparse adapters in memory: projection to an exact sparsity, the fixed-mask state, sparsity reports,
non-adaptive diff pruning (`from_finetuned`) and merging in the sparse state.

References are computed here from the definitions (see `_sparse_helpers`): the dense diffs `z * w` are read from the
gated state before projection, ranked by brute force, and applied by hand to a plain copy of the base model.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _sparse_helpers import (
    HEAD,
    apply_sparse_diff,
    base_parameter_count,
    dense_gated_diffs,
    diff_layers,
    logits,
    make_batch,
    manual_gate,
    reference_top_k,
    sparse_entries,
    tiny_bert,
)
from peft import PeftModel, get_peft_model
from torch import nn

from peft_diffprune import (
    DiffPruningConfig,
    expected_l0,
    from_finetuned,
    project_to_sparsity,
    sparsity_report,
)
from peft_diffprune.diff_pruning import functional


HEAD_PARAMETERS = 8 * 2 + 2  # the tiny classifier: Linear(8, 2)


def gated_model(seed: int = 0, base_seed: int = 0, dtype=None, random_alpha: bool = False, **config_kwargs):
    """A gated adapter with random diffs (`init_weights=False`); with `random_alpha` the gates are spread over
    closed, fractional and open, so `|z * w|` and `|w|` rank differently."""
    base = tiny_bert(base_seed, dtype=dtype)
    torch.manual_seed(seed)
    config = DiffPruningConfig(task_type="SEQ_CLS", init_weights=False, **config_kwargs)
    model = get_peft_model(base, config)
    if random_alpha:
        generator = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_alpha"):
                    param.copy_(torch.rand(param.shape, generator=generator) * 5 - 2)
    return model


def set_diffs(model: PeftModel, make) -> None:
    """Overwrite every dense diff `w` with `make(shape)` and open every gate fully (z = 1 exactly)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_diff"):
                param.copy_(make(param.shape))
            elif name.endswith("_alpha"):
                param.fill_(10.0)


@torch.no_grad()
def closed_gate_signals(model: PeftModel) -> dict[str, torch.Tensor]:
    """`sigmoid(alpha) * |w|` of every gated tensor, keyed like `dense_gated_diffs`: what fill="gate" ranks by."""
    return {
        f"{module}.{name}": torch.sigmoid(getattr(state, f"{name}_alpha")) * getattr(state, f"{name}_diff").abs()
        for module, layer in diff_layers(model).items()
        for state in [layer.diff_pruning_state["default"]]
        for name in state.tensor_names
    }


def kept_positions(model: PeftModel) -> dict[str, list[int]]:
    return {key: positions for key, (positions, _) in sparse_entries(model).items()}


def head_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return model.base_model.model.classifier.modules_to_save["default"].state_dict()


def normalized_base_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's own weights (adapter state and the trained head copy excluded), keyed like a plain model."""
    return {
        key.replace(".base_layer", "").replace(".original_module", ""): value.clone()
        for key, value in model.base_model.model.state_dict().items()
        if ".diff_pruning_state." not in key and ".modules_to_save." not in key
    }


# ----------------------------------------------------------------------------------------------------------------
# projection


class TestProjection:
    @pytest.mark.parametrize("target_sparsity", [0.004, 0.01, 0.05, 0.3, 1.0])
    def test_global_keeps_exactly_the_top_entries(self, target_sparsity):
        model = gated_model(random_alpha=True)
        diffs = dense_gated_diffs(model)
        total = base_parameter_count(tiny_bert(0))
        budget = round(target_sparsity * total)
        assert sum(d.numel() for d in diffs.values()) == total  # default targets: every parameter outside the head
        assert sum(int((d == 0).sum()) for d in diffs.values()) > 0  # some gates are closed

        report = project_to_sparsity(model, target_sparsity)

        config = model.peft_config["default"]
        assert report.total_parameters == total
        assert report.kept == budget == sum(config.kept_pattern.values())
        entries = sparse_entries(model)
        assert kept_positions(model) == reference_top_k(diffs, budget)
        for key, (positions, values) in entries.items():
            assert torch.equal(values, diffs[key].reshape(-1)[positions]), key
        assert config.kept_pattern == {key: len(positions) for key, (positions, _) in entries.items()}
        assert config.target_sparsity == target_sparsity

    def test_default_target_sparsity_comes_from_the_config(self):
        model = gated_model(target_sparsity=0.02)
        report = project_to_sparsity(model)
        assert report.kept == round(0.02 * base_parameter_count(tiny_bert(0)))

    def test_ties_go_to_the_lowest_position_in_module_order(self):
        # every entry has the same magnitude: the budget is filled from the first tensor on, in flat order
        model = gated_model()
        generator = torch.Generator().manual_seed(0)
        set_diffs(model, lambda shape: torch.where(torch.rand(shape, generator=generator) < 0.5, -0.25, 0.25))
        diffs = dense_gated_diffs(model)
        budget = round(0.3 * base_parameter_count(tiny_bert(0)))

        project_to_sparsity(model, 0.3)

        expected, remaining = {}, budget
        for key, diff in diffs.items():
            take = min(remaining, diff.numel())
            if take:
                expected[key] = list(range(take))
            remaining -= take
        assert kept_positions(model) == expected
        assert kept_positions(model) == reference_top_k(diffs, budget)

    def test_planted_ties_at_the_threshold(self):
        # few distinct magnitudes, so the threshold cuts through a large tie group spread over many tensors
        model = gated_model()
        generator = torch.Generator().manual_seed(1)
        levels = torch.tensor([0.0, 0.1, -0.1, 0.2, -0.2, 0.3])
        set_diffs(model, lambda shape: levels[torch.randint(0, len(levels), shape, generator=generator)])
        diffs = dense_gated_diffs(model)
        budget = round(0.4 * base_parameter_count(tiny_bert(0)))
        magnitudes = torch.cat([d.reshape(-1).abs() for d in diffs.values()])
        threshold = magnitudes.sort(descending=True).values[budget - 1]
        assert (magnitudes > threshold).sum() < budget < (magnitudes >= threshold).sum()  # the cut is inside a tie

        twin = copy.deepcopy(model)
        project_to_sparsity(model, 0.4)
        project_to_sparsity(twin, 0.4)

        assert kept_positions(model) == reference_top_k(diffs, budget)
        for (key, (positions, values)), (_, (twin_positions, twin_values)) in zip(
            sparse_entries(model).items(), sparse_entries(twin).items(), strict=True
        ):
            assert positions == twin_positions and torch.equal(values, twin_values), key

    @pytest.mark.parametrize("target_sparsity", [0.05, 1.0])
    def test_eval_output_equals_base_plus_kept_entries(self, target_sparsity):
        model = gated_model(random_alpha=True)
        gated_output = logits(model)
        project_to_sparsity(model, target_sparsity)

        reference = apply_sparse_diff(tiny_bert(0), sparse_entries(model))
        reference.classifier.load_state_dict(head_state(model))
        torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-6)
        assert not torch.allclose(logits(model), logits(tiny_bert(0)), atol=1e-4)
        if target_sparsity == 1.0:
            # nothing dropped: the projected adapter is the gated one under the deterministic gate
            torch.testing.assert_close(logits(model), gated_output, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("target_sparsity", [0.05, 0.25])
    def test_per_module_keeps_a_share_of_every_tensor(self, target_sparsity):
        model = gated_model(random_alpha=True)
        diffs = dense_gated_diffs(model)

        report = project_to_sparsity(model, target_sparsity, scope="per_module")

        expected_counts = {key: round(target_sparsity * d.numel()) for key, d in diffs.items()}
        expected_counts = {key: count for key, count in expected_counts.items() if count}
        assert model.peft_config["default"].kept_pattern == expected_counts
        assert report.kept == sum(expected_counts.values())
        kept = kept_positions(model)
        assert set(kept) == set(expected_counts)
        for key, count in expected_counts.items():
            assert kept[key] == reference_top_k({key: diffs[key]}, count)[key], key

    def test_structured_group_gate_multiplies_the_diff(self):
        model = gated_model(random_alpha=True, structured=True)
        layers = diff_layers(model)
        with torch.no_grad():
            query = layers["bert.encoder.layer.0.attention.self.query"].diff_pruning_state["default"]
            query.weight_group_alpha.fill_(-10.0)  # group gate exactly 0: the whole tensor is pruned
            value = layers["bert.encoder.layer.0.attention.self.value"].diff_pruning_state["default"]
            value.weight_group_alpha.fill_(math.log(2.0))  # group gate sigmoid(log 2) * 3 - 1.5 = 0.5
        stretch = model.peft_config["default"].stretch
        assert manual_gate(torch.tensor(math.log(2.0)), stretch).item() == pytest.approx(0.5, abs=1e-6)
        diffs = dense_gated_diffs(model)
        assert not diffs["bert.encoder.layer.0.attention.self.query.weight"].any()
        budget = round(0.1 * base_parameter_count(tiny_bert(0)))

        report = project_to_sparsity(model, 0.1)

        assert report.kept == budget
        assert kept_positions(model) == reference_top_k(diffs, budget)
        entries = sparse_entries(model)
        assert "bert.encoder.layer.0.attention.self.query.weight" not in entries
        positions, values = entries["bert.encoder.layer.0.attention.self.value.weight"]
        ungrouped = manual_gate(value.weight_alpha, stretch) * value.weight_diff
        torch.testing.assert_close(values, 0.5 * ungrouped.detach().reshape(-1)[positions], rtol=1e-6, atol=0)
        # no group gate survives projection
        assert not [name for name, _ in model.named_parameters() if "group_alpha" in name]

    @pytest.mark.parametrize("target_sparsity", [0, -0.1, 1.5, math.nan])
    def test_target_sparsity_outside_unit_interval_raises(self, target_sparsity):
        model = gated_model()
        with pytest.raises(ValueError, match="target_sparsity must be in"):
            project_to_sparsity(model, target_sparsity)
        assert model.peft_config["default"].kept_pattern == {}  # nothing changed

    @pytest.mark.parametrize("scope", ["global", "per_module"])
    def test_fill_gate_keeps_the_closed_entries_nearest_to_opening(self, scope):
        # 40% of the gates are closed and the budget is 80% of the model: fill="gate" keeps every open entry, then the
        # closed ones of largest sigmoid(alpha) * |w|, at value 0 (the function does not change)
        model = gated_model(random_alpha=True)
        diffs = dense_gated_diffs(model)
        signals = closed_gate_signals(model)
        target = 0.8
        open_entries = sum(int((d != 0).sum()) for d in diffs.values())
        assert open_entries < round(target * base_parameter_count(tiny_bert(0)))
        gated_output = logits(model)

        project_to_sparsity(model, target, scope=scope, fill="gate")

        # the brute-force ranking by (open first by |z * w|, then the closed by their gate signal, then position)
        top = max(float(signal.max()) for signal in signals.values()) + 1
        keys = {key: torch.where(d != 0, d.double().abs() + top, signals[key].double()) for key, d in diffs.items()}
        budget = round(target * base_parameter_count(tiny_bert(0)))
        expected = (
            reference_top_k(keys, budget)
            if scope == "global"
            else {key: reference_top_k({key: k}, round(target * k.numel()))[key] for key, k in keys.items()}
        )
        assert kept_positions(model) == expected
        for key, (positions, values) in sparse_entries(model).items():
            assert torch.equal(values, diffs[key].reshape(-1)[positions]), key
        torch.testing.assert_close(logits(model), gated_output, rtol=1e-5, atol=1e-6)

    def test_fill_position_keeps_the_lowest_closed_positions(self):
        # the old rule: the closed entries that make up the budget are the first ones in flat order, whatever their
        # gates and diffs learned
        model = gated_model(random_alpha=True)
        diffs = dense_gated_diffs(model)
        budget = round(0.8 * base_parameter_count(tiny_bert(0)))

        project_to_sparsity(model, 0.8, fill="position")

        assert kept_positions(model) == reference_top_k(diffs, budget)
        closed = [(key, p) for key, d in diffs.items() for p in (d.reshape(-1) == 0).nonzero().squeeze(1).tolist()]
        filled = [
            (key, p) for key, positions in kept_positions(model).items() for p in positions if (key, p) in closed
        ]
        assert filled == closed[: len(filled)]

    def test_fills_agree_when_the_open_gates_cover_the_budget(self):
        model = gated_model(random_alpha=True)
        twin = copy.deepcopy(model)
        project_to_sparsity(model, 0.2, fill="gate")
        project_to_sparsity(twin, 0.2, fill="position")
        assert kept_positions(model) == kept_positions(twin)

    def test_unknown_fill_raises(self):
        with pytest.raises(ValueError, match="fill must be 'gate' or 'position'"):
            project_to_sparsity(gated_model(), 0.1, fill="magnitude")

    def test_unknown_scope_raises(self):
        with pytest.raises(ValueError, match="scope"):
            project_to_sparsity(gated_model(), 0.1, scope="per_layer")

    def test_projecting_a_merged_model_raises(self):
        model = gated_model()
        model.merge_adapter()
        with pytest.raises(ValueError, match="[Uu]nmerge"):
            project_to_sparsity(model, 0.1)


# ----------------------------------------------------------------------------------------------------------------
# the fixed-mask state


@pytest.fixture
def sparse_model():
    model = gated_model(random_alpha=True)
    report = project_to_sparsity(model, 0.05)
    return model, report


class TestFixedMaskState:
    def test_layers_hold_only_positions_and_values(self, sparse_model):
        model, report = sparse_model
        kept_pattern = model.peft_config["default"].kept_pattern
        assert not [n for n, _ in model.named_parameters() if n.endswith(("_diff", "_alpha"))]
        for module_name, layer in diff_layers(model).items():
            tensors = [key.rsplit(".", 1)[1] for key in kept_pattern if key.rsplit(".", 1)[0] == module_name]
            if not tensors:
                # modules with no kept entry carry no state for the adapter
                assert "default" not in layer.diff_pruning_state, module_name
                continue
            state = layer.diff_pruning_state["default"]
            assert {n for n, _ in state.named_parameters()} == {f"{t}_values" for t in tensors}
            assert {n for n, _ in state.named_buffers()} == {f"{t}_positions" for t in tensors}
            for tensor in tensors:
                positions, values = getattr(state, f"{tensor}_positions"), getattr(state, f"{tensor}_values")
                assert positions.dtype == torch.uint8 and positions.dim() == 1
                assert isinstance(values, torch.nn.Parameter)
                assert values.dtype == torch.float32 and values.shape == (kept_pattern[f"{module_name}.{tensor}"],)
        # modules left with no kept entry are unwrapped, as in a model rebuilt from the saved config
        assert set(diff_layers(model)) == {k.rsplit(".", 1)[0] for k in kept_pattern}

    def test_no_l0_term_in_the_loss(self, sparse_model):
        model, _ = sparse_model
        batch = make_batch(with_labels=True)
        model.train()
        outputs = model(**batch)
        assert torch.equal(outputs.loss, F.cross_entropy(outputs.logits, batch["labels"]))
        assert expected_l0(model).item() == 0.0

        # contrast: the gated state does add the penalty
        gated = gated_model(l0_lambda=1.0).train()
        outputs = gated(**batch)
        penalty = outputs.loss - F.cross_entropy(outputs.logits, batch["labels"])
        torch.testing.assert_close(penalty, expected_l0(gated), rtol=1e-5, atol=1e-3)
        assert penalty > 100

    def test_trainable_parameters_are_the_kept_entries_and_the_head(self, sparse_model):
        model, report = sparse_model
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert sum(p.numel() for p in trainable.values()) == report.kept + HEAD_PARAMETERS
        assert model.get_nb_trainable_parameters()[0] == report.kept + HEAD_PARAMETERS
        for name in trainable:
            assert name.endswith("_values") or f"{HEAD}.modules_to_save.default." in name, name

    def test_optimizer_step_changes_only_values_and_head(self, sparse_model):
        model, _ = sparse_model
        batch = make_batch(with_labels=True)
        logits(model)  # fill the eval cache of the effective weights: the step must invalidate it
        before = {key: value.clone() for key, value in model.state_dict().items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        model.eval()

        after = model.state_dict()
        changed = {key for key in before if not torch.equal(before[key], after[key])}
        assert changed, "the step changed nothing"
        assert all(key.endswith("_values") or ".modules_to_save.default." in key for key in changed), changed
        assert any(key.endswith("_values") for key in changed)
        assert any(".modules_to_save.default." in key for key in changed)
        assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("_positions"))

        # the new values are what the model now applies
        reference = apply_sparse_diff(tiny_bert(0), sparse_entries(model))
        reference.classifier.load_state_dict(head_state(model))
        torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-6)


def values_and_reference_grads(model: PeftModel, dtype=None):
    """Gradients of the kept values after one backward pass, and the dense gradients of a plain model holding the
    same diff, gathered at the kept positions."""
    batch = make_batch(with_labels=True)
    model.train()
    model(**batch).loss.backward()
    reference = apply_sparse_diff(tiny_bert(0, dtype=dtype), sparse_entries(model))
    reference.classifier.load_state_dict(head_state(model))
    reference.train()
    reference(**batch).loss.backward()
    reference_params = dict(reference.named_parameters())
    layers = diff_layers(model)
    pairs = {}
    for key, (positions, _) in sparse_entries(model).items():
        module_name, tensor = key.rsplit(".", 1)
        values = getattr(layers[module_name].diff_pruning_state["default"], f"{tensor}_values")
        dense_grad = reference_params[key].grad.reshape(-1)[torch.tensor(positions, dtype=torch.long)]
        pairs[key] = (values.grad, dense_grad)
    return pairs


class TestFixedMaskGradients:
    @pytest.mark.parametrize("density", [0.0, float("inf")], ids=["dense-product", "sampled_addmm"])
    def test_values_get_the_dense_gradient_at_kept_positions(self, sparse_model, density, monkeypatch):
        # both kernels of the sampled weight gradient: the dense product and a gather, and sampled_addmm
        monkeypatch.setattr(functional, "DENSE_PRODUCT_DENSITY", density)
        model, _ = sparse_model
        pairs = values_and_reference_grads(model)
        assert any(key.endswith("dense.weight") for key in pairs)  # the sampled (SDDMM) path of nn.Linear is used
        for key, (grad, dense_grad) in pairs.items():
            assert grad is not None and grad.dtype == torch.float32, key
            scale = dense_grad.abs().max().item() or 1.0
            torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-5 * scale, msg=key)

    def test_sampled_addmm_gets_operands_it_need_not_copy(self, sparse_model, monkeypatch):
        """On CPU `sampled_addmm` wants `grad_out^T` row-major and `x` column-major; given views it transposes both
        on one thread (72 copies, 450 ms of a MiniLM 32 x 128 step). They are made beforehand, by blocks of rows on
        every thread (`functional._transposed`), and the values are the same bit for bit."""
        model, _ = sparse_model
        seen = []
        original = torch.sparse.sampled_addmm

        def checked(pattern, mat1, mat2, **kwargs):
            seen.append(mat1.is_contiguous() and mat2.t().is_contiguous())
            return original(pattern, mat1, mat2, **kwargs)

        monkeypatch.setattr(torch.sparse, "sampled_addmm", checked)
        monkeypatch.setattr(functional, "DENSE_PRODUCT_DENSITY", float("inf"))  # sampled_addmm at any density
        values_and_reference_grads(model)
        assert seen and all(seen)
        generator = torch.Generator().manual_seed(0)
        for rows, cols in ((3 * functional.TRANSPOSE_BLOCK + 7, 5), (2, 300)):
            matrix = torch.randn(rows, cols, generator=generator)
            assert (
                torch.equal(functional._transposed(matrix), matrix.t())
                and functional._transposed(matrix).is_contiguous()
            )

    def test_the_kernel_follows_the_density(self, sparse_model, monkeypatch):
        """A weight keeping at least `DENSE_PRODUCT_DENSITY` of its entries gets the dense product and a gather (at
        high density it is faster than sampled_addmm, which runs on one thread); a sparser one gets sampled_addmm."""
        model, _ = sparse_model
        sampled_shapes = []
        original = torch.sparse.sampled_addmm

        def counted(pattern, mat1, mat2, **kwargs):
            sampled_shapes.append((pattern.shape, pattern.values().numel()))
            return original(pattern, mat1, mat2, **kwargs)

        monkeypatch.setattr(torch.sparse, "sampled_addmm", counted)
        densities = []
        for layer in diff_layers(model).values():
            state = layer.diff_pruning_state["default"]
            if isinstance(layer.get_base_layer(), torch.nn.Linear) and "weight" in state.tensor_names:
                densities.append(state.weight_values.numel() / layer.get_base_layer().weight.numel())
        threshold = sorted(densities)[len(densities) // 2]
        monkeypatch.setattr(functional, "DENSE_PRODUCT_DENSITY", threshold)
        values_and_reference_grads(model)
        below = sum(d < threshold for d in densities)
        assert 0 < below < len(densities)
        assert len(sampled_shapes) == below
        assert all(count < threshold * shape[0] * shape[1] for shape, count in sampled_shapes)
        # a weight above DENSE_PRODUCT_MAX_ENTRIES gets sampled_addmm at any density: no weight-sized product
        sampled_shapes.clear()
        monkeypatch.setattr(functional, "DENSE_PRODUCT_MAX_ENTRIES", 0)
        values_and_reference_grads(model)
        assert len(sampled_shapes) == len(densities)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def test_half_precision_base(self, dtype):
        model = gated_model(dtype=dtype)
        project_to_sparsity(model, 0.05)
        for key, (grad, dense_grad) in values_and_reference_grads(model, dtype=dtype).items():
            assert grad is not None and torch.isfinite(grad).all(), key
            torch.testing.assert_close(grad, dense_grad.float(), rtol=5e-2, atol=1e-2 * dense_grad.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# sparsity reports


class TestSparsityReport:
    def test_gated_identity_adapter(self):
        model = get_peft_model(tiny_bert(0), DiffPruningConfig(task_type="SEQ_CLS"))
        report = sparsity_report(model)
        total = base_parameter_count(tiny_bert(0))
        assert report.total_parameters == total
        assert sum(t.parameters for t in report.tensors) == total
        # alpha_init = 5 opens every gate, but every diff starts at zero
        assert all(t.kept == t.parameters and t.nonzero == 0 for t in report.tensors)
        assert report.kept == total and report.nonzero == 0 and report.density == 0.0

    def test_gated_random_adapter(self):
        model = gated_model()
        report = sparsity_report(model)
        assert all(t.nonzero == t.parameters == t.kept for t in report.tensors)
        assert report.density == 1.0

    def test_gated_counts_open_gates(self):
        model = gated_model(random_alpha=True)
        diffs = dense_gated_diffs(model)
        report = sparsity_report(model)
        stretch = model.peft_config["default"].stretch
        for module_name, layer in diff_layers(model).items():
            state = layer.diff_pruning_state["default"]
            for name in state.tensor_names:
                tensor = report.by_module()[f"{module_name}.{name}"]
                assert tensor.kept == int(manual_gate(getattr(state, f"{name}_alpha"), stretch).count_nonzero())
                assert tensor.nonzero == int(diffs[f"{module_name}.{name}"].count_nonzero())
        assert 0 < report.nonzero < report.total_parameters

    def test_after_projection(self, sparse_model):
        model, projected_report = sparse_model
        report = sparsity_report(model)
        kept_pattern = model.peft_config["default"].kept_pattern
        assert {t.name: t.kept for t in report.tensors} == kept_pattern
        assert {t.name: t.nonzero for t in report.tensors} == kept_pattern  # random values are never exactly 0
        for tensor in report.tensors:
            assert tensor.density == tensor.nonzero / tensor.parameters
        assert report.kept == report.nonzero == sum(kept_pattern.values()) == projected_report.kept
        assert report.total_parameters == base_parameter_count(tiny_bert(0))
        assert report.density == report.nonzero / report.total_parameters

    def test_str_renders_a_table(self, sparse_model):
        model, _ = sparse_model
        report = sparsity_report(model)
        lines = str(report).splitlines()
        assert len(lines) == len(report.tensors) + 2
        assert lines[0].split() == ["tensor", "params", "kept", "nonzero", "density"]
        for line, tensor in zip(lines[1:-1], report.tensors, strict=True):
            assert line.split()[:4] == [
                tensor.name,
                f"{tensor.parameters:,}",
                f"{tensor.kept:,}",
                f"{tensor.nonzero:,}",
            ]
            assert line.endswith(f"{tensor.density:.4%}")
        total = lines[-1].split()
        assert total == [
            "total",
            f"{report.total_parameters:,}",
            f"{report.kept:,}",
            f"{report.nonzero:,}",
            f"{report.density:.4%}",
        ]
        # aligned columns: the density column starts at the same offset on every line
        assert len({line.rstrip().rindex(" ") for line in lines}) == 1


# ----------------------------------------------------------------------------------------------------------------
# non-adaptive diff pruning


def fine_tuned_copy(base: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """A stand-in for full fine-tuning: every weight of a copy, head included, moved by a seeded random step."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return tuned


class TestFromFinetuned:
    def test_adapter_is_base_plus_top_k_of_the_fine_tuning_diff(self):
        base, tuned = tiny_bert(0), fine_tuned_copy(tiny_bert(0))
        tuned_params = dict(tuned.named_parameters())
        diffs = {
            name: (tuned_params[name].detach() - param.detach())
            for name, param in base.named_parameters()
            if not name.startswith(f"{HEAD}.")
        }
        total = base_parameter_count(base)
        budget = round(0.05 * total)

        model = from_finetuned(tiny_bert(0), tuned, 0.05, task_type="SEQ_CLS")

        assert sparsity_report(model).kept == budget
        assert not [n for n, _ in model.named_parameters() if n.endswith(("_diff", "_alpha"))]
        entries = sparse_entries(model)
        assert kept_positions(model) == reference_top_k(diffs, budget)
        for key, (positions, values) in entries.items():
            assert torch.equal(values, diffs[key].reshape(-1)[positions]), key
        for name, value in head_state(model).items():
            assert torch.equal(value, tuned_params[f"{HEAD}.{name}"]), name
        reference = apply_sparse_diff(tiny_bert(0), entries)
        reference.classifier.load_state_dict(tuned.classifier.state_dict())
        torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-6)

    def test_full_density_reproduces_the_fine_tuned_model(self):
        tuned = fine_tuned_copy(tiny_bert(0))
        model = from_finetuned(tiny_bert(0), tuned, 1.0, task_type="SEQ_CLS")
        assert sparsity_report(model).kept == base_parameter_count(tuned)
        torch.testing.assert_close(logits(model), logits(tuned), rtol=0, atol=1e-5)
        assert not torch.allclose(logits(tiny_bert(0)), logits(tuned), atol=1e-3)

    def test_different_hidden_size_raises(self):
        with pytest.raises(ValueError, match="share an architecture"):
            from_finetuned(tiny_bert(0), fine_tuned_copy(tiny_bert(0, hidden_size=12)), 0.05, task_type="SEQ_CLS")

    def test_fine_tuned_model_with_extra_layers_raises(self):
        with pytest.raises(ValueError):
            from_finetuned(tiny_bert(0), fine_tuned_copy(tiny_bert(0, num_layers=2)), 0.05, task_type="SEQ_CLS")

    def test_fine_tuned_model_with_another_head_raises_value_error(self):
        with pytest.raises(ValueError):
            from_finetuned(tiny_bert(0), fine_tuned_copy(tiny_bert(0, num_labels=3)), 0.05, task_type="SEQ_CLS")


# ----------------------------------------------------------------------------------------------------------------
# merge, unmerge, switch


DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def expected_merged_state(model: PeftModel, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base weights with every kept entry replaced by `base + value` rounded once to the base dtype."""
    expected = {key: value.clone() for key, value in before.items()}
    for key, (positions, values) in sparse_entries(model).items():
        flat = expected[key].view(-1)
        index = torch.tensor(positions, dtype=torch.long)
        flat[index] = flat[index] + values.to(flat.dtype)
    return expected


class TestMerge:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_merge_touches_only_kept_entries_and_unmerge_restores_bit_for_bit(self, dtype):
        model = gated_model(dtype=dtype)
        project_to_sparsity(model, 0.05)
        before = normalized_base_state(model)
        unmerged = logits(model)

        model.merge_adapter()
        merged_state = normalized_base_state(model)
        expected = expected_merged_state(model, before)
        assert merged_state.keys() == expected.keys()
        for key in expected:
            assert torch.equal(merged_state[key], expected[key]), key
        merged = logits(model)

        model.unmerge_adapter()
        for key, value in normalized_base_state(model).items():
            assert torch.equal(value, before[key]), key
        # Merging writes exactly the values the unmerged forward computes (base + value.to(dtype), one rounding),
        # so the outputs agree exactly in every dtype: the tolerance for bf16/fp16 is zero, not a bf16 ulp.
        assert torch.equal(merged, unmerged)
        torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)

    @pytest.mark.parametrize("dtype", DTYPES[1:])
    def test_add_then_subtract_would_not_restore_half_precision(self, dtype):
        # contrast for the test above: an unmerge computed as (base + v) - v loses bits in bf16/fp16
        model = gated_model(dtype=dtype)
        project_to_sparsity(model, 0.05)
        base = normalized_base_state(model)
        mismatches = 0
        for key, (positions, values) in sparse_entries(model).items():
            original = base[key].view(-1)[torch.tensor(positions, dtype=torch.long)]
            restored = (original + values.to(dtype)) - values.to(dtype)
            mismatches += int((restored != original).sum())
        assert mismatches > 0

    def test_merge_and_unload(self, sparse_model):
        model, _ = sparse_model
        unmerged = logits(model)
        expected = expected_merged_state(model, normalized_base_state(model))
        plain = model.merge_and_unload()
        state = {k: v for k, v in plain.state_dict().items() if not k.startswith(f"{HEAD}.")}
        for key, value in state.items():
            assert torch.equal(value, expected[key]), key
        torch.testing.assert_close(logits(plain), unmerged, rtol=0, atol=1e-6)

    def test_three_loaded_adapters_switch_merged_and_unmerged(self, tmp_path):
        references = {}
        for seed, name in enumerate("abc", start=1):
            model = gated_model(seed=seed, random_alpha=True)
            project_to_sparsity(model, 0.05)
            references[name] = logits(model)
            model.save_pretrained(tmp_path / name)
        assert not torch.allclose(references["a"], references["b"], atol=1e-4)

        model = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "a", adapter_name="a")
        model.load_adapter(tmp_path / "b", adapter_name="b")
        model.load_adapter(tmp_path / "c", adapter_name="c")
        base_state = normalized_base_state(model)

        for name in "cab":
            model.set_adapter(name)
            torch.testing.assert_close(logits(model), references[name], rtol=0, atol=1e-6)

        for name in "abca":
            model.set_adapter(name)
            model.merge_adapter()
            torch.testing.assert_close(logits(model), references[name], rtol=0, atol=1e-6)
            model.unmerge_adapter()
            for key, value in normalized_base_state(model).items():
                assert torch.equal(value, base_state[key]), (name, key)

        with torch.no_grad(), model.disable_adapter():
            torch.testing.assert_close(logits(model), logits(tiny_bert(0)), rtol=0, atol=1e-6)

    @pytest.mark.parametrize("hooked", [False, True])
    def test_merge_skips_peft_onload_walk_unless_a_module_has_an_accelerate_hook(self, hooked, monkeypatch):
        # the fast path (no onload_layer per wrapped module) must merge exactly as PEFT's path does
        from accelerate.hooks import ModelHook, add_hook_to_module
        from peft.tuners import tuners_utils

        model = gated_model(seed=1)
        project_to_sparsity(model, 0.05)
        reference = copy.deepcopy(model)
        tuners_utils.BaseTuner.merge_adapter(reference.base_model)
        onloaded = []
        real_onload = tuners_utils.onload_layer
        monkeypatch.setattr(tuners_utils, "onload_layer", lambda layer: onloaded.append(layer) or real_onload(layer))
        if hooked:
            add_hook_to_module(model.base_model.model.bert.pooler, ModelHook())
        base_state = normalized_base_state(model)

        model.merge_adapter()

        assert bool(onloaded) == hooked
        for key, value in normalized_base_state(model).items():
            assert torch.equal(value, normalized_base_state(reference)[key]), key
        model.unmerge_adapter()
        for key, value in normalized_base_state(model).items():
            assert torch.equal(value, base_state[key]), key

    def test_loading_onto_a_merged_model_is_refused(self, tmp_path):
        model = gated_model(seed=1)
        project_to_sparsity(model, 0.05)
        model.save_pretrained(tmp_path / "a")
        loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "a", adapter_name="a")
        loaded.merge_adapter()
        # the base weights now hold adapter a: another adapter's positions would be applied to the wrong weights
        with pytest.raises(ValueError, match="fingerprint"):
            loaded.load_adapter(tmp_path / "a", adapter_name="again")


def test_fingerprint_of_a_tensor_beyond_float32_positions(tmp_path):
    """BERT-base's word embedding has more than 2^24 entries, where float32 sample positions overflow the tensor."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(2**24 // 16 + 1, 16), nn.Linear(16, 2))
    model = get_peft_model(base, DiffPruningConfig(target_modules=["0"], init_weights=False))
    project_to_sparsity(model, target_sparsity=1e-4)
    fingerprint = model.peft_config["default"].base_fingerprint
    assert fingerprint.startswith("v1:")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].base_fingerprint == fingerprint
