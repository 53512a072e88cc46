"""Where the memory of a training step goes: full fine-tuning against the gated stage over a candidate pool, by part.

For each method, in a worker process of its own: the resident memory of the process and the loaded model, the bytes
of the trainable parameters, buffers, gradients and optimizer moments, the bytes autograd saves for backward in one
training forward (shared storage counted once, parameters and buffers left out: activations and per-step copies),
and the peak RSS of training steps. `--allocators live` sets `MALLOC_MMAP_THRESHOLD_=65536` in the workers, so that glibc maps and unmaps every
tensor of 64 KiB or more and the RSS follows the live bytes; `default` leaves glibc's dynamic threshold, whose heap
keeps freed memory (what a user sees).

    python benchmarks/pool_memory_parts.py --model bert-base --batch_size 8 --seq_len 128 --pool 16 \
        --output benchmarks/results/pool_memory_parts_bert_base.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import train_step
from _record import write_record


MIB = 2**20


def _storage_mib(tensors) -> float:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / MIB


def measure(method: str, model_name: str, batch_size: int, seq_len: int, pool: float, steps: int) -> dict:
    from peft import get_peft_model

    from peft_diffprune import DiffPruningConfig, param_groups, select_pool

    runtime = train_step.status_mib("VmRSS")
    batches = None
    selection_peak = None
    if method == "pool":
        model = train_step.load_base(model_name)
        config = DiffPruningConfig(task_type="SEQ_CLS", candidate_pool=pool, pool_score_batches=2)
        model = get_peft_model(model, config)
        batches = train_step.make_batches(model.config.vocab_size, batch_size, seq_len)
        loaded = train_step.status_mib("VmRSS")
        train_step.reset_peak_rss()
        select_pool(model, batches)
        selection_peak = train_step.status_mib("VmHWM")
        optimizer = train_step.make_optimizer(param_groups(model, lr=1e-5, alpha_lr=0.1), "fused")
    else:
        model, optimizer = train_step.build(method, model_name, "fp32", "fused")
        loaded = train_step.status_mib("VmRSS")
    batches = batches or train_step.make_batches(model.config.vocab_size, batch_size, seq_len)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # parameters and buffers are counted on their own: what is left is activations and per-step copies
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batches[0]).loss
    kept = [t for t in saved if t.untyped_storage().data_ptr() not in held]
    by_width: dict[str, list] = {}
    for tensor in kept:
        width = "scalars" if tensor.dim() == 0 else f"last dim {tensor.shape[-1]}" if tensor.dim() > 1 else "1-d"
        by_width.setdefault(width, []).append(tensor)
    saved_parts = {width: round(_storage_mib(ts), 1) for width, ts in by_width.items()}
    saved_parts = {width: mib for width, mib in saved_parts.items() if mib >= 1}
    saved_mib = _storage_mib(kept)
    loss.backward()
    saved.clear()
    del loss, kept, by_width
    grads_mib = _storage_mib([p.grad for p in trainable if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    moments = [v for p in trainable for v in optimizer.state[p].values() if torch.is_tensor(v) and v.dim()]
    before_training = train_step.status_mib("VmRSS")
    train_step.reset_peak_rss()
    for step in range(steps):
        train_step.train_step(model, optimizer, batches[step % len(batches)])
    return {
        "rss_runtime_mib": runtime,
        "rss_loaded_mib": loaded,
        "selection_peak_rss_mib": selection_peak,
        "trainable_mib": _storage_mib(trainable),
        "buffers_mib": _storage_mib(list(model.buffers())),
        "gradients_mib": grads_mib,
        "optimizer_moments_mib": _storage_mib(moments),
        "saved_for_backward_mib": saved_mib,
        "saved_for_backward_by_shape_mib": saved_parts,
        "rss_before_training_mib": before_training,
        "training_peak_rss_mib": train_step.status_mib("VmHWM"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", help="run one method as a worker (internal)")
    parser.add_argument("--methods", nargs="+", default=["full", "pool"], choices=["full", "pool", "lora_all_r8"])
    parser.add_argument("--allocators", nargs="+", default=["default", "live"], choices=["default", "live"])
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--pool", type=float, default=16.0, help="pool size as a multiple of the 0.5%% budget")
    parser.add_argument("--steps", type=int, default=3, help="training steps in the peak count")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/pool_memory_parts.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.method:
        result = measure(args.method, args.model, args.batch_size, args.seq_len, args.pool, args.steps)
        print(json.dumps(result), flush=True)
        return
    settings = [f"--{k}={getattr(args, k)}" for k in ("model", "batch_size", "seq_len", "pool", "steps", "threads")]
    results = {}
    for allocator in args.allocators:
        env = dict(os.environ)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if allocator == "live":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        for method in args.methods:
            cmd = [sys.executable, __file__, "--method", method, *settings]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            results[f"{method}/{allocator}"] = json.loads(out.strip().splitlines()[-1])
        full = results.get(f"full/{allocator}")
        for method in args.methods:
            row = results[f"{method}/{allocator}"]
            if full is not None:
                row["training_peak_ratio"] = row["training_peak_rss_mib"] / full["training_peak_rss_mib"]
                peak = max(row["training_peak_rss_mib"], row["selection_peak_rss_mib"] or 0)
                row["process_peak_ratio"] = peak / full["training_peak_rss_mib"]
            print(method, allocator, json.dumps(row), flush=True)
    settings = {k: getattr(args, k) for k in ("model", "batch_size", "seq_len", "pool", "steps", "threads")}
    write_record(args.output, settings, results)


if __name__ == "__main__":
    main()
