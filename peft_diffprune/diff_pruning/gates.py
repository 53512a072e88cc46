"""Hard-concrete gates and the expected-L0 penalty of diff pruning, as pure tensor functions.

Notation follows Guo, Rush and Kim (2021) and Louizos, Welling and Kingma (2018): per diff entry a gate logit
`alpha`, a stretch interval `(l, r)` with `l < 0 < 1 < r`, and a gate `z` in [0, 1] with an atom at exactly 0 (the
entry is pruned) and at exactly 1.

The training-time gate is an autograd function that keeps only the sampled gate `z` for the backward pass: the
derivative of the stretched sigmoid can be recovered from `z` itself where `0 < z < 1` and is zero elsewhere, so no
uniform noise, logits or sigmoid outputs are held between forward and backward. With [`set_redraw_gates`]`(True)`
(or `PEFT_DIFFPRUNE_REDRAW_GATES=1`) it keeps no gate either, only the random generator's state the gate was drawn
from and which code drew it (fused or eager), and backward draws the same gate again (see [`redrawn_gate`]): 4 bytes
per fp32 entry less from forward to backward, for one more pass of the random generator and of the gate per step.
Measured on a quiet machine (docs/benchmarks.md) that pass costs more than the bytes are worth on CPU (BERT-base
8 x 128: 1.55x full fine-tuning's step time against 1.32x, for 1.58x its peak memory against 1.63x), so gates are
kept by default.

Half-precision diffs and logits (bf16 or fp16, PEFT's `autocast_adapter_dtype=False`) are computed in fp32: the
gate is sampled and the expected L0 summed in fp32, gradients are formed in fp32 and rounded once to the
parameters' dtype. The gate is rounded to the diff's dtype before it is used, in forward and backward alike.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import fused


#: Clamp for the uniform noise, as in the authors' code: keeps log(u) and log(1 - u) finite.
NOISE_EPS = 1e-4

#: Entries per block when the expected L0 is summed: bounds the fp32 copy of half-precision logits.
L0_BLOCK = 1 << 24


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in fp32 if it is in half precision (bf16, fp16), else itself: the precision the gate math needs."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def l0_shift(stretch: tuple[float, float]) -> float:
    """`log(-l / r)`: the shift inside the sigmoid of the expected-L0 formula (0 for the symmetric stretch)."""
    left, right = stretch
    return math.log(-left / right)


def deterministic_gate(alpha: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    """Evaluation-time gate `z = min(1, max(0, sigmoid(alpha) * (r - l) + l))` (Louizos et al., eq. 13)."""
    left, right = stretch
    return torch.sigmoid(upcast(alpha)).mul(right - left).add(left).clamp(0.0, 1.0)


def sample_gate_from_noise(alpha: torch.Tensor, noise: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    """Hard-concrete sample for given uniform noise `u`, written with plain differentiable ops.

    `s = sigmoid(log u - log(1 - u) + alpha)`, `z = min(1, max(0, s * (r - l) + l))`. This is the reference
    formula; training uses [`hard_concrete_delta`], which computes the same values with less memory.
    """
    left, right = stretch
    noise = noise.clamp(NOISE_EPS, 1.0 - NOISE_EPS)
    s = torch.sigmoid(torch.log(noise) - torch.log1p(-noise) + alpha)
    return (s * (right - left) + left).clamp(0.0, 1.0)


#: Entries from which CPU noise is drawn by numpy in chunks over threads instead of by `torch.rand_like`.
THREADED_NOISE_MIN = 1 << 16

#: Entries per chunk of CPU noise, each chunk from a generator of its own: fixed, so that the noise for a seed does
#: not depend on the number of threads that draw it.
NOISE_CHUNK = 1 << 20

_noise_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _noise_threads() -> ThreadPoolExecutor:
    """The threads that draw CPU noise, one per torch thread, made again in a forked child or when the number of
    torch threads changes (a forked child inherits the pool but not its threads)."""
    global _noise_pool
    key = (os.getpid(), torch.get_num_threads())
    if _noise_pool is None or _noise_pool[:2] != key:
        if _noise_pool is not None and _noise_pool[0] == key[0]:
            _noise_pool[2].shutdown()  # this process's idle threads, for another count (a child's are not its)
        _noise_pool = (*key, ThreadPoolExecutor(max_workers=key[1], thread_name_prefix="diffprune-noise"))
    return _noise_pool[2]


def _uniform_noise(alpha: torch.Tensor) -> torch.Tensor:
    """Fresh fp32 uniform noise in [0, 1) of the shape of `alpha`, from torch's default generator of its device: the
    one source of the training gates' randomness, fused or not.

    On CPU `torch.rand_like` is one serial Mersenne-twister pass, 3.3-4.5 ns an entry on this project's CPUs, about 14
    sigmoid passes, and a BERT-base gated step draws 86M entries. So a CPU tensor of at least
    [`THREADED_NOISE_MIN`] entries takes one seed from torch's default generator and fills each chunk of
    [`NOISE_CHUNK`] entries from numpy's PCG64 seeded with `(seed, chunk)`, on all of torch's threads (numpy fills
    without the GIL): 2.1-2.2x faster on two threads. A seed still gives the same gates: on every rank of a
    data-parallel job, for any number of threads, and in backward where the gates are drawn again."""
    if alpha.device.type != "cpu" or alpha.numel() < THREADED_NOISE_MIN:
        return torch.rand_like(alpha, dtype=torch.float32)
    noise = torch.empty(alpha.shape, dtype=torch.float32)
    flat = noise.view(-1).numpy()
    draw_in_chunks(flat.size, lambda generator, start, stop: generator.random(dtype=np.float32, out=flat[start:stop]))
    return noise


def draw_in_chunks(size: int, fill) -> None:
    """`fill(generator, start, stop)` for each chunk of `NOISE_CHUNK` entries of `range(size)`, on all of torch's
    threads, each chunk's `generator` numpy's PCG64 seeded with `(seed, chunk)` from one seed drawn from torch's
    default CPU generator: the same draws for a seed whatever the number of threads (CPU noise, dropout masks)."""
    seed = int(torch.randint(1 << 62, (1,)))

    def run(chunk: int) -> None:
        generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, chunk))))
        fill(generator, chunk * NOISE_CHUNK, min((chunk + 1) * NOISE_CHUNK, size))

    chunks = range(-(-size // NOISE_CHUNK))
    if len(chunks) == 1 or torch.get_num_threads() == 1:
        for chunk in chunks:
            run(chunk)
    else:
        list(_noise_threads().map(run, chunks))


def _sample_gate(alpha: torch.Tensor, stretch: tuple[float, float], noise: torch.Tensor | None = None) -> torch.Tensor:
    """A hard-concrete sample for every entry of `alpha` (from fresh noise unless given), computed in place on one
    buffer (`noise` is overwritten)."""
    left, right = stretch
    z = (_uniform_noise(alpha) if noise is None else noise).clamp_(NOISE_EPS, 1.0 - NOISE_EPS)
    # s = sigmoid(logit(u) + alpha) with logit(u) = -log(1 / u - 1): every step in place on the noise buffer
    z.reciprocal_().sub_(1.0).log_().neg_().add_(alpha).sigmoid_()
    return z.mul_(right - left).add_(left).clamp_(0.0, 1.0)


_SCALARS: dict[tuple, torch.Tensor] = {}


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor holding `value` in the dtype and on the device of `like` (made once per value and device)."""
    key = (value, like.dtype, like.device)
    if key not in _SCALARS:
        _SCALARS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return _SCALARS[key]


