"""Tests for the gated stage over a candidate pool (`DiffPruningConfig(candidate_pool=...)`, pool.py, candidates.py).

The reference is the dense gated stage: with the same gate noise, logits far below zero outside the pool (closed
gates) and the pool's values at the pool's positions, the dense model must give the pool model's loss, penalty and
gradients (restricted to the pool) and its projection.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CAUSAL_LM_CASES, MODEL_CASES, REPO_ROOT
from peft import PeftModel, get_peft_model

from peft_diffprune import DiffPruningConfig, project_to_sparsity, regrow_pool, select_pool
from peft_diffprune.diff_pruning import candidates, gates
from peft_diffprune.diff_pruning import sparse as sparse_module
from peft_diffprune.diff_pruning.layer import DiffPruningLayer
from peft_diffprune.diff_pruning.pool import is_pool, pool_positions, position_dtype, sorted_pool
from peft_diffprune.diff_pruning.sparse import _top_positions, base_parameter_count


SPARSITY = 0.05
POOL = 3.0
CLOSED = -30.0  # a logit whose gate is exactly 0 under any clamped noise: the dense stage's entries outside the pool


def pool_model(case, seed: int = 0, **kwargs):
    config = DiffPruningConfig(
        task_type=case.task_type, target_sparsity=SPARSITY, candidate_pool=POOL, l0_lambda=1e-2, **kwargs
    )
    return get_peft_model(case.model(seed), config)


def pool_states(model):
    """`{key: (state, name)}` of every pool tensor of the default adapter."""
    out = {}
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, DiffPruningLayer) and "default" in module.diff_pruning_state:
            state = module.diff_pruning_state["default"]
            out.update({f"{module_name}.{n}": (state, n) for n in state.tensor_names if is_pool(state, n)})
    return out


def base_parameters(model):
    """`{key: base parameter}` of every targeted tensor of a PEFT model (`module.name`, module relative to the base)."""
    out = {}
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, DiffPruningLayer):
            out.update({f"{module_name}.{n}": p for n, p in module.base_parameters().items()})
    return out


def state_grads(model, batch):
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


@pytest.fixture
def fixed_noise(monkeypatch):
    """The same gate noise for every entry (u = 0.7) on both paths, so the pool and the dense stage draw alike."""

    def noise(alpha):
        return torch.full_like(alpha, 0.7, dtype=torch.float32)

    def sample(alpha, stretch):
        return gates.sample_gate_from_noise(alpha.float(), noise(alpha), stretch)

    monkeypatch.setattr(gates, "_uniform_noise", noise)  # the element gates' one source of noise, fused or not
    monkeypatch.setattr(gates, "sample_group_gate", lambda a, s: sample(a, s))
    monkeypatch.setattr("peft_diffprune.diff_pruning.layer.sample_group_gate", lambda a, s: sample(a, s))


def dense_twin(model, case, seed: int = 0, **kwargs):
    """The dense gated stage holding the pool model's state: its values at the pool's positions, closed gates
    (logit `CLOSED`, diff 0) everywhere else; structured group logits copied."""
    config = DiffPruningConfig(task_type=case.task_type, target_sparsity=SPARSITY, l0_lambda=1e-2, **kwargs)
    dense = get_peft_model(case.model(seed), config)
    states = pool_states(model)
    with torch.no_grad():
        for module_name, module in dense.base_model.model.named_modules():
            if not isinstance(module, DiffPruningLayer):
                continue
            state = module.diff_pruning_state["default"]
            for name in state.tensor_names:
                diff, alpha = getattr(state, f"{name}_diff"), getattr(state, f"{name}_alpha")
                diff.zero_()
                alpha.fill_(CLOSED)
                pool = states.get(f"{module_name}.{name}")
                if pool is None:
                    continue
                positions = pool_positions(*pool)
                diff.view(-1)[positions] = getattr(pool[0], f"{name}_diff")
                alpha.view(-1)[positions] = getattr(pool[0], f"{name}_alpha")
                if hasattr(state, f"{name}_group_alpha"):
                    getattr(state, f"{name}_group_alpha").copy_(getattr(pool[0], f"{name}_group_alpha"))
    return dense


def randomise(model, seed: int = 0, alpha=(-1.0, 2.0)):
    """Random pool diffs and logits spread over closed, fractional and open gates."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".diff_pruning_state." in name and name.endswith("_diff"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif ".diff_pruning_state." in name and name.endswith("_alpha"):
                param.copy_(torch.rand(param.shape, generator=generator) * (alpha[1] - alpha[0]) + alpha[0])


