"""Lean saved activations: keep what backward needs in fewer bytes, bit for bit, without checkpointing.

Much of what autograd saves in a transformer layer is redundant: an activation function's output is saved (by the
next linear layer) beside its input (saved by the activation's own backward); a layer norm's output beside its
input, mean and inverse deviation; CPU dropout saves its mask as a float tensor of zeros and `1 / (1 - p)`, and the
attention probabilities after dropout beside the probabilities and that mask. [`lean_activations`] is a
`torch.autograd.graph.saved_tensors_hooks` context that stores each such tensor as a recipe instead:

- the output of GELU or SiLU: recomputed from the input its backward keeps;
- an activation written as a formula of several element-wise ops (transformers' `gelu_new` of GPT-2, `gelu_fast`,
  `quick_gelu`; see `FORMULA_ACTIVATIONS`), for which autograd keeps four intermediates of the input's size: run as
  one node that keeps its input only and replays the same formula in backward ([`enable_lean_activations`] only);
- the output of `torch.nn.LayerNorm` (wrapped or not): recomputed from the input, weight and bias its backward keeps;
- a product `a * b` whose node keeps both factors (Llama's `act(gate) * up`), or one factor and the softmax whose
  output is the other (attention dropout): recomputed from them;
- a tensor holding two values only, zero and one other (dropout's mask): a mask of bits and that value.

Each recipe reruns the same kernel on the same inputs, so backward sees the same bits and the gradients are
unchanged; nothing is recomputed that costs a matrix product, no random number is drawn again. Unlike activation
checkpointing it needs no recomputed forward and no dispatch mode. Inside a checkpointed region checkpointing's own
hooks take over. [`enable_lean_activations`] turns it on for every training forward of a model.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import torch
from torch import nn


#: Tensors smaller than this (in entries) are saved as they are: a recipe would save little and cost a call.
MIN_ENTRIES = 1 << 12
#: What can be kept as a recipe: activation outputs (GELU, SiLU), layer norm outputs, products of kept factors, and
#: dropout masks (two-valued tensors). Measured cost on MiniLM at 32 x 128 (docs/benchmarks.md): masks are most of it.
RECIPES = ("activations", "norms", "products", "masks")

#: transformers' activation modules (by class name) whose forward is a formula of element-wise ops, each saving an
#: intermediate of the input's size (GPT-2's `gelu_new`: the input, the tanh, the input halved and one plus the
#: tanh). Under [`enable_lean_activations`] they keep their input only.
FORMULA_ACTIVATIONS = ("NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "AccurateGELUActivation")

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
#: Nodes whose saved output (`_saved_result`) is the tensor itself, as a factor of a product is found.
_RESULT_NODES = ("SoftmaxBackward0", "SafeSoftmaxBackward0", "SigmoidBackward0", "TanhBackward0", "ExpBackward0")
_EPS = "_diffprune_layer_norm_eps"


class _Recomputed:
    """A saved tensor kept as `compute()` over what autograd keeps anyway; checked against the saved shape."""

    __slots__ = ("compute", "shape", "dtype")

    def __init__(self, compute, tensor: torch.Tensor):
        self.compute, self.shape, self.dtype = compute, tensor.shape, tensor.dtype

    def unpack(self) -> torch.Tensor:
        out = self.compute()
        if out.shape != self.shape or out.dtype != self.dtype:
            raise RuntimeError(
                f"lean_activations recomputed a saved tensor as {tuple(out.shape)} {out.dtype} instead of "
                f"{tuple(self.shape)} {self.dtype}: a bug; train without lean activations and report it."
            )
        return out


class _Kept:
    """A saved tensor kept as it is, with its version: autograd checks none under saved-tensor hooks, so a tensor
    changed in place after it was saved is caught here, as autograd would without hooks."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor, tensor._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a {tuple(self.tensor.shape)} tensor saved at version {self.version} is now at version "
                f"{self.tensor._version}. Clone it before changing it in place."
            )
        return self.tensor


#: Whether bools can be packed 8 to an int64 (byte k of a word holds entry k) off the CPU: on little-endian machines.
_PACKS_BITS = sys.byteorder == "little"


#: Whether dropout masks on CPU are compared, counted and packed with numpy, 2-6x faster than torch's ops there
#: (docs/benchmarks.md). Read on each call, so that a benchmark may compare the two between steps.
NUMPY_ON_CPU = True


def _with_numpy(tensor: torch.Tensor) -> bool:
    return NUMPY_ON_CPU and tensor.device.type == "cpu"


