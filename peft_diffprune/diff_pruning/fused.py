"""Fused kernels of the gated stage: the gate's per-entry work in one pass over memory each, via torch.compile.

Per diff entry the gated stage samples a hard-concrete gate, forms `W + z * w` and sums the expected L0 (forward),
then forms the gradients of `w` and `alpha` and adds the penalty's gradient (backward). Written with eager ops
(`gates.py`) that is about a dozen passes over every tensor, which on a memory-bound CPU cost more than the matrix
products of a BERT-base step. The functions here do the same math and are compiled (Inductor) into one loop each.

The uniform noise is drawn by `gates._uniform_noise` (seeded from torch's default generator) with or without fusion,
so that a seed gives the same gates either way (and the same on every rank of a data-parallel job).

`PEFT_DIFFPRUNE_FUSED_GATES` (read when first needed, or set with [`set_mode`]) chooses:

- `"off"` (the default): the eager code of `gates.py` only.
- `"compile"`: compiled kernels on CPU and CUDA; if compiling fails (no C++ compiler, an unsupported device), one
  warning is logged and the eager code of `gates.py` is used from then on.
- `"eager"`: the same functions run uncompiled: the fused math without compile time.

The default is "off" because, measured on a quiet 2-core CPU (docs/benchmarks.md), the compiled kernels took the
gated step no faster than the eager code (BERT-base 8 x 128: 1.337x full fine-tuning's step against 1.325x; MiniLM
16 x 64: 1.58x against 1.60x), cost about 21 s of compiling from an empty cache and more peak memory (MiniLM: 1.47x
full fine-tuning's against 1.40x); the README's main job took 204 s with them and 177 s without. On CUDA they have
not been measured yet.
"""

from __future__ import annotations

import logging
import os

import torch


logger = logging.getLogger(__name__)

MODES = ("compile", "eager", "off")
ENV_VAR = "PEFT_DIFFPRUNE_FUSED_GATES"

#: Graphs dynamo may compile per kernel: one per pattern of optional inputs and dtypes met.
RECOMPILE_LIMIT = 64

_mode: str | None = None
_compiled: dict = {}