@pytest.mark.parametrize("structured", [False, True], ids=["unstructured", "structured"])
@pytest.mark.parametrize("model_name", ["bert", "gpt2", "t5", "vit"])
def test_loss_penalty_and_gradients_match_the_dense_stage_restricted_to_the_pool(model_name, structured, fixed_noise):
    case = MODEL_CASES[model_name]
    model = pool_model(case, structured=structured)
    select_pool(model, [case.batch(1)])
    randomise(model)
    dense = dense_twin(model, case, structured=structured)
    batch = case.batch()

    loss, dense_loss = state_grads(model, batch), state_grads(dense, batch)
    penalty, dense_penalty = model.base_model.last_l0_penalty(), dense.base_model.last_l0_penalty()
    assert penalty > 0
    # the dense stage's closed gates outside the pool add sigmoid(-30) ~ 1e-13 each to its penalty
    torch.testing.assert_close(penalty, dense_penalty, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, dense_loss, rtol=1e-5, atol=1e-5)

    checked = 0
    dense_layers = {n: m for n, m in dense.base_model.model.named_modules() if isinstance(m, DiffPruningLayer)}
    for key, (state, name) in pool_states(model).items():
        module_name = key.rpartition(".")[0]
        dense_state = dense_layers[module_name].diff_pruning_state["default"]
        positions = pool_positions(state, name)
        for suffix in ("diff", "alpha"):
            grad = getattr(state, f"{name}_{suffix}").grad
            dense_grad = getattr(dense_state, f"{name}_{suffix}").grad.reshape(-1)
            torch.testing.assert_close(grad, dense_grad[positions], rtol=1e-4, atol=1e-7, msg=f"{key} {suffix}")
            outside = torch.ones_like(dense_grad, dtype=torch.bool)
            outside[positions] = False
            # no task gradient outside the pool: those gates are closed (the penalty's is ~1e-13)
            assert dense_grad[outside].abs().max() < 1e-9 if outside.any() else True
        if structured:
            torch.testing.assert_close(
                getattr(state, f"{name}_group_alpha").grad,
                getattr(dense_state, f"{name}_group_alpha").grad,
                rtol=1e-4,
                atol=1e-8,
            )
        checked += 1
    assert checked == len(model.peft_config["default"].pool_pattern) > 0


@pytest.mark.parametrize("alpha", [(0.5, 3.0), (-3.0, 0.2)], ids=["open", "mostly-closed"])
@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_projection_of_the_pool_is_the_dense_projection(scope, alpha):
    """Open gates: the budget is below the pool's non-zeros. Mostly closed: the budget is filled with zeros at the
    lowest positions whose diff is zero, in or outside the pool, as the dense ranking fills it."""
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    select_pool(model, [case.batch(1)])
    randomise(model, alpha=alpha)
    dense = dense_twin(model, case)
    pooled = set(model.peft_config["default"].pool_pattern)
    report, dense_report = project_to_sparsity(model, scope=scope), project_to_sparsity(dense, scope=scope)
    kept, dense_kept = model.peft_config["default"].kept_pattern, dense.peft_config["default"].kept_pattern
    assert report.kept > 0
    if scope == "global":
        assert kept == dense_kept and report.kept == dense_report.kept
    else:
        # per tensor, a tensor with no pool entry keeps nothing (the dense stage fills its budget with zeros)
        assert kept == {key: count for key, count in dense_kept.items() if key in pooled}
        assert set(dense_kept) - pooled
    state, dense_state = model.state_dict(), dense.state_dict()
    keys = [k for k in state if ".diff_pruning_state." in k]

    def tensor_key(key):  # base_model.model.<module>.diff_pruning_state.default.<name>_values -> <module>.<name>
        return key.removeprefix("base_model.model.").replace(".diff_pruning_state.default.", ".").rpartition("_")[0]

    assert keys == [k for k in dense_state if ".diff_pruning_state." in k and tensor_key(k) in kept]
    for key in keys:
        torch.testing.assert_close(state[key], dense_state[key], rtol=0, atol=0, msg=key)
    if scope == "global":
        batch = case.batch()
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(**batch).logits, dense.eval()(**batch).logits)


def test_the_learned_fill_is_refused_for_a_pool():
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    select_pool(model, [case.batch(1)])
    with pytest.raises(ValueError, match="project it with fill='position'"):
        project_to_sparsity(model, fill="gate")
    assert not model.peft_config["default"].kept_pattern  # nothing was projected


