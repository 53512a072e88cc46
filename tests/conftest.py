"""Tiny random models and batches shared by the diff pruning tests.

Every factory builds a seeded, dropout-free model (hidden size 16, two layers, vocabulary 100) from a config, so
nothing is downloaded and train-mode outputs are deterministic apart from the sampled gates.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)


VOCAB_SIZE = 100
BATCH_SIZE = 2
SEQ_LEN = 8
IMAGE_SIZE = 16
NUM_LABELS = 3

REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO_ROOT.parent / "shared" / "data" / "glue"))

# On models this small, synchronising threads costs more than the matrix products (several times slower on a busy
# 2-core machine); tests on a real model raise the count again.
torch.set_num_threads(1)


def _bert() -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_LABELS,
    )
    return BertForSequenceClassification(config)


def _roberta() -> nn.Module:
    config = RobertaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_LABELS,
        pad_token_id=1,
    )
    return RobertaForSequenceClassification(config)


def _gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _t5() -> nn.Module:
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


#: Sizes shared by the decoder-only causal LMs (Llama, Qwen2, Mistral).
DECODER_SIZES = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}


def _llama(tie_word_embeddings: bool = False) -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(**DECODER_SIZES, tie_word_embeddings=tie_word_embeddings))


def _llama_tied() -> nn.Module:
    return _llama(tie_word_embeddings=True)


def _qwen2() -> nn.Module:
    return Qwen2ForCausalLM(Qwen2Config(**DECODER_SIZES, attention_dropout=0.0))


def _mistral() -> nn.Module:
    return MistralForCausalLM(MistralConfig(**DECODER_SIZES, attention_dropout=0.0, sliding_window=None))


def _vit() -> nn.Module:
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_LABELS,
    )
    return ViTForImageClassification(config)


def _token_batch(generator: torch.Generator, with_mask: bool = True) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN), generator=generator)
    batch = {"input_ids": input_ids}
    if with_mask:
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -2:] = 0  # some padding, so masks are exercised
        batch["attention_mask"] = attention_mask
    return batch


def _classification_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_token_batch(generator), "labels": torch.randint(0, NUM_LABELS, (BATCH_SIZE,), generator=generator)}


def _causal_lm_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch = _token_batch(generator)
    return {**batch, "labels": batch["input_ids"].clone()}


def _seq2seq_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    labels = torch.randint(3, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN // 2), generator=generator)
    return {**_token_batch(generator), "labels": labels}


def _image_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.randn(BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "labels": torch.randint(0, NUM_LABELS, (BATCH_SIZE,), generator=generator),
    }


@dataclass(frozen=True)
class ModelCase:
    """A tiny model family: how to build it, its PEFT task type, its task head and a matching batch.

    `subset_targets` is an explicit `target_modules` list covering a linear-like layer and a norm layer.
    """

    name: str
    build: Callable[[], nn.Module]
    task_type: str | None
    make_batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    head: tuple[str, ...]
    subset_targets: tuple[str, ...]

    def model(self, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
        torch.manual_seed(seed)
        model = self.build()
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def batch(self, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.make_batch(torch.Generator().manual_seed(seed))


MODEL_CASES = {
    case.name: case
    for case in (
        ModelCase("bert", _bert, "SEQ_CLS", _classification_batch, ("classifier",), ("query", "LayerNorm")),
        ModelCase(
            "roberta", _roberta, "SEQ_CLS", _classification_batch, ("classifier",), ("value", "word_embeddings")
        ),
        ModelCase("gpt2", _gpt2, "CAUSAL_LM", _causal_lm_batch, (), ("c_attn", "ln_1")),
        ModelCase("t5", _t5, "SEQ_2_SEQ_LM", _seq2seq_batch, (), ("q", "layer_norm", "relative_attention_bias")),
        ModelCase("llama", _llama, "CAUSAL_LM", _causal_lm_batch, (), ("q_proj", "input_layernorm")),
        ModelCase("vit", _vit, "SEQ_CLS", _image_batch, ("classifier",), ("patch_embeddings.projection", "query")),
    )
}


#: Causal LMs for the end-to-end tests (not in MODEL_CASES, so the lifecycle table stays as fast as it is).
CAUSAL_LM_CASES = {
    case.name: case
    for case in (
        MODEL_CASES["gpt2"],
        MODEL_CASES["llama"],
        ModelCase("llama_tied", _llama_tied, "CAUSAL_LM", _causal_lm_batch, (), ("q_proj", "input_layernorm")),
        ModelCase("qwen2", _qwen2, "CAUSAL_LM", _causal_lm_batch, (), ("q_proj", "input_layernorm")),
        ModelCase("mistral", _mistral, "CAUSAL_LM", _causal_lm_batch, (), ("q_proj", "input_layernorm")),
    )
}


def adapted_models(model_name: str, config) -> tuple[nn.Module, nn.Module]:
    """A reference copy of a tiny base model and the PEFT model `config` makes of it, both in eval mode."""
    from peft import get_peft_model

    base = MODEL_CASES[model_name].model()
    reference = copy.deepcopy(base)
    return reference.eval(), get_peft_model(base, config).eval()


def no_grad_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # labels stay in the batch: T5 builds its decoder inputs from them
    with torch.no_grad():
        return model(**batch).logits


def training_losses(model: nn.Module, batch: dict[str, torch.Tensor], optimizer, steps: int = 4) -> list[float]:
    """The loss of each of `steps` optimizer steps on one batch, in training mode, gate noise seeded per step."""
    model.train()
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        loss = model(**batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses
