"""The GLUE example's methods: the stages each trains, its default learning rate, and the model each baseline
trains (its builder). Diff pruning itself is built by the example; the baselines go through the same pipeline (same
data, evaluation and outputs)."""

from __future__ import annotations

import argparse
import inspect

import transformers
from peft import LoraConfig, PrefixTuningConfig, SupertuningConfig, get_peft_model
from torch import nn

from ..mam import MAMConfig
from ..parallel_adapter import ParallelAdapterConfig


# Stage 1 of diff pruning trains gated diffs; non-adaptive diff pruning (the paper's baseline) fine-tunes fully
# instead and prunes that diff by magnitude; both then train the kept entries with the mask fixed. The other methods
# are one training stage of the model their builder below returns.
STAGES = {
    "diff_pruning": ("gated", "fixmask"),
    "non_adaptive": ("train", "fixmask"),
    **dict.fromkeys(["full", "lora", "supertuning", "bitfit", "prefix", "parallel_adapter", "mam"], ("train",)),
}
# Tuned for the packaged MiniLM on RTE with a few epochs (docs/glue_example.md); the paper's 1e-5 for the diffs is
# meant for BERT-large and 3 epochs. Methods that train few parameters from zero (prefixes, biases) need larger
# steps, as in PEFT's prompt-learning examples.
DEFAULT_LEARNING_RATES = {
    "diff_pruning": 5e-4,
    "full": 5e-5,
    "lora": 5e-4,
    "non_adaptive": 5e-5,
    "supertuning": 5e-4,
    "bitfit": 1e-3,
    "prefix": 1e-2,
    "parallel_adapter": 5e-4,
    "mam": 5e-4,
}
# Diff pruning restricted to the attention or the feed-forward sub-layers of a BERT-style encoder (issue 6's design
# space ablation); "all" is the default: every weight, embeddings included.
DIFF_PLACEMENTS = {
    "all": None,
    "attn": r".*\.attention\..*(query|key|value|dense|LayerNorm)",
    "ffn": r".*\.(intermediate\.dense|layer\.\d+\.output\.(dense|LayerNorm))",
}
# Where each method's trained weights are saved (the stored bytes reported in results.json).
WEIGHTS_FILES = {"full": "model.safetensors", "bitfit": "bitfit_model.safetensors"}


def build_full(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    return model


def build_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.1,
        target_modules=args.lora_target_modules,
    )
    return get_peft_model(model, config)


def build_supertuning(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    # Every linear layer, so that the top-|W| support is chosen across the whole encoder as diff pruning's is.
    config = SupertuningConfig(
        task_type="SEQ_CLS", target_modules=["query", "key", "value", "dense"], sparsity=args.supertuning_sparsity
    )
    return get_peft_model(model, config)


def build_bitfit(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """BitFit: only the biases and the task head train; saved as a plain state dict of those tensors."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    return model


def build_prefix(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    # PEFT's prefix tuning hands its prefixes to the model as past_key_values; BERT-style encoders stopped accepting
    # them in transformers 5.24, where PEFT then fails mid-forward. Say so before training.
    backbone = getattr(model, model.base_model_prefix, model)
    if not any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone)):
        raise SystemExit(
            f"--method prefix: PEFT's prefix tuning passes its prefixes as past_key_values, which "
            f"{type(backbone).__name__}.forward does not take in transformers {transformers.__version__} (encoders "
            "dropped them in 5.24). Use transformers<5.24 for this baseline, or --method mam, whose prefix goes "
            "through the attention interface."
        )
    return get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=args.num_virtual_tokens))


def build_parallel_adapter(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    config = ParallelAdapterConfig(
        task_type="SEQ_CLS", r=args.adapter_r, scaling=args.adapter_scaling, placement=args.adapter_placement
    )
    return get_peft_model(model, config)


def build_mam(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    config = MAMConfig(
        task_type="SEQ_CLS", prefix_length=args.prefix_length, r=args.adapter_r, scaling=args.adapter_scaling
    )
    return get_peft_model(model, config)


# The model each single-stage method trains (non-adaptive diff pruning's first stage is full fine-tuning).
BUILDERS = {
    "full": build_full,
    "non_adaptive": build_full,
    "lora": build_lora,
    "supertuning": build_supertuning,
    "bitfit": build_bitfit,
    "prefix": build_prefix,
    "parallel_adapter": build_parallel_adapter,
    "mam": build_mam,
}