def test_only_pool_entries_carry_state():
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    before = [n for n, p in model.named_parameters() if ".diff_pruning_state." in n]
    assert before == []  # nothing is allocated before the pool is chosen
    pattern = select_pool(model, [case.batch(1)])
    size = round(POOL * SPARSITY * base_parameter_count(model.base_model))
    assert sum(pattern.values()) == size
    params = {n: p for n, p in model.named_parameters() if ".diff_pruning_state." in n}
    buffers = {n: b for n, b in model.named_buffers() if ".diff_pruning_state." in n}
    assert sum(p.numel() for p in params.values()) == 2 * size
    assert sum(b.numel() for b in buffers.values()) == size
    assert all(p.dim() == 1 for p in [*params.values(), *buffers.values()])
    # bytes: fp32 diff + fp32 logit + int32 position per entry
    assert all(b.dtype == torch.int32 for b in buffers.values())
    assert sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()]) == 12 * size
    # the trainable adapter state is only the pool (and the dense classifier head)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".diff_pruning_state." in n or ".modules_to_save." in n for n in trainable)


def test_selection_is_deterministic_and_is_the_top_of_the_gradient():
    case = MODEL_CASES["bert"]
    batches = [case.batch(1), case.batch(2)]
    first, second = pool_model(case), pool_model(case)
    torch.manual_seed(0)
    select_pool(first, batches)
    torch.manual_seed(1)
    select_pool(second, batches)
    positions = {k: pool_positions(*v) for k, v in pool_states(first).items()}
    assert positions.keys() == pool_states(second).keys()
    for key, (state, name) in pool_states(second).items():
        assert torch.equal(pool_positions(state, name), positions[key])

    # with one batch the pool is exactly the top |d loss / d theta| over all targeted entries
    reference = pool_model(case)
    params = base_parameters(reference)
    for param in params.values():
        param.requires_grad_(True)
    reference.eval()
    reference(**batches[0]).loss.backward()
    scores = torch.cat([p.grad.abs().reshape(-1) for p in params.values()])
    model = pool_model(case)
    size = sum(select_pool(model, batches[:1]).values())
    top = set(scores.topk(size).indices.tolist())
    offsets, chosen = 0, set()
    states = pool_states(model)
    for key, param in params.items():
        if key in states:
            chosen.update((pool_positions(*states[key]) + offsets).tolist())
        offsets += param.numel()
    assert chosen == top
    # no gradient is left behind on the base weights or the head
    assert all(p.grad is None for n, p in model.named_parameters())


@pytest.mark.parametrize("size", [0, 1, 37, 250, 399, 400, 1000])
def test_pruning_the_running_top_keeps_the_best_pairs_ties_to_the_first(size):
    # the bisection on the scores' bits, without concatenating the pairs, keeps what a top-k of their concatenation
    # keeps: the `size` best, ties at the threshold to the first in key order
    generator = torch.Generator().manual_seed(size)
    lengths = {"a": 120, "b": 0, "c": 200, "d": 80}
    running = candidates._RunningTop(dict.fromkeys(lengths, 400), total=size)
    for key, length in lengths.items():
        # few distinct values, so that the threshold falls on ties; zeros and an infinity too
        scores = torch.randint(0, 6, (length,), generator=generator).float() / 4
        if key == "c":
            scores[7] = float("inf")
        running.positions[key] = torch.randperm(10_000, generator=generator)[:length].int()
        running.scores[key] = scores
    flat_scores = torch.cat(list(running.scores.values()))
    flat_positions = torch.cat(list(running.positions.values()))
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths.values())])
    keep = _top_positions(flat_scores, min(size, flat_scores.numel()))
    running._prune(list(lengths), size)
    for i, key in enumerate(lengths):
        expected = keep[owner[keep] == i]
        assert torch.equal(running.positions[key], flat_positions[expected])
        assert torch.equal(running.scores[key], flat_scores[expected])
        if 0 < size < flat_scores.numel():
            assert running.thresholds[key] == flat_scores[keep].min()


def _topk_positions(magnitudes, k):
    """`_top_positions` by `torch.topk` alone: the reference for the bisection."""
    threshold = torch.topk(magnitudes, k, sorted=False).values.min()
    above = (magnitudes > threshold).nonzero().squeeze(1)
    at = (magnitudes == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, at]).sort().values


