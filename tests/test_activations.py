"""Lean saved activations (`lean_activations`, `enable_lean_activations`): fewer saved bytes, the same gradients."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from conftest import CAUSAL_LM_CASES, MODEL_CASES
from test_checkpointing import build as build_adapted
from test_checkpointing import train_step, with_dropout
from test_pool import randomise

from peft_diffprune import (
    disable_lean_activations,
    enable_lean_activations,
    lean_activations,
)
from peft_diffprune.diff_pruning import activations


CASES = {**MODEL_CASES, **CAUSAL_LM_CASES}


def build(model_name: str, method: str):
    """A diff pruning model ("pool" or "dense", as test_checkpointing builds them) or the plain model ("full"), with
    dropout."""
    if method != "full":
        return build_adapted(model_name, method, None, dropout=True)
    case = CASES[model_name]
    model = case.model()
    randomise(model)
    return with_dropout(model), case


@pytest.fixture(autouse=True)
def every_size(monkeypatch):
    """The tiny models' activations are below `MIN_ENTRIES`: apply the recipes to every size."""
    monkeypatch.setattr(activations, "MIN_ENTRIES", 0)


@pytest.mark.parametrize(
    "model_name,method",
    [
        ("bert", "pool"),
        ("bert", "dense"),
        ("bert", "full"),
        ("llama", "pool"),
        ("llama", "full"),
        ("gpt2", "pool"),
        ("gpt2", "full"),
        ("t5", "dense"),
        ("vit", "pool"),
    ],
)
def test_lean_activations_give_the_same_loss_and_gradients_bit_for_bit(model_name, method):
    model, case = build(model_name, method)
    batch = case.batch()
    loss, grads, _ = train_step(model, batch)
    enable_lean_activations(model)
    lean_loss, lean_grads, _ = train_step(model, batch)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys() and any(g is not None for g in grads.values())
    for name, grad in grads.items():
        assert (grad is None and lean_grads[name] is None) or torch.equal(grad, lean_grads[name]), name


