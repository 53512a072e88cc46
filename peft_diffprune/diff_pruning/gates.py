"""Hard-concrete gates and the expected-L0 penalty of diff pruning, as pure tensor functions.

Notation follows Guo, Rush and Kim (2021) and Louizos, Welling and Kingma (2018): per diff entry a gate logit
`alpha`, a stretch interval `(l, r)` with `l < 0 < 1 < r`, and a gate `z` in [0, 1] with an atom at exactly 0 (the
entry is pruned) and at exactly 1.

The training-time gate is an autograd function that keeps only the sampled gate `z` for the backward pass: the
derivative of the stretched sigmoid can be recovered from `z` itself where `0 < z < 1` and is zero elsewhere, so no
uniform noise, logits or sigmoid outputs are held between forward and backward.

Half-precision diffs and logits (bf16 or fp16, PEFT's `autocast_adapter_dtype=False`) are computed in fp32: the
gate is sampled and the expected L0 summed in fp32, gradients are formed in fp32 and rounded once to the
parameters' dtype. Only the sampled gate kept for backward is stored in the diff's dtype.
"""

from __future__ import annotations

import math

import torch


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


def _sample_gate(alpha: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    """A fresh hard-concrete sample for every entry of `alpha`, computed in place on one buffer."""
    left, right = stretch
    z = torch.rand_like(alpha, dtype=torch.float32).clamp_(NOISE_EPS, 1.0 - NOISE_EPS)
    # s = sigmoid(logit(u) + alpha) with logit(u) = -log(1 / u - 1): every step in place on the noise buffer
    z.reciprocal_().sub_(1.0).log_().neg_().add_(alpha).sigmoid_()
    return z.mul_(right - left).add_(left).clamp_(0.0, 1.0)


def _gate_derivative(z: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    """dz/dalpha from the sampled gate alone.

    Inside (0, 1), `z = s (r - l) + l` with `ds/dalpha = s (1 - s)`, so `dz/dalpha = (z - l)(r - z) / (r - l)`;
    where the sample was clamped to exactly 0 or 1 the gate does not move with alpha.
    """
    left, right = stretch
    derivative = (z - left).mul_(right - z).div_(right - left)
    return derivative.masked_fill_(torch.logical_or(z <= 0, z >= 1), 0.0)


def gate_grads(grad_delta, w, group, z, stretch, needs_w: bool, needs_alpha: bool, needs_group: bool):
    """Gradients of `delta = z * w * group` (z sampled from alpha) with respect to `w`, `alpha` and `group`, given
    the gradient `grad_delta` and the sampled gate `z`. `grad_delta` may be overwritten.

    Computed in fp32 and returned in the dtype of `w` (and `alpha`, which shares it); the group gate's in fp32.
    """
    dtype = w.dtype
    grad_delta, z = upcast(grad_delta), upcast(z)  # no copies in fp32
    grad_w = grad_alpha = grad_group = None
    if needs_alpha:
        grad_alpha = _gate_derivative(z, stretch).mul_(grad_delta).mul_(w)
        if group is not None:
            grad_alpha.mul_(group)
    if needs_w or (group is not None and needs_group):
        grad_z = grad_delta.mul_(z)
        if group is not None:
            # d(sum grad * z * w * group) / d group = <grad * z, w>
            grad_group = torch.dot(grad_z.reshape(-1), w.reshape(-1).to(grad_z.dtype)).reshape(group.shape)
            grad_w = grad_z.mul_(group)
        else:
            grad_w = grad_z
    grad_w = None if grad_w is None else grad_w.to(dtype)
    grad_alpha = None if grad_alpha is None else grad_alpha.to(dtype)
    return grad_w, grad_alpha, grad_group


def sampled_delta(w: torch.Tensor, alpha: torch.Tensor, group: torch.Tensor | None, stretch):
    """A fresh gate sample `z` for `alpha` and the diff `z * w * group` it gives, without autograd.

    The gate is sampled in fp32 and rounded to the dtype of `w`, so that forward and backward use the same `z`.
    """
    with torch.no_grad():
        z = _sample_gate(alpha.detach(), stretch).to(w.dtype)
        delta = z * w
        return z, (delta if group is None else delta.mul_(group))


class _HardConcreteDelta(torch.autograd.Function):
    """`delta = z * w * group` with `z ~ HardConcrete(alpha)`; saves only `z` (and the inputs) for backward."""

    @staticmethod
    def forward(ctx, w, alpha, group, stretch):
        z, delta = sampled_delta(w, alpha, group, stretch)
        ctx.stretch = stretch
        ctx.save_for_backward(w, group, z)
        return delta

    @staticmethod
    def backward(ctx, grad_delta):
        w, group, z = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = gate_grads(grad_delta.clone(), w, group, z, ctx.stretch, needs[0], needs[1], needs[2])
        return (*grads, None)


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
        group_gate: optional 0-d gate `z^j` of the tensor's group (structured diff pruning).
    """
    return _HardConcreteDelta.apply(w, alpha, group_gate, stretch)


def sample_group_gate(group_alpha: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    """Hard-concrete sample of a (small) tensor of group logits, with ordinary autograd."""
    noise = torch.rand_like(group_alpha, dtype=torch.float32)
    return sample_gate_from_noise(group_alpha, noise, stretch)


class _SigmoidSum(torch.autograd.Function):
    """`sum(sigmoid(alpha - shift))` without keeping the sigmoid output for backward.

    Summed in fp32 by blocks of `L0_BLOCK` entries whatever the dtype of `alpha`: a bf16 sum of millions of
    probabilities near 1 would stop growing, and bf16 sigmoids near 1 are rounded by up to 0.2% each.
    """

    @staticmethod
    def forward(ctx, alpha, shift):
        ctx.shift = shift
        ctx.save_for_backward(alpha)
        total = torch.zeros((), dtype=torch.promote_types(alpha.dtype, torch.float32), device=alpha.device)
        for block in alpha.reshape(-1).split(L0_BLOCK):
            total += _shifted_sigmoid(upcast(block), shift).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        (alpha,) = ctx.saved_tensors
        grad = upcast(grad)
        if alpha.dtype == grad.dtype:
            s = _shifted_sigmoid(alpha, ctx.shift)
            # one fused pass: grad * s * (1 - s)
            return torch.ops.aten.sigmoid_backward(grad.expand_as(s), s), None
        grad_alpha = torch.empty(alpha.shape, dtype=alpha.dtype, device=alpha.device)
        for out, block in zip(grad_alpha.view(-1).split(L0_BLOCK), alpha.reshape(-1).split(L0_BLOCK), strict=True):
            s = _shifted_sigmoid(upcast(block), ctx.shift)
            out.copy_(torch.ops.aten.sigmoid_backward(grad.expand_as(s), s))
        return grad_alpha, None


def _shifted_sigmoid(alpha: torch.Tensor, shift: float) -> torch.Tensor:
    return torch.sigmoid(alpha) if shift == 0 else torch.sigmoid(alpha - shift)


def expected_l0(alpha: torch.Tensor, stretch: tuple[float, float], group_alpha: torch.Tensor | None = None):
    """Closed-form expected number of non-zero gates, `sum_i sigmoid(alpha_i - log(-l / r))`.

    With `group_alpha` (structured diff pruning, the paper's multiplicative form) every entry is weighted by its
    group's open probability: `sigmoid(alpha^j - log(-l / r)) * sum_i sigmoid(alpha_i - log(-l / r))`.
    Returns a 0-d fp32 tensor, differentiable in `alpha` (and `group_alpha`).
    """
    shift = l0_shift(stretch)
    total = _SigmoidSum.apply(alpha, shift)
    if group_alpha is not None:
        total = total * torch.sigmoid(group_alpha.float() - shift).sum()
    return total


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
