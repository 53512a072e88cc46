"""Training-loop helpers and the penalty: optimizer parameter groups, penalty weights and their dynamics."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES
from peft import get_peft_model

from peft_diffprune import DiffPruningConfig, expected_l0, param_groups
from peft_diffprune.diff_pruning import functional, gates, layer
from peft_diffprune.diff_pruning.sparse import base_parameter_count


STEPS = 200


def _gated_bert(**config_kwargs) -> torch.nn.Module:
    config = DiffPruningConfig(task_type="SEQ_CLS", **config_kwargs)
    return get_peft_model(MODEL_CASES["bert"].model(), config)


def _train(model: torch.nn.Module, steps: int = STEPS) -> list[float]:
    """The paper's optimizer set-up (AdamW, gate logits at lr 0.1) on one fixed batch; expected density per step."""
    batch = MODEL_CASES["bert"].batch()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, alpha_lr=0.1))
    total = base_parameter_count(model.base_model)  # the denominator of target_sparsity and of the example's logs
    densities = []
    model.train()
    for step in range(steps):
        torch.manual_seed(step)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        densities.append(expected_l0(model).item() / total)
    return densities


class TestParamGroups:
    def test_gate_logits_get_their_own_group_without_weight_decay(self):
        model = _gated_bert(structured=True)
        groups = {group["name"]: group for group in param_groups(model, lr=1e-4, alpha_lr=0.1, weight_decay=0.01)}
        alpha_ids = {id(p) for n, p in model.named_parameters() if n.endswith("_alpha")}
        assert {id(p) for p in groups["alpha"]["params"]} == alpha_ids
        assert groups["alpha"]["lr"] == 0.1 and groups["alpha"]["weight_decay"] == 0.0
        assert groups["diff"]["lr"] == 1e-4 and groups["diff"]["weight_decay"] == 0.01
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert {id(p) for group in groups.values() for p in group["params"]} == trainable

    def test_a_model_without_diff_pruning_is_refused(self):
        with pytest.raises(TypeError, match="get_peft_model"):
            param_groups(MODEL_CASES["bert"].model(), lr=1e-4)


class TestPenaltyWeight:
    """Why examples/glue.py, with runs of a few hundred steps, defaults to l0_lambda 1.25e-5 (docs/training.md)."""

    def test_the_paper_lambda_leaves_half_the_gates_open_after_200_steps(self):
        # its gradient on a gate logit, 1.25e-7 * sigmoid'(5) = 8e-10, is under AdamW's eps of 1e-8: the logits
        # creep (the SST-2 run of docs/benchmarks.md ends its 250 steps at 0.42)
        densities = _train(_gated_bert(l0_lambda=1.25e-7))
        assert densities[100] > 0.9 and densities[-1] > 0.3

    def test_a_lambda_above_adams_eps_closes_most_gates_within_100_steps(self):
        # 100x the paper's: the penalty's gradient outweighs eps and the logits move at about their lr; what stays
        # open is what this one batch needs (the tiny model's density levels off near 6%)
        densities = _train(_gated_bert(l0_lambda=1.25e-5))
        assert densities[60] < 0.2 and densities[100] < 0.1 and densities[-1] < 0.07


def _group_densities(model: torch.nn.Module) -> torch.Tensor:
    """P(z^j != 0) of every group gate (the paper's stretch has no shift)."""
    logits = [p for n, p in model.named_parameters() if n.endswith("_group_alpha")]
    return torch.sigmoid(torch.stack(logits).detach())


class TestGroupPenaltyWeight:
    """`group_l0_lambda`: the penalty weight of structured diff pruning's group gates, apart from the element gates'."""

    @staticmethod
    def _penalty_and_grads(model):
        for param in model.parameters():
            param.grad = None
        penalty = model.base_model.l0_penalty()
        penalty.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("_alpha") and p.grad is not None}
        return penalty.item(), grads

    def _randomised(self, **config_kwargs):
        torch.manual_seed(0)
        model = _gated_bert(structured=True, **config_kwargs)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_alpha"):
                    param.uniform_(-3, 3)
        return model

    def test_product_form_value_and_gradients(self):
        # the value stays l0_lambda * E[L0]; the element logits get l0_lambda's gradient, the group logits group_l0_lambda's
        reference = self._randomised(l0_lambda=1e-3)
        split = self._randomised(l0_lambda=1e-3, group_l0_lambda=1e-6)
        value, reference_grads = self._penalty_and_grads(reference)
        split_value, split_grads = self._penalty_and_grads(split)
        assert split_value == pytest.approx(value, rel=1e-6)
        assert value == pytest.approx(1e-3 * expected_l0(reference).item(), rel=1e-6)
        assert reference_grads.keys() == split_grads.keys()
        groups = [n for n in split_grads if n.endswith("_group_alpha")]
        assert len(groups) > 10
        for name, grad in split_grads.items():
            scale = 1e-3 if name in groups else 1.0
            torch.testing.assert_close(grad, reference_grads[name] * scale, rtol=1e-5, atol=0)

    def test_unset_weight_is_the_papers_single_penalty(self):
        model = self._randomised(l0_lambda=1e-3)
        value, grads = self._penalty_and_grads(model)
        for param in model.parameters():
            param.grad = None
        (1e-3 * expected_l0(model)).backward()
        assert value == pytest.approx(1e-3 * expected_l0(model).item(), rel=1e-6)
        for name, param in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-6, atol=0)

    def test_sum_form_weighs_the_two_sums(self):
        model = self._randomised(l0_lambda=1e-3, group_l0_lambda=2.0, group_penalty="sum")
        value, _ = self._penalty_and_grads(model)
        alphas = [p.detach() for n, p in model.named_parameters() if n.endswith("_alpha") and "group" not in n]
        elements = sum(torch.sigmoid(a).sum().item() for a in alphas)
        groups = _group_densities(model).sum().item()
        assert value == pytest.approx(1e-3 * elements + 2.0 * groups, rel=1e-5)

    def test_the_training_loss_carries_the_weighted_penalty(self):
        # with group_l0_lambda 0 the group logits get the task's gradient alone, the element logits the penalty's too
        model = self._randomised(l0_lambda=1e-3, group_l0_lambda=0.0)
        config = model.peft_config["default"]
        batch = MODEL_CASES["bert"].batch()
        model.train()
        grads, losses = [], []
        for l0_lambda in (1e-3, 0.0):
            config.l0_lambda = l0_lambda
            for param in model.parameters():
                param.grad = None
            torch.manual_seed(0)
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("_alpha")})
        config.l0_lambda = 1e-3
        assert losses[0] - losses[1] == pytest.approx(1e-3 * expected_l0(model).item(), rel=1e-4)
        for name, grad in grads[0].items():
            if name.endswith("_group_alpha"):
                torch.testing.assert_close(grad, grads[1][name])
            else:
                assert not torch.equal(grad, grads[1][name])

    def test_group_gates_stay_open_under_a_lower_group_weight(self):
        # 1.25e-5 on both closes most group gates within 100 steps (on MiniLM it closed them all); with the group
        # weight at 1.25e-7 most groups stay open while the element gates close as unstructured ones do
        one_weight = _gated_bert(structured=True, l0_lambda=1.25e-5)
        _train(one_weight, steps=100)
        assert _group_densities(one_weight).median() < 0.1
        split = _gated_bert(structured=True, l0_lambda=1.25e-5, group_l0_lambda=1.25e-7)
        densities = _train(split, steps=100)
        assert _group_densities(split).median() > 0.9 and densities[-1] < 0.15

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"group_l0_lambda": 1e-7}, "structured=True"),
            ({"structured": True, "group_l0_lambda": -1.0}, "group_l0_lambda must be"),
            ({"structured": True, "group_l0_lambda": float("nan")}, "group_l0_lambda must be"),
        ],
    )
    def test_bad_weights_are_refused(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            DiffPruningConfig(**kwargs)


def _fixed_noise(alpha: torch.Tensor) -> torch.Tensor:
    """Uniform noise that depends only on the tensor's shape, so both forward paths draw the same gates."""
    generator = torch.Generator().manual_seed(alpha.numel())
    return torch.rand(alpha.shape, generator=generator).clamp(gates.NOISE_EPS, 1 - gates.NOISE_EPS)


class TestGatedLinear:
    """The gated stage's `nn.Linear` path (functional.gated_diff_linear) against the generic `theta + z * w` one."""

    @pytest.fixture
    def fixed_gates(self, monkeypatch):
        monkeypatch.setattr(gates, "_uniform_noise", _fixed_noise)
        monkeypatch.setattr(
            layer, "sample_group_gate", lambda a, s: gates.sample_gate_from_noise(a, _fixed_noise(a), s)
        )

    @staticmethod
    def _loss_and_grads(model, batch):
        for param in model.parameters():
            param.grad = None
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    @pytest.mark.parametrize("case", ["bert", "t5", "llama", "vit"])
    @pytest.mark.parametrize("structured", [False, True], ids=["unstructured", "structured"])
    def test_same_loss_and_gradients_as_the_generic_path(self, case, structured, fixed_gates, monkeypatch):
        torch.manual_seed(0)
        config = DiffPruningConfig(task_type=MODEL_CASES[case].task_type, structured=structured, init_weights=False)
        model = get_peft_model(MODEL_CASES[case].model(), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_alpha"):
                    param.uniform_(-2, 4)  # gates at 0, at 1 and in between
        batch = MODEL_CASES[case].batch()
        model.train()
        calls = []
        monkeypatch.setattr(layer, "gated_diff_linear", lambda *a: calls.append(1) or functional.gated_diff_linear(*a))
        fast_loss, fast = self._loss_and_grads(model, batch)
        assert calls  # nn.Linear layers took the gated path
        monkeypatch.setattr(layer.GenericLayer, "_adapted_forward", layer.DiffPruningLayer._adapted_forward)
        loss, reference = self._loss_and_grads(model, batch)
        assert fast_loss == pytest.approx(loss, rel=1e-5)
        assert fast.keys() == reference.keys()
        assert (
            any("weight_alpha" in name for name in fast) and any("group_alpha" in name for name in fast) == structured
        )
        for name, grad in fast.items():
            scale = reference[name].abs().max().item() or 1.0
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-5 * scale, msg=name)

    def test_keeps_no_adapted_weight_for_backward(self, monkeypatch):
        # what the autograd graph holds besides parameters: the input and the gate samples, not W + delta
        def saved_bytes(model) -> int:
            params = {p.data_ptr() for p in model.parameters()}
            total = 0

            def pack(tensor):
                nonlocal total
                if tensor.data_ptr() not in params:
                    total += tensor.numel() * tensor.element_size()
                return tensor

            batch = MODEL_CASES["bert"].batch()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                model(**batch).loss.backward()
            return total

        model = _gated_bert()
        model.train()
        linear_weights = sum(
            m.get_base_layer().weight.numel() * 4
            for m in model.modules()
            if isinstance(m, layer.GenericLayer) and type(m.get_base_layer()) is torch.nn.Linear
        )
        fast = saved_bytes(model)
        monkeypatch.setattr(layer.GenericLayer, "_adapted_forward", layer.DiffPruningLayer._adapted_forward)
        generic = saved_bytes(model)
        assert generic - fast >= linear_weights

    def test_backward_draws_the_forwards_gates_again(self, monkeypatch):
        # no gate is saved for backward (the graph holds no tensor of a weight's or a bias's shape besides
        # parameters); the gates backward draws again are the forward's, bit for bit, whatever was drawn in between,
        # and the gradients are those of plain autograd through the forward's gates
        monkeypatch.setattr(gates, "_redraw", True)  # gates.set_redraw_gates(True)
        drawn = []
        noise = gates._uniform_noise  # the gates' one source of noise, fused or eager
        monkeypatch.setattr(gates, "_uniform_noise", lambda a: drawn.append(noise(a)) or drawn[-1].clone())
        x = torch.randn(4, 5, 16, requires_grad=True)
        weight, bias = torch.randn(8, 16), torch.randn(8)
        diffs = [
            torch.randn(8, 16),
            torch.empty(8, 16).uniform_(-3, 6),
            torch.randn(8),
            torch.empty(8).uniform_(-3, 6),
        ]
        diffs = [t.requires_grad_() for t in diffs]
        saved = []
        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out, *_ = functional.gated_diff_linear(
                x, weight, bias, (-1.5, 1.5), (diffs[0], diffs[1], None, None), (diffs[2], diffs[3], None, None)
            )
        inputs = {t.data_ptr() for t in (weight, bias, *diffs)}
        assert not [t for t in saved if t.shape in (weight.shape, bias.shape) and t.data_ptr() not in inputs]
        upstream = torch.randn_like(out)  # and draws between forward and backward
        before_backward = torch.get_rng_state()
        grads = torch.autograd.grad(out, [x, *diffs], upstream)
        assert torch.equal(torch.get_rng_state(), before_backward)
        assert len(drawn) == 4 and all(torch.equal(drawn[i], drawn[i + 2]) for i in range(2))
        gate_weight, gate_bias = (
            gates.sample_gate_from_noise(alpha.detach(), u, (-1.5, 1.5))
            for alpha, u in ((diffs[1], drawn[0]), (diffs[3], drawn[1]))
        )
        reference = torch.nn.functional.linear(x, weight + gate_weight * diffs[0], bias + gate_bias * diffs[2])
        torch.testing.assert_close(out, reference)
        reference_grads = torch.autograd.grad(reference, [x, diffs[0], diffs[2]], upstream)
        for grad, expected in zip([grads[0], grads[1], grads[3]], reference_grads, strict=True):
            torch.testing.assert_close(grad, expected)

    def test_a_trainable_base_weight_keeps_its_gradient(self):
        # the gated path gives the frozen base weights no gradient, so a base weight made trainable takes the generic one
        model = _gated_bert()
        query = next(m for n, m in model.named_modules() if n.endswith("attention.self.query"))
        query.get_base_layer().weight.requires_grad_(True)
        model.train()
        model(**MODEL_CASES["bert"].batch()).loss.backward()
        assert query.get_base_layer().weight.grad is not None and query.get_base_layer().weight.grad.abs().sum() > 0


class TestPenaltyUntilTarget:
    """`penalty_until_target`: the penalty stops where the expected density reaches `target_sparsity`."""

    def test_the_gates_stop_closing_once_the_budget_is_reached(self):
        # at 1.25e-5 the constant penalty keeps closing gates (5.7% open after 150 steps, still falling); stopped
        # once 20% are open, they close for a few more steps (AdamW's momentum: this tiny model halves its open
        # gates in 10 steps there) and then stay where they are
        runs = {}
        for until in (False, True):
            model = _gated_bert(l0_lambda=1.25e-5, target_sparsity=0.2, penalty_until_target=until)
            densities = _train(model, steps=150)
            runs[until] = (
                densities,
                int(model.base_model._open_entries("default")) / base_parameter_count(model.base_model),
            )
        (constant, constant_open), (until, until_open) = runs[False], runs[True]
        assert constant[-1] < constant[100] - 0.005 and constant_open < 0.06
        assert until[-1] == pytest.approx(until[100], abs=0.003) and 0.07 < until_open < 0.2
        # identical until the gates first reach the budget
        assert until[:40] == pytest.approx(constant[:40], rel=1e-5)

    @pytest.mark.parametrize("target", [0.005, 1.0])
    def test_the_loss_carries_the_penalty_only_above_the_target(self, target):
        batch = MODEL_CASES["bert"].batch()
        losses = {}
        for until in (False, True):
            model = _gated_bert(l0_lambda=1e-3, target_sparsity=target, penalty_until_target=until)
            model.train()
            torch.manual_seed(0)
            loss = model(**batch).loss
            loss.backward()
            alpha_grad = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.endswith("_alpha")])
            tuner = model.base_model
            losses[until] = (loss.item(), tuner.last_l0_penalty().item(), tuner.l0_penalty().item(), alpha_grad)
        (plain, plain_penalty, _, plain_grad), (loss, penalty, reported, grad) = losses[False], losses[True]
        assert plain_penalty > 0  # the gates start open: density about 0.99
        if target == 1.0:  # at or below the target from the start: no penalty, in the loss, its log or its gradient
            assert penalty == reported == 0.0
            assert loss == pytest.approx(plain - plain_penalty, rel=1e-6)
            assert not torch.allclose(grad, plain_grad)
        else:
            assert (loss, penalty, reported) == pytest.approx((plain, plain_penalty, plain_penalty), rel=1e-6)
            torch.testing.assert_close(grad, plain_grad)

    def test_open_entries_follow_the_deterministic_gate_and_closed_groups(self):
        model = _gated_bert(structured=True, penalty_until_target=True)
        tuner = model.base_model
        alphas = {n: p for n, p in model.named_parameters() if n.endswith("_alpha") and "group" not in n}
        groups = {n: p for n, p in model.named_parameters() if n.endswith("_group_alpha")}
        total = sum(p.numel() for p in alphas.values())
        assert int(tuner._open_entries("default")) == total  # alpha_init 5: every gate open
        closed_group, group = next(iter(groups.items()))
        half = list(alphas.values())[-1]  # another tensor than the closed group's (the last, the first is closed)
        with torch.no_grad():
            group.fill_(-10.0)  # closes its whole tensor
            half.view(-1)[::2] = -0.01  # just below the threshold logit(-l / (r - l)) = 0 of the paper's stretch
        closed = alphas[closed_group.replace("_group_alpha", "_alpha")].numel()
        assert int(tuner._open_entries("default")) == total - closed - half.view(-1)[::2].numel()

    def test_bad_settings_are_refused(self):
        with pytest.raises(ValueError, match="True or False"):
            DiffPruningConfig(penalty_until_target="yes")