@pytest.mark.parametrize("k", [1, 5, 64, 333, 999])
@pytest.mark.parametrize("signs", ["non-negative", "mixed", "negative"])
def test_top_positions_by_bisection_are_topks(monkeypatch, k, signs):
    # large tensors find the k-th largest by bisection on the order of fp32 values (no topk workspace, 16 bytes per
    # entry): the same positions as topk, with ties, signed zeros, infinities and projection's negative keys
    monkeypatch.setattr(sparse_module, "BISECTION_MIN_ENTRIES", 1)
    generator = torch.Generator().manual_seed(k)
    values = torch.randint(-8, 9, (1000,), generator=generator).float() / 8
    values[:3] = torch.tensor([float("inf"), -float("inf"), -0.0])
    values[3:10] = torch.randn(7, generator=generator) * 1e-30  # subnormals and tiny values around zero
    values = {"non-negative": values.abs(), "mixed": values, "negative": -values.abs() - 1e-3}[signs]
    assert torch.equal(_top_positions(values, k), _topk_positions(values, k))
    assert sparse_module._kth_largest([values[:400], values[400:]], k) == values.sort(descending=True).values[k - 1]
    with_nan = values.clone()
    with_nan[500] = float("nan")  # never chosen while there are k numbers (topk's threshold would be the NaN)
    assert sparse_module._kth_largest([with_nan], 1000) is None
    assert torch.equal(_top_positions(with_nan, k), _topk_positions(with_nan.nan_to_num(nan=-float("inf")), k))


def test_a_nan_gradient_fails_choosing_the_pool_clearly():
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    batch = case.batch(1)
    with torch.no_grad():
        model.get_base_model().bert.embeddings.word_embeddings.weight[batch["input_ids"][0, 0]] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_pool(model, [batch])