def set_mode(mode: str | None) -> None:
    """Choose how the gate's kernels run (one of MODES); None reads `PEFT_DIFFPRUNE_FUSED_GATES` again."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"fused gate mode must be one of {MODES}, got {mode!r}.")
    _mode = mode
    _compiled.clear()


def mode() -> str:
    """The mode in effect (see the module docstring)."""
    global _mode
    if _mode is None:
        value = os.environ.get(ENV_VAR, "off")
        if value not in MODES:
            raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {value!r}.")
        _mode = value
    return _mode


def enabled(tensor: torch.Tensor) -> bool:
    """Whether the gate of `tensor` goes through the fused functions: not in mode "off", not on a device Inductor
    has no backend for, and not while torch.compile traces a caller (it fuses the eager code itself)."""
    if mode() == "off" or tensor.device.type not in ("cpu", "cuda"):
        return False
    return not torch.compiler.is_compiling()


def run(name: str, *args):
    """`KERNELS[name](*args)`, compiled in mode "compile" (once per kernel, shapes dynamic). Returns None if compiling
    failed: the caller then runs the eager code, and every later call returns None at once."""
    kernel = KERNELS[name]
    if mode() == "eager":
        return kernel(*args)
    compiled = _compiled.get(name)
    if compiled is None:
        logger.info("Compiling the fused gate kernel %r (once per process; Inductor caches it on disk).", name)
        compiled = _compiled[name] = torch.compile(kernel, dynamic=True, fullgraph=True)
    if compiled is False:
        return None
    try:
        # one compiled graph per input pattern (None or not, dtypes): more than dynamo's default limit of 8 per
        # function, whose hard failure under fullgraph=True would disable fusion
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args)
    except Exception as error:  # a compiler missing or failing: the eager code computes the same values
        logger.warning(
            "Could not compile the fused gate kernels (%s: %s); the gated stage runs the eager gate code, which is "
            "correct but slower. Set %s=off to skip the attempt.",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
            ENV_VAR,
        )
        _compiled.update(dict.fromkeys(KERNELS, False))
        return None


def _hard_concrete(noise, alpha, eps: float, left: float, right: float):
    """The gate for uniform `noise`, in fp32: the formula of `gates._sample_gate`, op for op."""
    u = noise.clamp(eps, 1.0 - eps)
    s = torch.sigmoid(alpha.float() - torch.log(u.reciprocal() - 1.0))
    return (s * (right - left) + left).clamp(0.0, 1.0)


def _scaled(z, w, group):
    """`z * w * group` in the dtype of `w`, as `gates.sampled_delta` rounds it."""
    delta = z * w
    return delta if group is None else (delta * group).to(w.dtype)


def _sample(noise, alpha, w, group, base, eps: float, left: float, right: float, shift: float | None):
    """`(z, out, open_sum)`: the gate `z` in the dtype of `w`, `out = z * w * group` (plus `base`, in its dtype, if
    given) and `sum sigmoid(alpha - shift)` in fp32 (None if `shift` is None), in one pass."""
    z = _hard_concrete(noise, alpha, eps, left, right).to(w.dtype)
    delta = _scaled(z, w, group)
    out = delta if base is None else delta.to(base.dtype) + base
    return z, out, None if shift is None else _open_sum(alpha, shift)


def _sampled(noise, alpha, w, group, base, eps: float, left: float, right: float, shift: float | None):
    """[`_sample`] without the gate: `(out, open_sum)`, the gate never written to memory (it is drawn again in
    backward, see `gates.redrawn_gate`)."""
    _, out, open_sum = _sample(noise, alpha, w, group, base, eps, left, right, shift)
    return out, open_sum


def _gate(noise, alpha, eps: float, left: float, right: float, dtype: torch.dtype):
    """The gate [`_sample`] draws from `noise`, in `dtype` (that of `w`): the same ops, so the same bits."""
    return _hard_concrete(noise, alpha, eps, left, right).to(dtype)


def _adapted(base, z, w, group):
    """`base + z * w * group` in the dtype of `base` (the adapted weight, rebuilt in backward)."""
    return _scaled(z, w, group).to(base.dtype) + base


def _penalty_derivative(alpha, scale, shift: float):
    """`scale * s (1 - s)` with `s = sigmoid(alpha - shift)` (the expected L0's gradient), in fp32."""
    s = torch.sigmoid(alpha.float() - shift)
    return scale * (1.0 - s) * s


def _grads(grad, w, z, alpha, group, scale, left: float, right: float, shift: float):
    """`(grad_w, grad_alpha, grad_group)` of `delta = z * w * group` given `grad = dL/d delta`, in one pass; the
    penalty's gradient `scale * s'(alpha - shift)` is added to `grad_alpha` unless `scale` is None. The math of
    `gates.gate_grads` and `gates._add_sigmoid_derivative`; `grad_group` is None without a group gate."""
    g, zf = grad.float(), z.float()
    derivative = torch.where((zf > 0) & (zf < 1), (zf - left) * (right - zf) / (right - left), 0.0)
    grad_alpha = derivative * g * w
    grad_z = g * zf
    grad_group = None
    if group is not None:
        grad_alpha = grad_alpha * group
        grad_group = (grad_z * w.float()).sum(dtype=torch.float64).float().reshape(group.shape)
        grad_z = grad_z * group
    if scale is not None:
        grad_alpha = grad_alpha + _penalty_derivative(alpha, scale, shift)
    return grad_z.to(w.dtype), grad_alpha.to(w.dtype), grad_group


def _open_sum(alpha, shift: float):
    """`sum sigmoid(alpha - shift)`, accumulated in fp64 and returned in fp32: a compiled fp32 reduction adds each
    vector lane's terms one after another, 2e-6 off over 2^25 entries, where torch's eager sum is blocked."""
    return torch.sigmoid(alpha.float() - shift).sum(dtype=torch.float64).float()


def _penalty_grad(alpha, scale, shift: float):
    return _penalty_derivative(alpha, scale, shift).to(alpha.dtype)


KERNELS = {
    "sample": _sample,
    "sampled": _sampled,
    "gate": _gate,
    "adapted": _adapted,
    "grads": _grads,
    "open_sum": _open_sum,
    "penalty_grad": _penalty_grad,
}
