"""Selective activation checkpointing: keep the matrix products' outputs, recompute the cheap operations between them.

transformers' `gradient_checkpointing_enable()` recomputes each layer's whole forward in backward: the activations
of a layer are freed, and the layer's matrix products run twice, a third more compute. Most of a transformer layer's
saved bytes, though, are not matrix products but what lies between them: dropout masks and outputs, softmax
probabilities, the activation function's input and output, layer norms' inputs. torch's selective checkpointing
(`torch.utils.checkpoint.create_selective_checkpoint_contexts`) caches the outputs of the operations a policy names
and recomputes the others from them, so with the products cached the recomputation costs only elementwise work.

[`selective_checkpointing`] gives the `gradient_checkpointing_kwargs` for it. With a candidate pool
(`DiffPruningConfig(candidate_pool=...)`) it brings BERT-base's 16x pool from 0.80x to 0.68x full fine-tuning's
peak, for about 1.15x the pool's step time (docs/benchmarks.md); it works as well for the dense gated stage, the
fixed-mask stage and any other training of a transformers model. Gates drawn in a checkpointed layer are drawn again in the
recomputation from the same generator state (`preserve_rng_state`, on by default), so the gradients are those of
training without checkpointing.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _saved_ops() -> frozenset:
    """The operations whose outputs are cached: matrix products, convolutions and fused attention kernels (those
    this build of torch has)."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "convolution",
        "_scaled_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


SAVED_OPS = _saved_ops()


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _contexts():
    return create_selective_checkpoint_contexts(_policy)


def selective_checkpointing() -> dict:
    """`gradient_checkpointing_kwargs` for transformers' `gradient_checkpointing_enable`: each checkpointed layer
    keeps the outputs of its matrix products and attention kernels (`SAVED_OPS`) and recomputes everything else in
    backward.

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=selective_checkpointing())

    Enable it before [`select_pool`]: choosing and renewing a candidate pool then checkpoints its layers the same
    way, although it runs in eval mode. Non-reentrant checkpointing only (`use_reentrant=False`).
    """
    return {"use_reentrant": False, "context_fn": _contexts}


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of `model` that transformers checkpoints: its `GradientCheckpointingLayer`s with
    `gradient_checkpointing` set (by `gradient_checkpointing_enable()`); empty when it is off."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # a transformers without it checkpoints in its encoders' loops, left as they are
        return []
    return [
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing is True
    ]


class checkpointing_in_eval:  # noqa: N801 (a context manager, named as torch's are)
    """Within it, the layers transformers checkpoints (see [`checkpointed_layers`]) checkpoint in eval mode too, and
    the model keeps no KV cache.

    transformers checkpoints a layer only while `layer.training`; this sets that one flag on the layers
    themselves, not on their submodules, which stay in eval mode (no dropout): the forward is the eval one, its
    activations are recomputed in backward as in training. `config.use_cache` is off meanwhile: in eval mode a
    causal LM would fill a cache that a checkpointed layer's recomputation fills a second time (and a forward whose
    loss is differentiated has no use for one). Both are restored on exit.
    """

    def __init__(self, model: torch.nn.Module):
        self.layers = [layer for layer in checkpointed_layers(model) if not layer.training]
        configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
        self.configs = [c for c in configs.values() if getattr(c, "use_cache", None) is True]

    def __enter__(self):
        for layer in self.layers:
            layer.training = True
        for config in self.configs:
            config.use_cache = False
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.training = False
        for config in self.configs:
            config.use_cache = True
        return False


#: What `enable_checkpointing` (and `examples/glue.py --activation_checkpointing`) accepts.
CHECKPOINTING_MODES = ("none", "full", "selective")


def enable_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Turn on transformers' activation checkpointing of `model` (a transformers model or a `PeftModel` of one):
    `"full"` recomputes each layer whole (non-reentrant), `"selective"` keeps the products
    ([`selective_checkpointing`]); `"none"` leaves the model as it is. Before [`select_pool`], so that choosing the
    pool checkpoints too."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"Unknown activation checkpointing {mode!r}: choose one of {', '.join(CHECKPOINTING_MODES)}.")
    if mode == "none":
        return
    checkpoint_layers(model, selective_checkpointing() if mode == "selective" else {"use_reentrant": False})


def checkpoint_layers(model: torch.nn.Module, kwargs: dict | None, every_n_layers: int = 1, offload: bool = False):
    """transformers' `activation_checkpointing_enable` (5.24 on), or `gradient_checkpointing_enable` before it (which
    has no `every_n_layers` or `offload`), with `kwargs` for `torch.utils.checkpoint.checkpoint`."""
    if hasattr(model, "activation_checkpointing_enable"):
        options = {"every_n_layers": every_n_layers, "offload": offload}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