def test_regrowth_replaces_closed_entries_keeps_the_pool_sorted_and_never_grows_it():
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    pattern = select_pool(model, [case.batch(1)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state_grads(model, case.batch())
    optimizer.step()
    states = pool_states(model)
    params_before = dict(model.named_parameters())

    def per_entry(state, name):
        """position -> [diff, alpha, their optimizer moments]: each entry's state, wherever its slot is"""
        diff, alpha = getattr(state, f"{name}_diff"), getattr(state, f"{name}_alpha")
        columns = [diff, alpha] + [v for p in (diff, alpha) for v in optimizer.state[p].values() if v.shape == p.shape]
        rows = torch.stack([c.detach() for c in columns], 1).tolist()
        return dict(zip(pool_positions(state, name).tolist(), rows, strict=True))

    # close a third of the gates of every tensor
    closed = {}
    with torch.no_grad():
        for key, (state, name) in states.items():
            closed[key] = set(pool_positions(state, name)[::3].tolist())
            getattr(state, f"{name}_alpha")[::3] = -3.0
    before = {key: per_entry(*v) for key, v in states.items()}
    grown = regrow_pool(model, [case.batch(2)], optimizer)
    assert 0 < grown <= sum(len(c) for c in closed.values())
    assert model.peft_config["default"].pool_pattern == pattern
    assert dict(model.named_parameters()) == params_before  # the same parameter objects
    replaced = 0
    for key, (state, name) in states.items():
        positions = pool_positions(state, name)
        assert positions.numel() == pattern[key] == torch.unique(positions).numel()
        assert torch.equal(positions, positions.sort().values)  # sorted again: training needs no sorted copy
        after = per_entry(state, name)
        new, dropped = set(after) - set(before[key]), set(before[key]) - set(after)
        assert dropped <= closed[key] and len(new) == len(dropped)
        for position in set(after) - new:  # a kept entry keeps its diff, logit and moments
            assert after[position] == before[key][position]
        for position in new:  # a new one starts from a zero diff, the initial logit and zero moments
            assert after[position][:2] == [0.0, 5.0] and not any(after[position][2:])
        replaced += len(new)
    assert replaced == grown
    # training goes on with the same optimizer
    state_grads(model, case.batch())
    optimizer.step()


def test_a_sorted_pool_is_used_as_is_and_an_unsorted_one_sorted_once():
    # every training forward of a linear layer asks for the pool's sorted positions: a chosen pool is sorted, so
    # they are the buffer itself, no copy; positions loaded unsorted are sorted once per change, into a copy
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    select_pool(model, [case.batch(1)])
    for state, name in pool_states(model).values():
        positions = pool_positions(state, name)
        found, order = sorted_pool(state, name)
        assert found is positions and order is None
        if positions.numel() < 2:
            continue
        positions[:2] = positions[:2].flip(0).clone()  # in place, as loading an unsorted checkpoint does
        first, again = sorted_pool(state, name), sorted_pool(state, name)
        assert first[0] is again[0] and first[1] is again[1]
        resorted, order = first
        assert torch.equal(resorted, positions.sort().values) and torch.equal(positions[order], resorted)


def test_an_unsorted_pool_trains_as_the_same_pool_sorted(fixed_noise):
    case = MODEL_CASES["bert"]
    model = pool_model(case, init_weights=False)
    select_pool(model, [case.batch(1)])
    batch = case.batch()
    states = pool_states(model)

    def grads():
        state_grads(model, batch)
        return {
            key: (getattr(s, f"{n}_diff").grad.clone(), getattr(s, f"{n}_alpha").grad.clone())
            for key, (s, n) in states.items()
        }

    sorted_grads, eval_logits = grads(), model.eval()(**batch).logits
    reversed_order = {}
    with torch.no_grad():
        for key, (state, name) in states.items():
            reversed_order[key] = torch.arange(pool_positions(state, name).numel() - 1, -1, -1)
            for suffix in ("pool_positions", "diff", "alpha"):
                tensor = getattr(state, f"{name}_{suffix}")
                tensor.copy_(tensor[reversed_order[key]])
    unsorted_grads = grads()
    torch.testing.assert_close(model.eval()(**batch).logits, eval_logits)
    for key, order in reversed_order.items():
        for got, expected in zip(unsorted_grads[key], sorted_grads[key], strict=True):
            torch.testing.assert_close(got, expected[order])


def _weight_sized_saves(model, batch, shapes) -> list[tuple]:
    """Backward of `model` on `batch`; the shapes of the tensors of `shapes` that autograd saved and that are no
    parameter's storage (adapted weights kept from forward to backward)."""
    saved = []
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in storages and tuple(tensor.shape) in shapes:
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    return saved


def test_regrowth_scores_keep_no_adapted_weight_alive_and_are_the_dense_stages():
    # regrowth scores the base weights' gradients in eval mode; each linear layer rebuilds its adapted weight in
    # backward instead of keeping one per layer alive from forward to backward (the model's size again)
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    select_pool(model, [case.batch(1)])
    randomise(model)
    dense = dense_twin(model, case)
    # 14 tokens, so that no activation has a weight's shape
    batch = {key: value[:, :7] if key != "labels" else value for key, value in case.batch(2).items()}
    weights = {key: p for key, p in base_parameters(model).items() if p.dim() == 2 and ".embeddings." not in key}
    shapes = {shape for p in weights.values() for shape in (tuple(p.shape), tuple(p.shape[::-1]))}
    grads = {}
    for twin in (model, dense):
        twin.eval()
        twin.zero_grad()
        params = base_parameters(twin)
        for param in params.values():
            param.requires_grad_(True)
        saved = _weight_sized_saves(twin, batch, shapes)
        grads[twin is model] = ({k: p.grad.clone() for k, p in params.items()}, saved)
    (pool_grads, pool_saved), (dense_grads, dense_saved) = grads[True], grads[False]
    assert not pool_saved and len(dense_saved) >= len(weights)  # the generic path keeps one per linear layer
    for key in base_parameters(model):
        torch.testing.assert_close(pool_grads[key], dense_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    dense_layers = {n: m for n, m in dense.base_model.model.named_modules() if isinstance(m, DiffPruningLayer)}
    for key, (state, name) in pool_states(model).items():
        dense_state = dense_layers[key.rpartition(".")[0]].diff_pruning_state["default"]
        positions = pool_positions(state, name)
        for suffix in ("diff", "alpha"):
            dense_grad = getattr(dense_state, f"{name}_{suffix}").grad.reshape(-1)[positions]
            grad = getattr(state, f"{name}_{suffix}").grad
            torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-7, msg=f"{key} {suffix}")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_gradient_checkpointing_trains_the_pool_as_without_it(model_name, use_reentrant):
    # activation checkpointing is what brings a pool under the activations full fine-tuning keeps (BERT-base's 0.60x
    # target): the recomputed layers must draw the same gates and give the same gradients
    case = {**MODEL_CASES, **CAUSAL_LM_CASES}[model_name]
    grads = []
    for checkpointed in (False, True):
        model = pool_model(case)
        select_pool(model, [case.batch(1)])
        randomise(model)
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            assert model.get_base_model().is_gradient_checkpointing
        torch.manual_seed(0)
        loss = state_grads(model, case.batch())
        grads.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert_same_step(*grads)


def assert_same_step(reference: tuple, other: tuple) -> None:
    """Two `(loss, {name: grad})` of a training step agree: the same loss, gradients for the same parameters."""
    (loss, reference_grads), (other_loss, grads) = reference, other
    torch.testing.assert_close(other_loss, loss)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_regrowth_with_no_closed_gate_changes_nothing():
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    select_pool(model, [case.batch(1)])
    before = {k: pool_positions(*v).clone() for k, v in pool_states(model).items()}
    assert regrow_pool(model, [case.batch(2)]) == 0
    assert all(torch.equal(pool_positions(*v), before[k]) for k, v in pool_states(model).items())


def test_regrowth_fraction_drops_the_smallest_open_diffs_after_the_closed_ones():
    case = MODEL_CASES["bert"]
    model = pool_model(case, pool_regrow_fraction=0.25)
    select_pool(model, [case.batch(1)])
    states = pool_states(model)
    expected, kept_before = {}, {}
    with torch.no_grad():
        for key, (state, name) in states.items():
            diff, alpha = getattr(state, f"{name}_diff"), getattr(state, f"{name}_alpha")
            n = diff.numel()
            diff.copy_(torch.linspace(1e-3, 2e-3, n).flip(0))  # the last slots hold the smallest diffs
            alpha[:1] = -3.0  # slot 0 closed: dropped first, not counted in the fraction
            dropped = {0} | set(range(n - round(0.25 * n), n)) if n > 1 else {0}
            positions = pool_positions(state, name).tolist()
            expected[key] = {positions[i] for i in dropped}
            kept_before[key] = set(positions) - expected[key]
    grown = regrow_pool(model, [case.batch(2)])
    removed = 0
    for key, (state, name) in states.items():
        after = set(pool_positions(state, name).tolist())
        # the largest open diffs stay; what left is among the closed slot and the smallest quarter
        assert kept_before[key] <= after
        removed += len(expected[key] - after)
    assert removed == grown > len(states)  # more than the one closed slot per tensor
    # the default (0) drops the closed entries only: an open small diff stays
    model = pool_model(case)
    select_pool(model, [case.batch(1)])
    before = {k: pool_positions(*v).clone() for k, v in pool_states(model).items()}
    assert regrow_pool(model, [case.batch(2)]) == 0
    assert all(torch.equal(pool_positions(*v), before[k]) for k, v in pool_states(model).items())
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="pool_regrow_fraction"):
            DiffPruningConfig(candidate_pool=4.0, pool_regrow_fraction=bad)


def test_training_before_selection_raises_and_config_is_checked():
    case = MODEL_CASES["bert"]
    model = pool_model(case).train()
    with pytest.raises(RuntimeError, match="select_pool"):
        model(**case.batch())
    with pytest.raises(ValueError, match="candidate_pool"):
        DiffPruningConfig(candidate_pool=0.5)
    with pytest.raises(ValueError, match="candidate_pool"):
        DiffPruningConfig(pool_pattern={"a.weight": 3})
    with pytest.raises(ValueError, match="no candidate pool"):
        select_pool(get_peft_model(case.model(), DiffPruningConfig(task_type="SEQ_CLS")), [case.batch()])


@pytest.mark.parametrize("model_name", [*MODEL_CASES, "llama_tied"])
def test_every_model_trains_merges_and_projects_with_a_pool(model_name):
    case = MODEL_CASES.get(model_name) or CAUSAL_LM_CASES[model_name]
    reference = case.model()
    model = pool_model(case)
    select_pool(model, [case.batch(1)])
    batch = case.batch()
    with torch.no_grad():  # a zero diff: the adapted model is the base model
        torch.testing.assert_close(model.eval()(**batch).logits, reference(**batch).logits)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        torch.manual_seed(step)
        state_grads(model, batch)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        assert not torch.allclose(unmerged, reference(**batch).logits)
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, unmerged, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
    report = project_to_sparsity(model)
    assert 0 < report.kept <= round(SPARSITY * report.total_parameters)


@pytest.mark.parametrize("structured", [False, True], ids=["unstructured", "structured"])
def test_gated_pool_checkpoint_round_trip(tmp_path, structured):
    case = MODEL_CASES["bert"]
    model = pool_model(case, structured=structured)
    select_pool(model, [case.batch(1)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state_grads(model, case.batch())
    optimizer.step()
    model.eval().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.model(), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].pool_pattern == model.peft_config["default"].pool_pattern
    state = {k: v for k, v in model.state_dict().items() if ".diff_pruning_state." in k}
    loaded_state = {k: v for k, v in loaded.state_dict().items() if ".diff_pruning_state." in k}
    assert state.keys() == loaded_state.keys() and any(k.endswith("_pool_positions") for k in state)
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    batch = case.batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model(**batch).logits)
    # the loaded checkpoint trains and projects as the original does
    torch.manual_seed(3)
    loss = state_grads(loaded, batch)
    torch.manual_seed(3)
    torch.testing.assert_close(loss, state_grads(model, batch))
    project_to_sparsity(loaded)
    project_to_sparsity(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model.eval()(**batch).logits)


def test_positions_are_int64_only_where_int32_cannot_hold_them():
    assert position_dtype(2**31) == torch.int32  # positions 0 .. 2^31 - 1
    assert position_dtype(2**31 + 1) == torch.int64


def test_a_gated_pool_checkpoint_with_int64_positions_loads(tmp_path):
    """Checkpoints written before positions were int32 hold them as int64: they load into the int32 buffers, with
    the same positions and outputs."""
    from safetensors.torch import load_file, save_file

    case = MODEL_CASES["bert"]
    model = pool_model(case)
    select_pool(model, [case.batch(1)])
    with torch.no_grad():
        for state, name in pool_states(model).values():
            getattr(state, f"{name}_diff").normal_(0.0, 0.05)
    model.eval().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    widened = [key for key in tensors if key.endswith("_pool_positions")]
    assert widened and all(tensors[key].dtype == torch.int32 for key in widened)
    save_file({k: v.long() if k in widened else v for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(case.model(), tmp_path)
    for key, (state, name) in pool_states(loaded).items():
        positions = getattr(state, f"{name}_pool_positions")
        assert positions.dtype == torch.int32
        assert torch.equal(positions, pool_positions(*pool_states(model)[key]))
    batch = case.batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model(**batch).logits)


def test_an_unloaded_pool_raises_instead_of_acting():
    case = MODEL_CASES["bert"]
    model = pool_model(case)
    pattern = select_pool(model, [case.batch(1)])
    config = DiffPruningConfig(
        task_type="SEQ_CLS", target_sparsity=SPARSITY, candidate_pool=POOL, pool_pattern=dict(pattern)
    )
    fresh = get_peft_model(case.model(), config)
    with pytest.raises(ValueError, match="not\\s+loaded|was not loaded"), torch.no_grad():
        fresh.eval()(**case.batch())


def test_a_pool_adapter_beside_a_dense_one():
    case = MODEL_CASES["bert"]
    model = get_peft_model(case.model(), DiffPruningConfig(task_type="SEQ_CLS", init_weights=False))
    pooled = DiffPruningConfig(task_type="SEQ_CLS", target_sparsity=SPARSITY, candidate_pool=POOL, l0_lambda=1e-2)
    model.add_adapter("pool", pooled)
    model.set_adapter("pool")
    select_pool(model, [case.batch(1)], adapter_name="pool")
    batch = case.batch()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".diff_pruning_state." in n}
    assert trainable and all(".diff_pruning_state.pool." in n for n in trainable)
    state_grads(model, batch)
    assert all(p.grad is None for n, p in model.named_parameters() if ".diff_pruning_state.default." in n)
    assert model.base_model.last_l0_penalty("pool") > 0
    project_to_sparsity(model, adapter_name="pool")
    model.set_adapter("default")
    with torch.no_grad():
        dense_logits = model.eval()(**batch).logits
    assert not torch.isnan(dense_logits).any()
    assert not pool_states(model)  # the dense adapter holds no pool


def pool_trainer(output_dir, **arguments):
    """The recipe's Trainer on a pool whose gates start nearly closed under a strong penalty: they close within a few
    steps, so regrowth (every 2 steps, from the last 2 batches) has work to do."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from peft_diffprune import DiffPruningSchedule, DiffPruningTrainer

    case = MODEL_CASES["bert"]
    model = pool_model(case, alpha_init=0.3, pool_regrow_steps=2, pool_score_batches=2)
    model.peft_config["default"].l0_lambda = 1.0
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(1, 100, (32, 8), generator=generator).tolist(),
            "labels": torch.randint(0, 3, (32,), generator=generator).tolist(),
        }
    )
    args = TrainingArguments(
        str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_steps=4,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **arguments,
    )
    schedule = DiffPruningSchedule(fixmask_max_steps=2, alpha_learning_rate=0.5, target_sparsity=SPARSITY)
    return DiffPruningTrainer(model, args, train_dataset=data, diff_pruning=schedule)


def test_trainer_chooses_regrows_and_projects_the_pool(tmp_path):
    trainer = pool_trainer(tmp_path, save_strategy="no")
    model, config = trainer.model, trainer.model.peft_config["default"]
    regrown = []
    step = trainer._pool.step
    trainer._pool.step = lambda *a: regrown.append(step(*a)) or regrown[-1]
    assert not config.pool_pattern
    trainer.train()
    size = round(POOL * SPARSITY * base_parameter_count(model.base_model))
    assert sum(config.pool_pattern.values()) == size
    assert len(regrown) == 4 and regrown[1] > 0 and regrown[0] == regrown[2] == 0  # at steps 2 and 4
    assert sum(config.kept_pattern.values()) == round(SPARSITY * base_parameter_count(model.base_model))
    trainer.save_model()
    loaded = PeftModel.from_pretrained(MODEL_CASES["bert"].model(), tmp_path)
    assert loaded.peft_config["default"].kept_pattern == config.kept_pattern


def test_trainer_resumes_a_gated_pool_checkpoint_as_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    reference = pool_trainer(tmp_path / "a", save_steps=2)
    reference.train()
    reference.save_model()
    resumed = pool_trainer(tmp_path / "b", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "gated" / "checkpoint-2"))
    resumed.save_model()
    expected, got = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=0, msg=key)


def test_trainer_checkpoints_choosing_the_pool_as_its_arguments_ask(tmp_path):
    # `Trainer.train` turns activation checkpointing on after the recipe chose the pool; the recipe turns it on
    # first, so that scoring checkpoints too, and the run (no dropout here) saves the adapter of the run without it
    import transformers
    from safetensors.torch import load_file

    from peft_diffprune import selective_checkpointing
    from peft_diffprune.diff_pruning.checkpointing import checkpointed_layers

    reference = pool_trainer(tmp_path / "a", save_strategy="no")
    reference.train()
    reference.save_model()
    name = "activation_checkpointing" if hasattr(transformers.TrainingArguments, "activation_checkpointing") else None
    name = name or "gradient_checkpointing"
    trainer = pool_trainer(
        tmp_path / "b", save_strategy="no", **{name: True, f"{name}_kwargs": selective_checkpointing()}
    )
    scored_checkpointed = []
    score = candidates._score

    def spy(model, *rest):
        scored_checkpointed.append(len(checkpointed_layers(model)))
        return score(model, *rest)

    candidates._score = spy
    try:
        trainer.train()
    finally:
        candidates._score = score
    trainer.save_model()
    layers = MODEL_CASES["bert"].model().config.num_hidden_layers
    assert scored_checkpointed and scored_checkpointed[0] == layers  # choosing the pool; regrowths after it
    expected, got = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, float]:
    out_dir = tmp_path_factory.mktemp("pool_ranks")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    worker = REPO_ROOT / "tests" / "pool_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(out_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads((out_dir / "results.json").read_text())


@pytest.mark.slow
def test_ddp_ranks_agree_on_the_pool_and_its_regrowth(two_ranks):
    """Each rank scores its own batches; every rank takes rank 0's pool and regrowth, and DDP trains it as one
    process would."""
    assert two_ranks["ddp/pool_positions_differ"] == 0.0
    assert two_ranks["ddp/regrown_none"] == 0.0 and two_ranks["ddp/regrown_positions_differ"] == 0.0
    assert two_ranks["ddp/params_differ"] == 0.0
    assert two_ranks["ddp/pool/loss"] < 1e-6 and two_ranks["ddp/pool/grads"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp2", "fsdp1"])
def test_fsdp_trains_a_pool_chosen_before_sharding(two_ranks, kind):
    assert two_ranks[f"{kind}/pool/loss"] < 1e-5
    assert two_ranks[f"{kind}/pool/grads"] < 1e-5
    # with lean saved activations on the sharded model (the reference keeps every tensor as it is)
    assert two_ranks[f"{kind}/pool_lean/loss"] < 1e-5
    assert two_ranks[f"{kind}/pool_lean/grads"] < 1e-5
    assert two_ranks[f"{kind}/pool_lean/recipes"] > 0
    # with dropout, threaded on both models: the same masks for the same seed under FSDP's hooks
    assert two_ranks[f"{kind}/pool_threaded/loss"] < 1e-5
    assert two_ranks[f"{kind}/pool_threaded/grads"] < 1e-5
    # 2 steps x 2 models x 2 layers, attention dropout inside sdpa
    assert two_ranks[f"{kind}/pool_threaded/attention_masks"] == 8
    assert two_ranks[f"{kind}/regrow_refused"] == 1.0  # with a clear error naming the fix


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_a_bf16_base_trains_an_fp32_pool(model_name):
    """As PEFT's default `autocast_adapter_dtype` makes the dense state: fp32 pool state on a bf16 base."""
    case = MODEL_CASES[model_name]
    config = DiffPruningConfig(task_type=case.task_type, target_sparsity=SPARSITY, candidate_pool=POOL, l0_lambda=1e-2)
    model = get_peft_model(case.model(dtype=torch.bfloat16), config)
    select_pool(model, [case.batch(1)])
    state = {n: p for n, p in model.named_parameters() if ".diff_pruning_state." in n}
    assert state and {p.dtype for p in state.values()} == {torch.float32}
    loss = state_grads(model, case.batch())
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in state.values())
    assert project_to_sparsity(model).kept == round(SPARSITY * base_parameter_count(model.base_model))
