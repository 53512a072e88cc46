#!/usr/bin/env python
"""Instruction tuning with diff pruning and TRL's SFTTrainer, on a tiny Llama built in code (nothing downloaded).

    python examples/sft.py --output_dir /tmp/sft_dp

`DiffPruningSFTTrainer` is TRL's `SFTTrainer` running the whole recipe: the gated stage, projection to
`--target_sparsity`, the fixed-mask stage. The loss is on the completions only (TRL's prompt-completion format). Swap
the tiny model, tokenizer and dataset for real ones (`AutoModelForCausalLM.from_pretrained(...)`, a Hub dataset) and
the rest stays as it is. See docs/training.md.
"""

import argparse

import torch
from datasets import Dataset
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

from peft_diffprune import DiffPruningConfig, DiffPruningSchedule
from peft_diffprune.recipe.sft import DiffPruningSFTTrainer


# A toy instruction set: name the colour of a thing, or the opposite of a word.
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "light": "dark", "old": "new"}


def instruction_dataset() -> Dataset:
    prompts = [f"what colour is {thing} ?" for thing in COLOURS] + [f"opposite of {word} ?" for word in OPPOSITES]
    completions = [f" {colour}" for colour in COLOURS.values()] + [f" {word}" for word in OPPOSITES.values()]
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def word_tokenizer(dataset: Dataset) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the dataset's words, with the special tokens SFTTrainer needs."""
    words = sorted({word for row in dataset for word in (row["prompt"] + row["completion"]).split()})
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        # a tied LM head shares the embedding's diff: left to the method; keep them apart here
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/sft_diff_pruning")
    parser.add_argument("--learning_rate", type=float, default=1e-2, help="Peak lr of the diffs, decaying linearly.")
    parser.add_argument("--alpha_learning_rate", type=float, default=0.1, help="Constant lr of the gate logits.")
    parser.add_argument("--l0_lambda", type=float, default=1e-4, help="Weight of the expected-L0 penalty.")
    parser.add_argument("--target_sparsity", type=float, default=0.05, help="Fraction of parameters kept.")
    parser.add_argument("--max_steps", type=int, default=60, help="Optimizer steps of the gated stage.")
    parser.add_argument("--fixmask_max_steps", type=int, default=30, help="Optimizer steps of the fixed-mask stage.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (SFTConfig's default); fp32 otherwise.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> DiffPruningSFTTrainer:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dataset = instruction_dataset()
    tokenizer = word_tokenizer(dataset)
    # TRL's fused LM head multiplies by `lm_head.weight` directly, so a diff there would never train: leave it out
    config = DiffPruningConfig(
        task_type="CAUSAL_LM",
        target_sparsity=args.target_sparsity,
        l0_lambda=args.l0_lambda,
        exclude_modules=["lm_head"],
    )
    model = get_peft_model(tiny_llama(tokenizer), config)

    training_args = SFTConfig(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        bf16=args.bf16,
        max_length=16,
    )
    schedule = DiffPruningSchedule(
        alpha_learning_rate=args.alpha_learning_rate, fixmask_max_steps=args.fixmask_max_steps
    )
    trainer = DiffPruningSFTTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, diff_pruning=schedule
    )
    trainer.train()
    trainer.save_model()

    model.eval()
    for row in dataset.select(range(3)):
        inputs = tokenizer(row["prompt"], return_tensors="pt").to(model.device)
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"{row['prompt']} -> {answer} (expected{row['completion']})")
    print(f"Sparse adapter saved to {args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
