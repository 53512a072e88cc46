"""Autograd functions for training a linear layer's diff, in the gated stage and with the mask fixed.

Both save the input and the (frozen, shared) base weight for backward and rebuild the adapted weight there, instead
of keeping a second copy of every layer's weight alive from forward to backward.

With the mask fixed, only `k` kept diff entries train: the gradient of the loss with respect to them is the product
`grad_out^T @ x` sampled at `k` positions. Computing the full weight gradient and then gathering `k` entries of it
would cost as much as full fine-tuning; `torch.sparse.sampled_addmm` computes only the sampled entries (an SDDMM),
up to the density from which the dense product is cheaper on a CPU (`DENSE_PRODUCT_DENSITY`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .gates import (
    L0Weights,
    adapted_weight,
    gate_backward,
    gate_forward,
    group_penalty_grad,
    penalty_forward,
    penalty_scale,
    redrawn_gate,
)


def _with_diff(base: torch.Tensor, positions: torch.Tensor | None, values: torch.Tensor | None):
    if positions is None:
        return base
    return base.reshape(-1).index_add(0, positions, values.to(base.dtype)).view_as(base)


#: Share of a weight's entries from which [`_sampled_weight_grad`] on a CPU forms the dense product and gathers the
#: sampled entries instead of calling `sampled_addmm` (see there). Read on each call, so benchmarks may change it.
DENSE_PRODUCT_DENSITY = 0.04
#: Largest weight (in entries) whose dense product [`_sampled_weight_grad`] forms: the product is a transient copy of
#: the weight's size in fp32 (64 MiB here), which for an LLM's embedding-sized output layer would be gigabytes.
DENSE_PRODUCT_MAX_ENTRIES = 1 << 24

#: Rows per block of [`_transposed`].
TRANSPOSE_BLOCK = 256


def _transposed(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix.t().contiguous()` for a 2-d CPU tensor, one block of `TRANSPOSE_BLOCK` rows at a time.

    torch's transposing copy of a whole matrix runs on one thread; by blocks it runs on all of them. On 2 threads
    the tokens x features activations and gradients of a BERT step transpose 1.2-2x faster so.
    """
    out = matrix.new_empty(matrix.shape[1], matrix.shape[0])
    for start in range(0, matrix.shape[0], TRANSPOSE_BLOCK):
        out[:, start : start + TRANSPOSE_BLOCK].copy_(matrix[start : start + TRANSPOSE_BLOCK].t())
    return out


def _sampled_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, shape) -> torch.Tensor:
    """`(grad_out^T @ x)` at the flat `positions` of an `(out, in)` weight, without forming the full product where
    that is cheaper.

    On CPU, `sampled_addmm` takes each sampled entry's dot product over contiguous rows of `grad_out^T` and `x^T`,
    and makes both (two transposing copies on one thread) unless given them: they are made here, on every thread.
    Its dot products run on one thread and stream a row of `x^T` each from memory, so from about 4% of the entries
    on (`DENSE_PRODUCT_DENSITY`; a candidate pool 16 times the 0.5% budget is 8%) the dense product, blocked and on
    every thread, and a gather of the sampled entries are faster: the same values up to the order of the sums, for
    one transient weight-sized gradient (so only up to `DENSE_PRODUCT_MAX_ENTRIES`). Measured in docs/benchmarks.md.
    """
    out_features, in_features = shape
    numel = out_features * in_features
    if (
        grad_out.device.type == "cpu"
        and numel <= DENSE_PRODUCT_MAX_ENTRIES
        and positions.numel() >= DENSE_PRODUCT_DENSITY * numel
    ):
        return (grad_out.t() @ x).view(-1).index_select(0, positions)
    rows = torch.div(positions, in_features, rounding_mode="floor")
    crow = torch.zeros(out_features + 1, dtype=positions.dtype, device=positions.device)  # CSR: one index dtype
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta", "invariant checks disabled"
        pattern = torch.sparse_csr_tensor(
            crow, positions - rows * in_features, torch.zeros_like(positions, dtype=x.dtype), size=shape
        )
        if grad_out.device.type == "cpu":
            return torch.sparse.sampled_addmm(pattern, _transposed(grad_out), _transposed(x).t(), beta=0.0).values()
        return torch.sparse.sampled_addmm(pattern, grad_out.t(), x, beta=0.0).values()