def _alpha_grad(grad_delta, w, group, z, stretch) -> torch.Tensor:
    """`grad_delta * w * group * dz/dalpha` in fp32 from the sampled gate alone (`grad_delta` is overwritten).

    Inside (0, 1), `z = s (r - l) + l` with `ds/dalpha = s (1 - s)`, so with `s = (z - l) / (r - l)`,
    `dz/dalpha = (r - l) s (1 - s)`; where the sample was clamped to exactly 0 or 1 the gate does not move with
    alpha. Four passes over the tensor: the products, `s`, `sigmoid_backward` (`g s (1 - s)`) and
    `hardtanh_backward` (zero where `z` is 0 or 1), where forming the derivative and multiplying took ten.
    """
    left, right = stretch
    zero = _scalar(0.0, grad_delta)
    grad = torch.addcmul(zero, grad_delta, w, value=right - left, out=grad_delta)  # (r - l) * grad * w
    if group is not None:
        grad.mul_(group)
    s = torch.addcmul(_scalar(-left / (right - left), z), z, _scalar(1.0 / (right - left), z))
    grad = torch.ops.aten.sigmoid_backward.grad_input(grad, s, grad_input=s)
    return torch.ops.aten.hardtanh_backward.grad_input(grad, z, 0.0, 1.0, grad_input=s)