def saved(model, batch) -> tuple[dict[int, int], dict[int, int], list]:
    """`(bytes saved for backward by one training forward without lean activations, by storage; the same with them;
    what each saved tensor was kept as)`, counting activations only: no parameter, buffer or 1-d tensor."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    plain, lean, kinds = {}, {}, []
    # every storage counted stays alive until the count is done: a saved tensor that a recipe replaces is freed, and
    # a later tensor at its address would be counted as the same storage (plain read 28,888 bytes or less by chance)
    alive = []

    def count(into, tensor, mask=False):
        storage = tensor.untyped_storage()
        # activations, not the pool's per-entry state; a mask of bits is 1-d
        if storage.data_ptr() not in held and (tensor.dim() > 1 or mask):
            alive.append(storage)
            into[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        packed = activations._pack(tensor)
        kinds.append(packed)
        count(plain, tensor)
        if isinstance(packed, activations._TwoValued):
            count(lean, packed.mask, mask=True)
        elif isinstance(packed, activations._Kept):
            count(lean, packed.tensor)
        return packed

    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, activations._unpack):
        model(**batch).loss.backward()
    return plain, lean, kinds


@pytest.mark.parametrize("method", ["pool", "full"])
def test_lean_activations_keep_fewer_bytes_and_no_new_tensor(method):
    model, case = build("bert", method)
    enable_lean_activations(model)  # tags the layer norms; `saved` applies the hooks itself
    disable = model._lean_activation_hooks[-2:]  # the context hooks: `saved` enters it, not the model
    for handle in disable:
        handle.remove()
    plain, lean, kinds = saved(model, case.batch())
    # GELU and layer norm outputs and the attention probabilities after dropout are rebuilt, dropout masks are bits
    recomputed = [k for k in kinds if isinstance(k, activations._Recomputed)]
    masks = [k for k in kinds if isinstance(k, activations._TwoValued)]
    layers = case.model().config.num_hidden_layers
    assert len(masks) >= 3 * layers
    # on CPU every mask is bits, the last byte padded
    assert all(m.mask.dtype == torch.uint8 and m.mask.numel() == -(-m.shape.numel() // 8) for m in masks)
    assert len(recomputed) >= 3 * layers
    new = {ptr: size for ptr, size in lean.items() if ptr not in plain}
    assert sum(new.values()) == sum(m.mask.untyped_storage().nbytes() for m in masks)
    # what is left: the products' outputs (q, k, v, the context), layer norm inputs, softmax outputs and their stats
    assert sum(lean.values()) < 0.8 * sum(plain.values())  # BERT-base at 8 x 128, pool: 0.67 (benchmarks.md)


def test_llama_products_and_silu_are_rebuilt():
    model, case = build("llama", "full")
    _, _, kinds = saved(model, case.batch())
    layers = case.model().config.num_hidden_layers
    # per layer: act(gate) (SiLU) and act(gate) * up, saved by the down projection and the product
    assert sum(isinstance(k, activations._Recomputed) for k in kinds) >= 2 * layers


def _intermediates(kinds, width: int) -> tuple[int, int]:
    """`(activations of the MLP's hidden width saved, of them kept as they are)`, parameters left out."""

    def shape(kind):
        return kind.tensor.shape if isinstance(kind, activations._Kept) else kind.shape

    def parameter(kind):
        return isinstance(kind, activations._Kept) and isinstance(kind.tensor, torch.nn.Parameter)

    hidden = [k for k in kinds if shape(k)[-1:] == (width,) and not isinstance(k, activations._TwoValued)]
    hidden = [k for k in hidden if not parameter(k)]
    kept = [k for k in hidden if isinstance(k, activations._Kept)]
    return len(hidden), len(kept)


def _forward_kinds(model, batch) -> list:
    """What each tensor a training forward saves is kept as (`activations._pack` applied by hand in forward only,
    as `enable_lean_activations` applies it)."""
    kinds = []

    def pack(tensor):
        kinds.append(activations._pack(tensor))
        return kinds[-1]

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, activations._unpack):
        loss = model(**batch).loss
    loss.backward()
    return kinds


def test_gpt2_gelu_new_keeps_its_input_only():
    model, case = build("gpt2", "full")
    config = model.config
    assert config.activation_function == "gelu_new"
    batch = case.batch()
    width = 4 * config.n_embd
    # gelu_new is a formula: autograd keeps its input, the tanh, the input halved and one plus the tanh; its output
    # (saved by c_proj) is rebuilt as the product of the last two
    assert _intermediates(_forward_kinds(model, batch), width) == (5 * config.n_layer, 4 * config.n_layer)
    enable_lean_activations(model)
    for handle in model._lean_activation_hooks[-2:]:  # `_forward_kinds` applies the hooks itself
        handle.remove()
    # per layer: the input kept by the formula's node, and its output rebuilt from it
    assert _intermediates(_forward_kinds(model, batch), width) == (2 * config.n_layer, config.n_layer)


class _MLP(torch.nn.Module):
    def __init__(self, act: torch.nn.Module):
        super().__init__()
        self.up, self.act, self.down = torch.nn.Linear(8, 32), act, torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("name", activations.FORMULA_ACTIVATIONS)
def test_formula_activations_give_the_same_gradients_bit_for_bit_and_are_restored(name):
    transformers_activations = pytest.importorskip("transformers.activations")
    if not hasattr(transformers_activations, name):
        pytest.skip(f"this transformers has no {name}")
    act_type = getattr(transformers_activations, name)
    torch.manual_seed(0)
    model = _MLP(act_type())
    x = torch.randn(4, 16, 8)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = step()
    enable_lean_activations(model)
    assert model.act.forward.__func__ is activations._lean_formula_forward
    calls = []
    formula = act_type.forward

    def counted(self, input):
        calls.append(torch.is_grad_enabled())
        return formula(self, input)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(act_type, "forward", counted)
        lean_out, lean_grads = step()
    assert torch.equal(out, lean_out) and all(map(torch.equal, grads, lean_grads))
    # once in forward (no graph), once in backward: rebuilding the output for `down` replays it for the node too
    assert calls == [False, True]
    with torch.no_grad():  # no node without gradients: the plain formula
        assert torch.equal(model(x), out)
    node = model.act(model.up(x)).grad_fn
    assert type(node).__name__ == activations._FORMULA_NODE and len(node.saved_tensors) == 1
    disable_lean_activations(model)
    assert "forward" not in vars(model.act) and model.act.forward.__func__ is act_type.forward
    enable_lean_activations(model, recipes=("norms", "masks"))  # without "activations": the formula as it is
    assert "forward" not in vars(model.act)


def test_a_saved_tensor_changed_in_place_fails_as_without_lean_activations():
    # autograd checks no version under saved-tensor hooks: lean_activations checks what it keeps as it is
    x = torch.randn(64, 128, requires_grad=True)
    weight = torch.randn(32, 128, requires_grad=True)
    for context in (contextlib.nullcontext(), lean_activations()):
        with context:
            hidden = x * 2.0
            out = hidden @ weight.t()
        with torch.no_grad():
            hidden.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_an_activation_changed_in_place_after_it_was_saved_is_rebuilt_as_it_was():
    # a GELU output saved as a recipe is rebuilt as the forward used it: the gradient of the forward that ran
    x = torch.randn(64, 128, requires_grad=True)
    weight = torch.randn(32, 128, requires_grad=True)
    (torch.nn.functional.gelu(x) @ weight.t()).sum().backward()
    expected = weight.grad.clone()
    weight.grad = None
    with lean_activations():
        hidden = torch.nn.functional.gelu(x)
        out = hidden @ weight.t()
    with torch.no_grad():
        hidden.mul_(2.0)
    out.sum().backward()
    assert torch.equal(weight.grad, expected)


@pytest.mark.parametrize("numpy_on_cpu", [True, False], ids=["numpy", "torch_ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_two_valued_tensors_round_trip_bit_for_bit(monkeypatch, dtype, numpy_on_cpu):
    monkeypatch.setattr(activations, "NUMPY_ON_CPU", numpy_on_cpu)
    mask = torch.rand(80, 64) < 0.9
    noise = torch.zeros(80, 64, dtype=dtype).masked_fill_(mask, 1 / 0.9)
    packed = activations._two_valued(noise)
    assert packed is not None and packed.mask.dtype == torch.uint8 and packed.mask.numel() == 80 * 64 // 8
    assert torch.equal(
        packed.unpack().view(torch.int16 if dtype != torch.float32 else torch.int32),
        noise.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )
    signed = noise.clone()
    signed[3, 5] = -0.0  # three bit patterns: kept as it is
    assert activations._two_valued(signed) is None
    assert activations._two_valued(torch.randn(80, 64).to(dtype)) is None
    assert activations._two_valued(torch.zeros(80, 64, dtype=dtype)) is None
    # zeros and an infinity would come back with NaN where the zeros were (0 * inf): kept as they are
    assert activations._two_valued(torch.zeros(80, 64, dtype=dtype).masked_fill_(mask, float("inf"))) is None
    # values the first entries do not show: a third value, a negative one, -0.0, each after the first 16 entries
    for odd in (2 / 0.9, -1 / 0.9, -0.0):
        late = noise.clone()
        late[40, 7] = odd
        assert activations._two_valued(late) is None, odd
    # first entries all zero: the other value is found in the rest
    zero_head = noise.clone()
    zero_head[0, :16] = 0.0
    packed = activations._two_valued(zero_head)
    assert packed is not None and torch.equal(packed.unpack(), zero_head)
    zero_head[50, 3] = 2 / 0.9
    assert activations._two_valued(zero_head) is None


def test_enable_lean_activations_applies_to_training_forwards_only_and_always_leaves():
    model, case = build("bert", "pool")
    enable_lean_activations(model)
    enable_lean_activations(model)  # once only
    hooks = model._lean_activation_hooks
    assert len(hooks) == len({id(h) for h in hooks})
    active = []

    def probe(module, args, output):
        active.append(torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)

    handle = model.get_submodule("base_model.model.bert.encoder").register_forward_hook(probe)
    model.eval()
    model(**case.batch())
    model.train()
    with torch.no_grad():
        model(**case.batch())
    model(**case.batch())
    assert active == [True, False, True]  # eval with gradients: how a candidate pool is scored

    def fail(module, args, output):
        raise ValueError("a failing forward")

    failing = model.get_submodule("base_model.model.bert.encoder").register_forward_hook(fail)
    with pytest.raises(ValueError, match="a failing forward"):
        model(**case.batch())
    failing.remove()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    disable_lean_activations(model)
    model(**case.batch())
    handle.remove()
    assert active[-1] is False


def test_a_subset_of_recipes_keeps_the_others_as_they_are_and_changes_no_gradient():
    model, case = build("bert", "pool")
    batch = case.batch()
    loss, grads, _ = train_step(model, batch)
    kinds = []
    chosen = frozenset(("norms", "products"))

    def pack(tensor):
        kinds.append((tensor.grad_fn, activations._pack(tensor, chosen)))
        return kinds[-1][1]

    enable_lean_activations(model, recipes=("norms", "products"))  # tags the norms; `pack` is applied by hand here
    for handle in model._lean_activation_hooks[-2:]:
        handle.remove()
    model.zero_grad(set_to_none=True)  # `grads` holds the step's gradient tensors: leave them as they are
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, activations._unpack):
        model.train()(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    assert not any(isinstance(k, activations._TwoValued) for _, k in kinds)  # masks kept as they are
    rebuilt = {type(node).__name__ for node, k in kinds if isinstance(k, activations._Recomputed)}
    assert "NativeLayerNormBackward0" in rebuilt and "MulBackward0" in rebuilt  # norms and products rebuilt
    gelu_outputs = [k for node, k in kinds if type(node).__name__ == "GeluBackward0"]
    assert gelu_outputs and all(isinstance(k, activations._Kept) for k in gelu_outputs)  # activations kept
    disable_lean_activations(model)
    enable_lean_activations(model, recipes=("norms", "products"))
    lean_loss, lean_grads, _ = train_step(model, batch)
    assert torch.equal(loss, lean_loss)
    for name, grad in grads.items():
        assert (grad is None and lean_grads[name] is None) or torch.equal(grad, lean_grads[name]), name
    with pytest.raises(ValueError, match="disable_lean_activations"):
        enable_lean_activations(model)  # all recipes, while the subset is on
    for bad in ("norms", ("norm",)):
        with pytest.raises(ValueError, match="recipes"):
            lean_activations(bad)


@pytest.mark.parametrize("numpy_on_cpu", [True, False], ids=["numpy", "torch_shifts"])
def test_bits_pack_eight_entries_to_a_byte_and_unpack_to_the_same_mask(monkeypatch, numpy_on_cpu):
    """numpy's packbits on CPU and the torch shifts used off the CPU write the same bytes."""
    monkeypatch.setattr(activations, "NUMPY_ON_CPU", numpy_on_cpu)
    mask = torch.rand(3, 40, 24) < 0.3
    packed = activations.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (3 * 40 * 24 // 8,)
    # entry 8 i + k is bit k of byte i
    flat = mask.reshape(-1).view(-1, 8).to(torch.uint8)
    assert torch.equal(packed, (flat * (2 ** torch.arange(8, dtype=torch.uint8))).sum(1, dtype=torch.uint8))
    assert torch.equal(activations.unpack_bits(packed, mask.shape), mask)
    for extreme in (torch.zeros_like(mask), torch.ones_like(mask)):
        assert torch.equal(activations.unpack_bits(activations.pack_bits(extreme), mask.shape), extreme)


def test_a_mask_whose_entries_do_not_fill_whole_bytes_is_packed_on_cpu_and_kept_as_bools_by_the_shifts(monkeypatch):
    mask = torch.rand(7, 9) < 0.9  # 63 entries
    noise = torch.zeros(7, 9).masked_fill_(mask, 1 / 0.9)
    packed = activations._two_valued(noise)
    assert packed.mask.dtype == torch.uint8 and packed.mask.numel() == 8  # the last byte padded
    assert torch.equal(packed.mask[-1] >> 7, torch.tensor(0, dtype=torch.uint8))
    assert torch.equal(packed.unpack(), noise)
    monkeypatch.setattr(activations, "NUMPY_ON_CPU", False)  # the rule off the CPU
    packed = activations._two_valued(noise)
    assert packed.mask.dtype == torch.bool
    assert torch.equal(packed.unpack(), noise)
    assert not activations.packs_bits(torch.empty(63, dtype=torch.bool, device="meta"))
    assert activations.packs_bits(torch.empty(64, dtype=torch.bool, device="meta")) == activations._PACKS_BITS


def test_attention_dropouts_mask_is_rebuilt_once_for_its_two_uses(monkeypatch):
    """The product's recipe and the product's own backward both unpack the mask: one rebuild serves both, and the
    gradients stay those without lean activations, bit for bit."""
    scores = torch.randn(2, 4, 16, 16, requires_grad=True)
    values = torch.randn(2, 4, 16, 8, requires_grad=True)

    def loss_and_grads():
        torch.manual_seed(0)
        probs = torch.nn.functional.dropout(scores.softmax(-1), p=0.1, training=True)
        loss = (probs @ values).square().sum()
        return loss, torch.autograd.grad(loss, (scores, values))

    expected = loss_and_grads()
    rebuilds = []
    unpack_bits = activations.unpack_bits
    monkeypatch.setattr(activations, "unpack_bits", lambda *args: rebuilds.append(1) or unpack_bits(*args))
    with lean_activations():
        lean = loss_and_grads()
    assert len(rebuilds) == 1  # one mask, unpacked by two nodes
    assert torch.equal(lean[0], expected[0])
    for grad, lean_grad in zip(expected[1], lean[1], strict=True):
        assert torch.equal(grad, lean_grad)


def test_a_mask_rebuild_changed_in_place_is_not_handed_on():
    noise = torch.zeros(16, 16).masked_fill_(torch.rand(16, 16) < 0.9, 1 / 0.9)
    packed = activations._two_valued(noise)
    first = packed.unpack()
    first.mul_(2.0)  # whoever had it first changed it
    assert torch.equal(packed.unpack(), noise)


@pytest.mark.parametrize("method", ["dense", "pool", "full"])
def test_t5_v1_1_gated_gelu_is_kept_lean_with_the_same_gradients(monkeypatch, method):
    """T5 v1.1 (and Flan-T5) gate their feed-forward with `gelu_new`: its formula keeps its input only there too."""
    import conftest
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = conftest.MODEL_CASES["t5"]

    def gated_t5():
        settings = t5.build().config.to_dict()
        for derived in ("is_gated_act", "dense_act_fn"):  # set from `feed_forward_proj` by the config
            settings.pop(derived)
        return T5ForConditionalGeneration(T5Config(**{**settings, "feed_forward_proj": "gated-gelu"}))

    case = dataclasses.replace(t5, name="t5_gated", build=gated_t5)
    monkeypatch.setitem(conftest.MODEL_CASES, "t5_gated", case)
    monkeypatch.setitem(CASES, "t5_gated", case)
    model, case = build("t5_gated", method)
    gated = [m for m in model.modules() if type(m).__name__ == "T5DenseGatedActDense"]
    assert gated and all(type(m.act).__name__ == "NewGELUActivation" for m in gated)
    batch = case.batch()
    loss, grads, _ = train_step(model, batch)
    enable_lean_activations(model)
    assert all(m.act.forward.__func__ is activations._lean_formula_forward for m in gated)
    lean_loss, lean_grads, _ = train_step(model, batch)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys() and any(g is not None for g in grads.values())
    for name, grad in grads.items():
        assert (grad is None and lean_grads[name] is None) or torch.equal(grad, lean_grads[name]), name