class _SparseDiffLinear(torch.autograd.Function):
    """`F.linear(x, W + scatter(values_w), b + scatter(values_b))`.

    Saves `x` and the (shared) base tensors only: the adapted weight is rebuilt in backward, which costs one copy of
    the weight instead of keeping a second copy of every layer alive between forward and backward. `W` and `b` are
    frozen in training; where they require grad (scoring a candidate pool's regrowth, `candidates.py`) they get
    the dense gradient, and the values theirs gathered from it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_positions, weight_values, bias_positions, bias_values):
        adapted_weight = _with_diff(weight, weight_positions, weight_values)
        adapted_bias = None if bias is None else _with_diff(bias, bias_positions, bias_values)
        ctx.save_for_backward(x, weight, weight_positions, weight_values, bias_positions)
        ctx.bias_values_dtype = None if bias_values is None else bias_values.dtype
        return F.linear(x, adapted_weight, adapted_bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, weight_positions, weight_values, bias_positions = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = grad_weight_values = grad_bias_values = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if needs[0]:
            grad_x = grad_out @ _with_diff(weight, weight_positions, weight_values)
        x_2d = x.reshape(-1, x.shape[-1])
        if needs[1]:
            grad_weight = grad_2d.t() @ x_2d
        if needs[4]:
            if grad_weight is not None and grad_weight.dtype == torch.float32:
                grad_weight_values = grad_weight.reshape(-1)[weight_positions]
            else:
                # sampled_addmm has no half-precision CPU kernel; the values are fp32 anyway
                grad_weight_values = _sampled_weight_grad(
                    grad_2d.float(), x_2d.float(), weight_positions, weight.shape
                )
            grad_weight_values = grad_weight_values.to(weight_values.dtype)
        if needs[2] or needs[6]:
            grad_bias_sum = grad_2d.float().sum(0)
            grad_bias = grad_bias_sum.to(grad_out.dtype) if needs[2] else None
            if needs[6]:
                grad_bias_values = grad_bias_sum[bias_positions].to(ctx.bias_values_dtype)
        return grad_x, grad_weight, grad_bias, None, grad_weight_values, None, grad_bias_values


def sparse_diff_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_diff: tuple[torch.Tensor, torch.Tensor] | None,
    bias_diff: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Linear layer with sparse diffs `(positions, values)` on its weight and/or bias; gradients reach the values
    (and the base weight and bias where they require grad)."""
    weight_positions, weight_values = weight_diff or (None, None)
    bias_positions, bias_values = bias_diff or (None, None)
    return _SparseDiffLinear.apply(x, weight, bias, weight_positions, weight_values, bias_positions, bias_values)