def gate_grads(grad_delta, w, group, z, stretch, needs_w: bool, needs_alpha: bool, needs_group: bool):
    """Gradients of `delta = z * w * group` (z sampled from alpha) with respect to `w`, `alpha` and `group`, given
    the gradient `grad_delta` and the sampled gate `z`. `grad_delta` may be overwritten.

    Computed in fp32 and returned in the dtype of `w` (and `alpha`, which shares it); the group gate's in fp32.
    """
    dtype = w.dtype
    grad_delta, z = upcast(grad_delta), upcast(z)  # no copies in fp32
    grad_w = grad_alpha = grad_group = None
    wants_z = needs_w or (group is not None and needs_group)
    # grad * z first: alpha's gradient is formed in grad_delta's memory
    grad_z = (grad_delta * z if needs_alpha else grad_delta.mul_(z)) if wants_z else None
    if needs_alpha:
        grad_alpha = _alpha_grad(grad_delta, w, group, z, stretch)
    if wants_z:
        if group is not None:
            # d(sum grad * z * w * group) / d group = <grad * z, w>
            grad_group = torch.dot(grad_z.reshape(-1), w.reshape(-1).to(grad_z.dtype)).reshape(group.shape)
            grad_w = grad_z.mul_(group)
        else:
            grad_w = grad_z
    grad_w = None if grad_w is None else grad_w.to(dtype)
    grad_alpha = None if grad_alpha is None else grad_alpha.to(dtype)
    return grad_w, grad_alpha, grad_group


def sampled_delta(w: torch.Tensor, alpha: torch.Tensor, group: torch.Tensor | None, stretch, noise=None):
    """A fresh gate sample `z` for `alpha` (from `noise` if given) and the diff `z * w * group` it gives, without
    autograd.

    The gate is sampled in fp32 and rounded to the dtype of `w`, so that forward and backward use the same `z`.
    """
    with torch.no_grad():
        z = _sample_gate(alpha.detach(), stretch, noise).to(w.dtype)
        delta = z * w
        return z, (delta if group is None else delta.mul_(group))


def _flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-d view of a contiguous tensor (the fused kernels are compiled for one rank)."""
    return None if tensor is None else tensor.reshape(-1)


def _generator_state(device: torch.device) -> torch.Tensor:
    """The state of the default random generator of `device` (the one `torch.rand_like` draws from there)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_generator_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


#: Environment variable read by [`redraw_gates`] when [`set_redraw_gates`] has not been called: "1" or "0".
REDRAW_ENV_VAR = "PEFT_DIFFPRUNE_REDRAW_GATES"
_redraw: bool | None = None


def set_redraw_gates(redraw: bool | None) -> None:
    """Whether backward draws the training gates again instead of keeping them from forward (see the module
    docstring); None reads `PEFT_DIFFPRUNE_REDRAW_GATES` again."""
    global _redraw
    _redraw = redraw


def redraw_gates() -> bool:
    """Whether the gated stage draws its gates again in backward (default False: the gates are kept)."""
    global _redraw
    if _redraw is None:
        value = os.environ.get(REDRAW_ENV_VAR, "0")
        if value not in ("0", "1"):
            raise ValueError(f"{REDRAW_ENV_VAR} must be '0' (keep the gates) or '1' (draw them again), got {value!r}.")
        _redraw = value == "1"
    return _redraw