def packs_bits(mask: torch.Tensor) -> bool:
    """Whether [`pack_bits`] takes `mask`: any bool tensor on CPU; elsewhere one of whole bytes (a multiple of 8
    entries) on a little-endian machine."""
    return _with_numpy(mask) or (_PACKS_BITS and mask.numel() % 8 == 0)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, 8 entries to a uint8: entry `8 i + k` in bit `k` of byte `i`, the last byte padded with
    zeros. On CPU numpy's `packbits` does it in one pass, 6x faster than torch's ops there (0.3 against 1.7 ms for a
    MiniLM attention mask, docs/benchmarks.md); elsewhere [`_pack_bits_by_shifts`]."""
    if _with_numpy(mask):
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    return _pack_bits_by_shifts(mask)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor of `shape` that [`pack_bits`] packed."""
    if _with_numpy(packed):
        bits = np.unpackbits(packed.numpy(), count=shape.numel(), bitorder="little")
        return torch.from_numpy(bits).view(torch.bool).view(shape)
    return _unpack_bits_by_shifts(packed, shape)


def scaled_mask(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`mask * value` for a bool `mask` and a 0-d `value`: +0.0 and `value` bit for bit, in `value`'s dtype, made
    from the mask's bytes (0 or 1), as a uint8 conversion is 4x faster than a bool one on CPU."""
    return mask.view(torch.uint8).to(value.dtype).mul_(value)


def _pack_bits_by_shifts(mask: torch.Tensor) -> torch.Tensor:
    """[`pack_bits`] with torch ops, for whole bytes on a little-endian machine: each group of 8 bools read as one
    int64 (byte `k` in bits `8 k` to `8 k + 7`, 0 or 1), its 8 low bits gathered into the lowest byte by three
    shifts, in passes over whole int64 words."""
    words = mask.reshape(-1).view(torch.int64)
    words = words | (words >> 7)  # bit 1 of byte k - 1 holds entry k: pairs in bits 0-1 of even bytes
    words |= words >> 14  # entries 0-3 in bits 0-3, 4-7 in bits 32-35
    words |= words >> 28
    return words.to(torch.uint8)  # the low byte, entries 0-7 in bits 0-7 (the other bytes are discarded)


def _unpack_bits_by_shifts(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[`_pack_bits_by_shifts`] reversed, masking after each shift."""
    words = packed.to(torch.int64)
    words = (words | (words << 28)) & 0x0000000F0000000F
    words = (words | (words << 14)) & 0x0003000300030003
    words = (words | (words << 7)) & 0x0101010101010101
    return words.view(torch.bool).view(shape)


class _TwoValued:
    """A saved tensor of +0.0 and one other, finite and positive, value `c`, as a mask and `c`: rebuilt as
    `mask * c` in two passes (a conversion of the mask's bytes and an in-place product), which gives `c` and +0.0
    bit for bit. The mask is kept as bits ([`pack_bits`]: an eighth of a bool mask's bytes) where [`packs_bits`].

    Attention dropout's mask is unpacked twice in one backward, by the recipe of the product it made and then by the
    product's own node: the first rebuild is kept for the second, and dropped by it. A mask unpacked once keeps its
    rebuild until its node frees what it saved: right after that node's backward, or with
    `retain_graph=True` when the graph is freed."""

    __slots__ = ("mask", "value", "shape", "rebuilt")

    def __init__(self, mask: torch.Tensor, value: torch.Tensor):
        self.value, self.shape, self.rebuilt = value, mask.shape, None
        self.mask = pack_bits(mask) if packs_bits(mask) else mask

    def unpack(self) -> torch.Tensor:
        if self.rebuilt is not None:
            rebuilt, version = self.rebuilt
            self.rebuilt = None
            if rebuilt._version == version:  # not changed in place by whoever had it first
                return rebuilt
        mask = self.mask if self.mask.dtype == torch.bool else unpack_bits(self.mask, self.shape)
        rebuilt = scaled_mask(mask, self.value)
        self.rebuilt = (rebuilt, rebuilt._version)
        return rebuilt


class _Formula(torch.autograd.Function):
    """`formula(input)` as one node that saves `input` only. Backward replays the formula on a detached copy and
    differentiates it with autograd: the same ops in the same order as the graph the formula builds alone, so the
    gradient is bit for bit the same; what it costs is the formula's element-wise ops once more in backward. The
    output's recipe (the next layer unpacks it first) replays it with gradients and leaves that graph to this
    node's backward, so the formula runs once in backward, not twice."""

    @staticmethod
    def forward(ctx, formula, input):
        ctx.formula, ctx.replayed = formula, None
        ctx.save_for_backward(input)
        return formula(input)

    @staticmethod
    def backward(ctx, grad):
        leaf, output = ctx.replayed or _replay(ctx)
        ctx.replayed = None
        (grad_input,) = torch.autograd.grad(output, leaf, grad)
        return None, grad_input


def _replay(node) -> tuple[torch.Tensor, torch.Tensor]:
    """`(a detached copy of the saved input that requires grad, the formula of it)`."""
    (input,) = node.saved_tensors
    with torch.enable_grad():
        leaf = input.detach().requires_grad_()
        return leaf, node.formula(leaf)


_FORMULA_NODE = _Formula.__name__ + "Backward"
#: `dropout._ThreadedDropout`'s node (named here: that module imports this one).
_DROPOUT_NODE = "_ThreadedDropoutBackward"


def _lean_formula_forward(self, input):
    """The forward of a `FORMULA_ACTIVATIONS` module under [`enable_lean_activations`]."""
    formula = type(self).forward.__get__(self)
    if torch.is_grad_enabled() and input.requires_grad and input.numel() >= MIN_ENTRIES:
        return _Formula.apply(formula, input)
    return formula(input)


def _formula_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if type(module).__name__ in FORMULA_ACTIVATIONS]


def _recompute_formula(node) -> torch.Tensor:
    node.replayed = _replay(node)
    return node.replayed[1].detach()


def _two_valued(tensor: torch.Tensor) -> _TwoValued | None:
    """The mask form of `tensor` if every entry is +0.0 or one other finite positive value (compared as bits),
    else None.

    Two passes over the tensor and one over the mask: the other value `c` is read from the first entries, the mask is
    `bits == c`, and the tensor holds nothing else if it has as many non-zero bit patterns as the mask has entries
    (every entry equal to `c` is one; -0.0 and any other value would be one more). On CPU the passes are numpy's,
    2-3x faster than torch's there."""
    ints = tensor.detach().view(_INT_VIEW[tensor.dtype])
    head = ints.reshape(-1)[:16]
    if head.unique().numel() > 2:  # a weight or an activation: decided before a pass over the whole tensor
        return None
    bits = head.max()
    if bits <= 0:  # the first entries are all zeros (or negative: refused below)
        bits = ints.max()
    # a set sign bit (-0.0, a negative value) is refused, so +0.0 is the only zero
    if bits <= 0:
        return None
    value = bits.view(tensor.dtype)
    if not bool(value.isfinite()):  # 0 * inf is NaN, not +0.0
        return None
    if _with_numpy(tensor):
        flat = ints.reshape(-1).numpy()
        mask = flat == flat.dtype.type(bits.item())
        if np.count_nonzero(flat) != np.count_nonzero(mask):
            return None
        return _TwoValued(torch.from_numpy(mask).view(tensor.shape), value)
    mask = ints == bits
    if int(torch.count_nonzero(ints)) != int(torch.count_nonzero(mask)):
        return None
    return _TwoValued(mask, value)


def _factor(node, index: int, saved: str):
    """A function giving factor `index` of a product node: its own saved copy, or the saved output of the node
    that made it; None if neither is kept."""
    producer = node.next_functions[1 - index][0]
    if producer is not None:  # the other factor requires grad: this node keeps this one
        return lambda: getattr(node, saved)
    producer, output_nr = node.next_functions[index]
    if producer is not None and output_nr == 0 and type(producer).__name__ in _RESULT_NODES:
        return lambda: producer._saved_result
    return None


def _recipe(tensor: torch.Tensor, recipes: frozenset):
    node = tensor.grad_fn
    name = type(node).__name__
    if name in ("GeluBackward0", "SiluBackward0", _FORMULA_NODE) and "activations" not in recipes:
        return None
    if name == "GeluBackward0":
        return lambda: torch.nn.functional.gelu(node._saved_self, approximate=node._saved_approximate)
    if name == "SiluBackward0":
        return lambda: torch.nn.functional.silu(node._saved_self)
    if name == _FORMULA_NODE:
        return lambda: _recompute_formula(node)
    if name == _DROPOUT_NODE and "products" in recipes:
        # threaded dropout's output (attention weights saved by the product with the values): softmax output * noise
        producer, output_nr = node.next_functions[0]
        if producer is None or output_nr != 0 or type(producer).__name__ not in _RESULT_NODES:
            return None
        from .dropout import _noise

        return lambda: producer._saved_result * _noise(node)
    if name == "NativeLayerNormBackward0" and "norms" in recipes:
        eps = getattr(tensor, _EPS, None)
        if eps is None:
            return None
        return lambda: torch.native_layer_norm(
            node._saved_input, node._saved_normalized_shape, node._saved_weight, node._saved_bias, eps
        )[0]
    if name == "MulBackward0" and "products" in recipes:
        left, right = _factor(node, 0, "_saved_self"), _factor(node, 1, "_saved_other")
        if left is None or right is None:
            return None
        return lambda: left() * right()
    return None


def _viewed(recipe, size, stride, offset: int):
    return lambda: recipe().as_strided(size, stride, offset)


def _pack(tensor: torch.Tensor, recipes: frozenset = frozenset(RECIPES)):
    if tensor.numel() < MIN_ENTRIES or tensor.layout != torch.strided or isinstance(tensor, nn.Parameter):
        return _Kept(tensor)
    if tensor.grad_fn is not None:
        # a view (a linear layer saves its input as tokens x features) is recomputed as its base, then viewed
        base = tensor if tensor._base is None else tensor._base
        if base._version != 0 or not base.is_contiguous():  # changed in place: a recipe would give the old value
            return _Kept(tensor)
        recipe = _recipe(base, recipes)
        if recipe is None:
            return _Kept(tensor)
        if base is not tensor:
            size, stride, offset = tensor.size(), tensor.stride(), tensor.storage_offset() - base.storage_offset()
            recipe = _viewed(recipe, size, stride, offset)
        return _Recomputed(recipe, tensor)
    if "masks" in recipes and tensor.dtype in _INT_VIEW and not tensor.requires_grad:
        return _two_valued(tensor) or _Kept(tensor)
    return _Kept(tensor)


def _unpack(packed):
    return packed.unpack()


def _recipe_set(recipes) -> frozenset:
    chosen = frozenset(RECIPES if recipes is None else recipes)
    unknown = chosen - set(RECIPES)
    if unknown or isinstance(recipes, str):
        raise ValueError(
            f"lean activation recipes must be a collection of {RECIPES} (or None for all), got {recipes!r}: e.g. "
            "recipes=('norms', 'products') keeps dropout masks and activation outputs as they are."
        )
    return chosen


def lean_activations(recipes=None) -> torch.autograd.graph.saved_tensors_hooks:
    """A context in which autograd saves GELU/SiLU and layer norm outputs, products of kept factors and dropout
    masks as recipes over what it keeps anyway (see the module docstring); the gradients are bit for bit those
    without it. `recipes` (a subset of `RECIPES`, default all) chooses which: each saves memory for some time.

        with lean_activations():
            loss = model(**batch).loss
        loss.backward()

    Layer norm outputs are kept lean only for modules [`enable_lean_activations`] has tagged (their `eps` is not in
    autograd's graph); use that for a whole model.
    """
    chosen = _recipe_set(recipes)
    return torch.autograd.graph.saved_tensors_hooks(lambda tensor: _pack(tensor, chosen), _unpack)


def _layer_norm_eps(module: nn.Module) -> float | None:
    base = getattr(module, "base_layer", module)
    return base.eps if isinstance(base, nn.LayerNorm) else None


def enable_lean_activations(model: nn.Module, recipes=None) -> None:
    """Every forward of `model` with gradients (training, and choosing or regrowing a candidate pool) runs in
    [`lean_activations`] with `recipes` (default all of `RECIPES`), and the outputs of its layer norms
    (`nn.LayerNorm`, diff-pruned or not) are recomputed in backward. With the `"activations"` recipe, its
    `FORMULA_ACTIVATIONS` modules (GPT-2's `gelu_new`) keep their input only. Call it once, before [`select_pool`]
    and training; it changes no number; `disable_lean_activations` undoes it (call that first to change
    `recipes`)."""
    chosen = _recipe_set(recipes)
    if getattr(model, "_lean_activation_hooks", None):
        if chosen != getattr(model, "_lean_activation_recipes", chosen):
            raise ValueError(
                "Lean activations are already on for this model with other recipes: call "
                "disable_lean_activations(model) first."
            )
        return
    # a diff-pruned norm may run its base's math itself: both the wrapper and its base tag what they return
    handles = [
        module.register_forward_hook(_tag_eps(eps))
        for module in model.modules()
        if (eps := _layer_norm_eps(module)) is not None
    ]
    if "activations" in chosen:
        for module in _formula_modules(model):
            module.forward = types.MethodType(_lean_formula_forward, module)
    contexts = []

    def enter(module, args):
        if torch.is_grad_enabled():  # training, and scoring a candidate pool (an eval forward with gradients)
            context = lean_activations(chosen)
            context.__enter__()
            contexts.append(context)
        else:
            contexts.append(None)

    def leave(module, args, output):
        context = contexts.pop()
        if context is not None:
            context.__exit__(None, None, None)

    handles.append(model.register_forward_pre_hook(enter))
    handles.append(model.register_forward_hook(leave, always_call=True))
    model._lean_activation_hooks = handles
    model._lean_activation_recipes = chosen


def disable_lean_activations(model: nn.Module) -> None:
    """Undo [`enable_lean_activations`]."""
    for handle in getattr(model, "_lean_activation_hooks", ()):
        handle.remove()
    model._lean_activation_hooks = []
    for module in _formula_modules(model):
        # a forward set on the instance after ours (a hook library's) is left as it is, with ours inside it
        if getattr(module.__dict__.get("forward"), "__func__", None) is _lean_formula_forward:
            del module.forward


def _tag_eps(eps: float):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and type(output.grad_fn).__name__ == "NativeLayerNormBackward0":
            setattr(output, _EPS, eps)

    return hook