class _GatedDiffLinear(torch.autograd.Function):
    """`F.linear(x, W + z_W * w_W * g_W, b + z_b * w_b * g_b)` for a frozen `W`, `b` and fresh hard-concrete gates,
    and the expected-L0 penalties of the weight's and the bias's gates.

    Saves `x`, the gate samples and the inputs (parameters, no copies); the adapted weight is rebuilt in backward.
    Where `gates.redraw_gates()`, no gate is saved: backward draws them again from the generator states they were
    drawn from.
    Each of the weight and the bias comes with its dense diff `w`, gate logits `alpha`, group gate `g` and group
    logit `alpha^j` (`None` for unstructured diffs; all four `None` for a bias without a diff). No gradient reaches
    `W` and `b`. The diff may have another dtype than `W` (fp32 diffs on a bf16 base): it is rounded to `W`'s dtype
    and added, as `DiffState.apply` does. The penalties are outputs of this node (constant 0 when `weights` is
    None), so that their gradient is computed in the module's own backward call, while FSDP has its parameters
    gathered (see gates.py).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stretch, weights, *diffs):
        w_weight, alpha_weight, group_weight, group_alpha_weight, w_bias, alpha_bias, group_bias, group_alpha_bias = (
            diffs
        )
        # sampling, `W + delta` and the expected L0's sum in one pass (gates.gate_forward)
        open_sum = weights is not None
        z_weight, ctx.draw_weight, adapted_weight, weight_sum = gate_forward(
            w_weight, alpha_weight, group_weight, stretch, weight, open_sum
        )
        adapted_bias = bias
        z_bias = bias_sum = None
        if w_bias is not None:
            z_bias, ctx.draw_bias, adapted_bias, bias_sum = gate_forward(
                w_bias, alpha_bias, group_bias, stretch, bias, open_sum
            )
        penalties, ctx.penalty_state = [], []
        for alpha, group_alpha, elements in (
            (alpha_weight, group_alpha_weight, weight_sum),
            (alpha_bias, group_alpha_bias, bias_sum),
        ):
            if weights is None or alpha is None:
                penalty = torch.zeros((), dtype=torch.float32, device=x.device)
                ctx.mark_non_differentiable(penalty)
                ctx.penalty_state.append(None)
            else:
                penalty, elements, group = penalty_forward(alpha, group_alpha, stretch, weights, elements)
                ctx.penalty_state.append((elements, group))
            penalties.append(penalty)
        ctx.stretch, ctx.weights = stretch, weights
        ctx.save_for_backward(x, weight, z_weight, z_bias, *diffs)
        return F.linear(x, adapted_weight, adapted_bias), *penalties

    @staticmethod
    def backward(ctx, grad_out, *grad_penalties):
        x, weight, z_weight, z_bias, *diffs = ctx.saved_tensors
        w_weight, alpha_weight, group_weight, _, w_bias, alpha_bias, group_bias, _ = diffs
        needs = ctx.needs_input_grad
        grad_x = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if z_weight is None and (needs[0] or any(needs[5:8])):
            z_weight = redrawn_gate(ctx.draw_weight, alpha_weight, ctx.stretch, w_weight.dtype)
        if needs[0]:
            grad_x = grad_out @ adapted_weight(weight, z_weight, w_weight, group_weight)
        # the penalty's gradient reaches the element logits in the same pass as the task's (gates.gate_backward)
        scales = [
            None if state is None else penalty_scale(grad_penalty, ctx.weights, state[1])
            for grad_penalty, state in zip(grad_penalties, ctx.penalty_state, strict=True)
        ]
        weight_grads = bias_grads = (None, None, None)
        if any(needs[5:8]):
            grad_weight = grad_2d.t() @ x.reshape(-1, x.shape[-1])
            weight_grads = gate_backward(
                grad_weight, w_weight, group_weight, z_weight, ctx.stretch, needs[5:8], diffs[1], scales[0]
            )
        if w_bias is not None and any(needs[9:12]):
            z_bias = redrawn_gate(ctx.draw_bias, alpha_bias, ctx.stretch, w_bias.dtype) if z_bias is None else z_bias
            bias_grads = gate_backward(
                grad_2d.sum(0), w_bias, group_bias, z_bias, ctx.stretch, needs[9:12], diffs[5], scales[1]
            )
        grads = [*weight_grads, None, *bias_grads, None]
        for offset, grad_penalty, state in zip((0, 4), grad_penalties, ctx.penalty_state, strict=True):
            if state is not None:
                grads[offset + 3] = group_penalty_grad(
                    grad_penalty, diffs[offset + 3], ctx.stretch, ctx.weights, state[0]
                )
        return grad_x, None, None, None, None, *grads


def gated_diff_linear(x, weight, bias, stretch, weight_diff, bias_diff, weights: L0Weights | None = None):
    """Linear layer in the gated stage: `weight_diff` and `bias_diff` are `(w, alpha, group_gate, group_alpha)`
    (the last two None without groups; `bias_diff` None for an ungated bias); the gates are sampled afresh, and
    gradients reach `w`, `alpha` and the group gate.

    Returns `(output, weight_penalty, bias_penalty)`: the expected-L0 penalties of the two tensors under `weights`
    (see [`~gates.tensor_penalty`]; constant zeros when `weights` is None).
    """
    bias_diff = bias_diff or (None, None, None, None)
    return _GatedDiffLinear.apply(x, weight, bias, stretch, weights, *weight_diff, *bias_diff)