def gate_forward(w, alpha, group, stretch, base=None, open_sum: bool = False):
    """`(z, draw, out, elements)`: `out = z * w * group` for a fresh gate sample `z` of `alpha` (plus `base`, in its
    dtype, if given) and, if `open_sum`, `elements = sum_i sigmoid(alpha_i - log(-l / r))` in fp32 (else None),
    without autograd. Where [`redraw_gates`], `z` is None and `draw` (the generator's state before the draw and
    whether the fused code drew it) is what [`redrawn_gate`] draws the gate again from; otherwise `draw` is None.
    One fused pass where [`fused.enabled`]; the same values as [`sampled_delta`] and [`penalty_forward`] for the
    same noise."""
    shift = l0_shift(stretch)
    redraw = redraw_gates()
    with torch.no_grad():
        state = _generator_state(alpha.device) if redraw else None
        noise = _uniform_noise(alpha)
        if fused.enabled(alpha) and alpha.is_contiguous() and w.is_contiguous():
            args = (_flat(noise), _flat(alpha), _flat(w), group, _flat(base), NOISE_EPS, *stretch)
            # "sampled" never writes the gate, which backward draws again
            result = fused.run("sampled" if redraw else "sample", *args, shift if open_sum else None)
            if result is not None:
                z, out, elements = (None, *result) if redraw else (result[0].view_as(w), *result[1:])
                return z, (state, True) if redraw else None, out.view_as(w), elements
        z, out = sampled_delta(w, alpha, group, stretch, noise)
        if base is not None:
            out = out.to(base.dtype).add_(base)
        elements = _open_sum(alpha, shift) if open_sum else None
        return (None, (state, False), out, elements) if redraw else (z, None, out, elements)


def redrawn_gate(draw, alpha: torch.Tensor, stretch, dtype: torch.dtype) -> torch.Tensor:
    """The gate [`gate_forward`] drew, in `dtype` (that of `w`), bit for bit: the same noise from the generator state
    in `draw`, turned into a gate by the same code (fused or eager). The generator's own state is left as it was, so
    backward does not move the random stream that later forwards draw from."""
    state, was_fused = draw
    current = _generator_state(alpha.device)
    _set_generator_state(alpha.device, state)
    try:
        noise = _uniform_noise(alpha)
    finally:
        _set_generator_state(alpha.device, current)
    with torch.no_grad():
        if was_fused:
            z = fused.run("gate", _flat(noise), _flat(alpha), NOISE_EPS, *stretch, dtype)
            if z is not None:
                return z.view_as(alpha)
        return _sample_gate(alpha.detach(), stretch, noise).to(dtype)


def adapted_weight(base, z, w, group):
    """`base + z * w * group` in the dtype of `base`, without autograd (the adapted weight rebuilt in backward)."""
    if fused.enabled(w) and w.is_contiguous() and base.is_contiguous():
        out = fused.run("adapted", _flat(base), _flat(z), _flat(w), group)
        if out is not None:
            return out.view_as(base)
    delta = z * w
    if group is not None:
        delta.mul_(group)
    return delta.to(base.dtype).add_(base)


def gate_backward(grad_delta, w, group, z, stretch, needs, alpha, penalty_scale=None):
    """[`gate_grads`] (`needs`: whether `w`, `alpha` and `group` need theirs), with the element penalty's gradient
    `penalty_scale * s'(alpha - log(-l / r))` added to `alpha`'s unless `penalty_scale` is None (see
    [`penalty_scale`]): one fused pass where [`fused.enabled`] and all three gradients but the group's are needed.
    `grad_delta` may be overwritten."""
    shift = l0_shift(stretch)
    if fused.enabled(w) and needs[0] and needs[1] and w.is_contiguous() and grad_delta.is_contiguous():
        left, right = stretch
        args = (_flat(grad_delta), _flat(w), _flat(z), _flat(alpha), group, penalty_scale, left, right, shift)
        result = fused.run("grads", *args)
        if result is not None:
            grad_w, grad_alpha, grad_group = result
            return grad_w.view_as(w), grad_alpha.view_as(w), grad_group if needs[2] else None
    grad_w, grad_alpha, grad_group = gate_grads(grad_delta, w, group, z, stretch, *needs)
    if penalty_scale is not None and needs[1]:
        _add_sigmoid_derivative(grad_alpha, alpha, shift, penalty_scale)
    return grad_w, grad_alpha, grad_group


@dataclass(frozen=True)
class L0Weights:
    """How one adapter's expected L0 enters the loss (see [`tensor_penalty`]).

    `l0_lambda` weights the element gates and `group_l0_lambda` the group gate of structured diff pruning;
    `group_penalty` is `"product"` (the paper's form) or `"sum"` (the authors' code).
    """

    l0_lambda: float
    group_l0_lambda: float
    group_penalty: str = "product"


