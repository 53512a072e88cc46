"""Dropout whose masks are drawn on every CPU thread and kept as bits (`threaded_dropout`, `enable_threaded_dropout`).

On CPU torch draws a dropout mask with one serial Mersenne-twister pass (`bernoulli_`, about 6.6 ns an entry here):
on MiniLM at 32 x 128 tokens the step's 20 masks are 0.3 s of its 1.7 s, for full fine-tuning and every adapter
alike. Under [`threaded_dropout`] the `torch.nn.functional.dropout` calls of a forward (`nn.Dropout` layers, and
transformers' eager attention) and the dropout inside `scaled_dot_product_attention` (transformers' default "sdpa"
attention, which on CPU falls back to its math when it drops out) draw their masks from numpy's PCG64 in chunks over
threads, seeded from torch's default generator ([`gates.draw_in_chunks`], as the gates' noise is), and keep them for
backward as bits instead of a float tensor (4 bytes an entry).

What changes is which entries are dropped, not how: each entry is kept with probability `1 - p` (to float32's
resolution, 2^-24) and scaled by `1 / (1 - p)` in the input's dtype, as torch does, and backward multiplies by the
same mask. A seed gives the same masks on any number of threads, and again when a checkpointed layer is recomputed
(torch's checkpointing restores the generator it draws the seed from). The masks are not torch's, so a run under it
is not bit for bit a run without it; everything else is: a dropout that is off (eval mode, `p = 0`), in place, of
`p = 1`, off the CPU, of fewer than [`MIN_ENTRIES`] entries, or of a dtype other than float32, bfloat16 and float16
is torch's own, and so is attention without dropout (`dropout_p = 0`) or with a mask dtype, device or shape the math
below does not take.

Attention with dropout is computed as torch's math fallback does (`softmax(q k^T * scale + mask) @ v`, with
`torch._safe_softmax`, so fully masked rows are zeros): float32 inputs only, the same values up to the order of the
sums. Lean activations (`activations.py`) rebuild the dropped-out attention weights that the product with `v` saves
from the softmax's output and the mask, as they do for torch's dropout.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .activations import pack_bits, scaled_mask, unpack_bits
from .gates import THREADED_NOISE_MIN, draw_in_chunks


#: Entries from which a dropout's mask is drawn over threads; smaller ones are torch's dropout.
MIN_ENTRIES = THREADED_NOISE_MIN
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_sdpa = F.scaled_dot_product_attention


def bernoulli_mask(shape: torch.Size, keep: float) -> torch.Tensor:
    """A CPU bool tensor of `shape`, each entry True with probability `keep` (`u < keep` for numpy float32
    uniforms `u`), drawn in chunks over torch's threads."""
    mask = torch.empty(shape, dtype=torch.bool)
    flat = mask.view(-1).numpy()
    threshold = np.float32(keep)

    def fill(generator, start: int, stop: int) -> None:
        np.less(generator.random(stop - start, dtype=np.float32), threshold, out=flat[start:stop])

    draw_in_chunks(flat.size, fill)
    return mask


def _scale(p: float, dtype: torch.dtype) -> torch.Tensor:
    """`1 / (1 - p)` as torch's dropout computes it on its mask (`noise.div_(1 - p)`), a 0-d tensor of `dtype`."""
    return torch.ones(1, dtype=dtype).div_(1.0 - p)[0]


class _ThreadedDropout(torch.autograd.Function):
    """`input * noise`, `noise = mask / (1 - p)` for a threaded [`bernoulli_mask`]; saves the mask as bits only.
    The noise is rebuilt once in backward ([`_noise`]) for the node's gradient and, under lean activations, for the
    output that the next op saved."""

    @staticmethod
    def forward(ctx, input, p):
        mask = bernoulli_mask(input.shape, 1.0 - p)
        ctx.value, ctx.shape, ctx.rebuilt = _scale(p, input.dtype), input.shape, None
        ctx.save_for_backward(pack_bits(mask))
        return input * scaled_mask(mask, ctx.value)

    @staticmethod
    def backward(ctx, grad):
        noise = _noise(ctx)
        ctx.rebuilt = None
        return grad * noise, None


DROPOUT_NODE = _ThreadedDropout.__name__ + "Backward"


def _noise(node) -> torch.Tensor:
    """The noise a [`_ThreadedDropout`] node multiplied by, rebuilt from its bits once per backward (the first
    caller's copy is kept for the node's own backward, which drops it)."""
    if node.rebuilt is None:
        (bits,) = node.saved_tensors
        node.rebuilt = scaled_mask(unpack_bits(bits, node.shape), node.value)
    return node.rebuilt


def _threaded(input: torch.Tensor, p: float, training: bool, inplace: bool) -> bool:
    return (
        training
        and not inplace
        and 0.0 < p < 1.0
        and input.device.type == "cpu"
        and input.dtype in _DTYPES
        and input.numel() >= MIN_ENTRIES
    )


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """`torch.nn.functional.dropout`, with a threaded mask kept as bits where the module docstring says."""
    if not _threaded(input, p, training, inplace):
        return F.dropout(input, p, training, inplace)
    return _ThreadedDropout.apply(input, p)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """`torch.nn.functional.scaled_dot_product_attention`; with dropout on a CPU, its math with [`dropout`]."""
    size = (*query.shape[:-1], key.shape[-2])
    if (
        not 0.0 < dropout_p < 1.0
        or query.device.type != "cpu"
        or not query.dtype == key.dtype == value.dtype == torch.float32
        or math.prod(size) < MIN_ENTRIES
        or (
            attn_mask is not None
            and (attn_mask.device.type != "cpu" or attn_mask.dtype not in (torch.bool, query.dtype))
        )
        or (is_causal and attn_mask is not None)
    ):
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    weights = query @ key.transpose(-2, -1) * scale
    if is_causal:
        attn_mask = torch.ones(size[-2:], dtype=torch.bool).tril()
    if attn_mask is not None:
        weights = weights.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else weights + attn_mask
    weights = torch._safe_softmax(weights, -1) if hasattr(torch, "_safe_softmax") else weights.softmax(-1)
    return _ThreadedDropout.apply(weights, dropout_p) @ value


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return dropout(*args, **kwargs)
        if func is _sdpa:
            return scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


def threaded_dropout() -> TorchFunctionMode:
    """A context in which dropout draws its masks over threads and keeps them as bits (see the module docstring).

    with threaded_dropout():
        loss = model(**batch).loss
    loss.backward()

    Reentrant activation checkpointing recomputes layers in backward, outside the context: use
    [`enable_threaded_dropout`] for a whole model, which enters it in every module's forward.
    """
    return _Mode()


#: This thread's mode while hooked forwards run (`mode`), and how many of them are running (`depth`).
_active = threading.local()


def _enter(module, args) -> None:
    depth = getattr(_active, "depth", 0)
    if depth == 0:
        _active.mode = _Mode()
        _active.mode.__enter__()
    _active.depth = depth + 1


def _leave(module, args, output) -> None:
    depth = getattr(_active, "depth", 0)
    if depth == 0:  # a hook before ours failed, so ours never entered
        return
    _active.depth = depth - 1
    if depth == 1:
        mode, _active.mode = _active.mode, None
        mode.__exit__(None, None, None)


def enable_threaded_dropout(model: nn.Module) -> None:
    """Every forward of `model` and of each of its modules (so that a layer recomputed by activation checkpointing
    draws the same mask again) runs in [`threaded_dropout`]: the outermost hooked forward of a thread enters it and
    leaves it, even when it fails. Undo with [`disable_threaded_dropout`]; calling it again changes nothing."""
    if getattr(model, "_threaded_dropout_hooks", None):
        return
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(_enter))
        handles.append(module.register_forward_hook(_leave, always_call=True))
    model._threaded_dropout_hooks = handles


def disable_threaded_dropout(model: nn.Module) -> None:
    """Undo [`enable_threaded_dropout`]."""
    for handle in getattr(model, "_threaded_dropout_hooks", ()):
        handle.remove()
    model._threaded_dropout_hooks = []