def _open_sum(alpha: torch.Tensor, shift: float) -> torch.Tensor:
    """`sum_i sigmoid(alpha_i - shift)` in fp32, by blocks of `L0_BLOCK` entries whatever the dtype of `alpha`: a
    bf16 sum of millions of probabilities near 1 would stop growing, and bf16 sigmoids near 1 are rounded by up to
    0.2% each."""
    total = torch.zeros((), dtype=torch.float32, device=alpha.device)
    for block in alpha.reshape(-1).split(L0_BLOCK):
        total += _shifted_sigmoid(upcast(block), shift).sum(dtype=torch.float32)
    return total


def penalty_forward(alpha, group_alpha, stretch, weights: L0Weights, elements=None):
    """The penalty of one tensor, `(value, elements, group)`, without autograd: `elements = sum_i P(z_i != 0)` (given,
    as [`gate_forward`] sums it, or computed) and `group = P(z^j != 0)` (None without a group gate) are kept for
    [`penalty_backward`]."""
    shift = l0_shift(stretch)
    with torch.no_grad():
        if elements is None and fused.enabled(alpha) and alpha.is_contiguous():
            elements = fused.run("open_sum", _flat(alpha), shift)
        elements = _open_sum(alpha, shift) if elements is None else elements
        group = None if group_alpha is None else _open_sum(group_alpha, shift)
        return combine_penalty(elements, group, weights), elements, group


def combine_penalty(elements: torch.Tensor, group: torch.Tensor | None, weights: L0Weights) -> torch.Tensor:
    """The penalty of one tensor from `elements = sum_i P(z_i != 0)` and `group = P(z^j != 0)` (None: no group)."""
    if group is None:
        return weights.l0_lambda * elements
    if weights.group_penalty == "sum":
        return weights.l0_lambda * elements + weights.group_l0_lambda * group
    return weights.l0_lambda * group * elements


def penalty_backward(grad, alpha, group_alpha, stretch, weights: L0Weights, elements, group, grad_alpha=None):
    """Gradients of the penalty of one tensor with respect to `alpha` (added into `grad_alpha` if given) and
    `group_alpha`, given the incoming `grad`.

    Product form: the element logits get `l0_lambda * P(z^j != 0) * s'(alpha)` and the group logit
    `group_l0_lambda * sum_i P(z_i != 0) * s'(alpha^j)`; sum form: `l0_lambda * s'(alpha)` and
    `group_l0_lambda * s'(alpha^j)`.
    """
    grad_alpha = torch.zeros_like(alpha) if grad_alpha is None else grad_alpha
    _add_sigmoid_derivative(grad_alpha, alpha, l0_shift(stretch), penalty_scale(grad, weights, group))
    return grad_alpha, group_penalty_grad(grad, group_alpha, stretch, weights, elements)


def penalty_scale(grad, weights: L0Weights, group) -> torch.Tensor:
    """The factor of `s'(alpha - log(-l / r))` in the penalty's gradient with respect to the element logits."""
    scale = grad.float() * weights.l0_lambda
    if group is not None and weights.group_penalty != "sum":
        scale = scale * group
    return scale


def group_penalty_grad(grad, group_alpha, stretch, weights: L0Weights, elements) -> torch.Tensor | None:
    """The penalty's gradient with respect to the group logit (None without a group gate)."""
    if group_alpha is None:
        return None
    group_scale = grad.float() * weights.group_l0_lambda
    if weights.group_penalty != "sum":
        group_scale = group_scale * elements
    return _add_sigmoid_derivative(torch.zeros_like(group_alpha), group_alpha, l0_shift(stretch), group_scale)


def penalty_grad(alpha, stretch, scale) -> torch.Tensor:
    """`scale * s'(alpha - log(-l / r))` for every entry of `alpha`, in its dtype: the element logits' gradient of
    the penalty alone (fused where [`fused.enabled`])."""
    shift = l0_shift(stretch)
    if fused.enabled(alpha) and alpha.is_contiguous():
        out = fused.run("penalty_grad", _flat(alpha), scale, shift)
        if out is not None:
            return out.view_as(alpha)
    return _add_sigmoid_derivative(torch.zeros_like(alpha), alpha, shift, scale)


#: Entries per pass of the penalty's backward: bounds its temporaries, whatever the size of the tensor.
PENALTY_CHUNK = 1 << 20


def _add_sigmoid_derivative(into: torch.Tensor, alpha: torch.Tensor, shift: float, scale: torch.Tensor):
    """`into += scale * s (1 - s)` with `s = sigmoid(alpha - shift)`, a chunk at a time: in a module's backward,
    next to its task gradients, two temporaries the size of the largest tensor (the embedding table) would
    otherwise be alive at once. `into` is contiguous (a fresh gradient)."""
    flat_into, flat_alpha = into.view(-1), alpha.reshape(-1)
    for start in range(0, flat_alpha.numel(), PENALTY_CHUNK):
        s = _shifted_sigmoid(upcast(flat_alpha[start : start + PENALTY_CHUNK]), shift)
        # one fused pass: scale * s * (1 - s)
        derivative = torch.ops.aten.sigmoid_backward(scale.to(s.dtype).expand_as(s), s)
        flat_into[start : start + PENALTY_CHUNK].add_(derivative.to(into.dtype))
    return into


class _TensorPenalty(torch.autograd.Function):
    """The penalty of one tensor as its own autograd node (for [`tensor_penalty`], outside a forward pass)."""

    @staticmethod
    def forward(ctx, alpha, group_alpha, stretch, weights):
        value, ctx.elements, ctx.group = penalty_forward(alpha, group_alpha, stretch, weights)
        ctx.stretch, ctx.weights = stretch, weights
        ctx.save_for_backward(alpha, group_alpha)
        return value

    @staticmethod
    def backward(ctx, grad):
        alpha, group_alpha = ctx.saved_tensors
        grads = penalty_backward(grad, alpha, group_alpha, ctx.stretch, ctx.weights, ctx.elements, ctx.group)
        return *grads, None, None


def tensor_penalty(
    alpha: torch.Tensor, stretch: tuple[float, float], weights: L0Weights, group_alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """The expected-L0 penalty of one gated tensor, a differentiable 0-d fp32 tensor.

    `l0_lambda * sum_i sigmoid(alpha_i - log(-l / r))`; with a group logit `alpha^j` (structured diff pruning) the
    product form multiplies this by `sigmoid(alpha^j - log(-l / r))` (its gradient reaching `alpha^j` scaled by
    `group_l0_lambda` instead of `l0_lambda`), and the sum form adds `group_l0_lambda * sigmoid(alpha^j - ...)`.
    """
    return _TensorPenalty.apply(alpha, group_alpha, stretch, weights)


class _HardConcreteDelta(torch.autograd.Function):
    """`delta = z * w * group` with `z ~ HardConcrete(alpha)`, only at `rows` if given, and the tensor's penalty.

    Saves `z` and the inputs for backward (or, where [`redraw_gates`], what `z` was drawn from, and draws it again
    in backward). The penalty (over all of `alpha`, see [`tensor_penalty`]) is a
    second output of the same node, so its gradient is computed in the same backward call as the task gradient:
    under FSDP that is while the module's parameters are gathered. With `weights=None` it is a constant 0.
    """

    @staticmethod
    def forward(ctx, w, alpha, group, stretch, rows, group_alpha, weights):
        used_w, used_alpha = (w, alpha) if rows is None else (w[rows], alpha[rows])
        # the elements' expected L0 is summed over all of `alpha` in the sampling pass when it covers all rows
        z, ctx.draw, delta, elements = gate_forward(
            used_w, used_alpha, group, stretch, open_sum=weights is not None and rows is None
        )
        if weights is None:
            penalty = torch.zeros((), dtype=torch.float32, device=alpha.device)
            ctx.mark_non_differentiable(penalty)
            ctx.elements = ctx.group = None
        else:
            penalty, ctx.elements, ctx.group = penalty_forward(alpha, group_alpha, stretch, weights, elements)
        ctx.stretch, ctx.weights = stretch, weights
        ctx.save_for_backward(w, group, z, rows, alpha, group_alpha)  # w, not a copy of its rows
        return delta, penalty

    @staticmethod
    def backward(ctx, grad_delta, grad_penalty):
        w, group, z, rows, alpha, group_alpha = ctx.saved_tensors
        if rows is not None:
            w = w[rows]
        if z is None:
            z = redrawn_gate(ctx.draw, alpha if rows is None else alpha[rows], ctx.stretch, w.dtype)
        needs = ctx.needs_input_grad
        weights = ctx.weights
        scale = None if weights is None or not needs[1] else penalty_scale(grad_penalty, weights, ctx.group)
        # with `rows`, the penalty's gradient covers all of `alpha` and is added below, not at the sampled rows
        used_alpha = alpha if rows is None else None
        grad_w, grad_alpha, grad_group = gate_backward(
            grad_delta.clone(), w, group, z, ctx.stretch, needs[:3], used_alpha, None if rows is not None else scale
        )
        if rows is not None:
            grad_w = (
                None if grad_w is None else torch.zeros_like(alpha, dtype=grad_w.dtype).index_copy_(0, rows, grad_w)
            )
            if grad_alpha is not None:
                full = torch.zeros_like(alpha) if scale is None else penalty_grad(alpha, ctx.stretch, scale)
                # index_select + index_copy_: index_add_ on CPU goes through a slow scatter_add
                grad_alpha = full.index_copy_(0, rows, full.index_select(0, rows).add_(grad_alpha))
        grad_group_alpha = None
        if weights is not None:
            grad_group_alpha = group_penalty_grad(grad_penalty, group_alpha, ctx.stretch, weights, ctx.elements)
        return grad_w, grad_alpha, grad_group, None, None, grad_group_alpha, None


def hard_concrete_delta_and_penalty(
    w: torch.Tensor,
    alpha: torch.Tensor,
    stretch: tuple[float, float],
    group_gate: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    group_alpha: torch.Tensor | None = None,
    weights: L0Weights | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`hard_concrete_delta`] at `rows` of `w` and `alpha` (all rows if None), and the tensor's penalty under
    `weights` (a constant 0 if None) from the same autograd node; `group_alpha` is the group gate's logit."""
    return _HardConcreteDelta.apply(w, alpha, group_gate, stretch, rows, group_alpha, weights)


def hard_concrete_delta(
    w: torch.Tensor,
    alpha: torch.Tensor,
    stretch: tuple[float, float],
    group_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampled diff `delta = z * w` (times the structured group gate if given), differentiable in `w`,
    `alpha` and `group_gate`.

    Args:
        w: the dense diff, any shape.
        alpha: gate logits, same shape as `w`.
        stretch: `(l, r)`.
        group_gate: optional gate `z^j` of the tensor's group (structured diff pruning), broadcast against `w`.
    """
    return hard_concrete_delta_and_penalty(w, alpha, stretch, group_gate)[0]


def sample_group_gate(group_alpha: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    """Hard-concrete sample of a (small) tensor of group logits, with ordinary autograd."""
    noise = torch.rand_like(group_alpha, dtype=torch.float32)
    return sample_gate_from_noise(group_alpha, noise, stretch)


def _shifted_sigmoid(alpha: torch.Tensor, shift: float) -> torch.Tensor:
    return torch.sigmoid(alpha) if shift == 0 else torch.sigmoid(alpha - shift)


def expected_l0(alpha: torch.Tensor, stretch: tuple[float, float], group_alpha: torch.Tensor | None = None):
    """Closed-form expected number of non-zero gates, `sum_i sigmoid(alpha_i - log(-l / r))`.

    With `group_alpha` (structured diff pruning, the paper's multiplicative form) every entry is weighted by its
    group's open probability: `sigmoid(alpha^j - log(-l / r)) * sum_i sigmoid(alpha_i - log(-l / r))`.
    Returns a 0-d fp32 tensor, differentiable in `alpha` (and `group_alpha`).
    """
    return tensor_penalty(alpha, stretch, L0Weights(1.0, 1.0), group_alpha)


def prob_gate_zero(alpha: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    """P(z = 0) under the hard-concrete distribution: `sigmoid(log(-l / r) - alpha)`.

    z = 0 exactly when `s * (r - l) + l <= 0`, i.e. `s <= -l / (r - l)`, whose log-odds are `log(-l / r)`.
    """
    return torch.sigmoid(l0_shift(stretch) - alpha)


def prob_gate_one(alpha: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    """P(z = 1): z = 1 exactly when `s >= (1 - l) / (r - l)`, i.e. `u >= sigmoid(logit((1 - l) / (r - l)) - alpha)`."""
    left, right = stretch
    threshold = (1 - left) / (right - left)
    return torch.sigmoid(alpha - math.log(threshold / (1 - threshold)))
