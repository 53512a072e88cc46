"""Peak memory and step time of the gated stage over a candidate pool, beside full fine-tuning, LoRA all-linear r=8
and the dense gated stage (issue 15), on CPU.

The methods run as `train_step.py`'s workers (one process each, interleaved rounds, time ratios to full
fine-tuning in the same round, peak RSS while training); `pool` is the gated stage with
`DiffPruningConfig(candidate_pool=...)`, its pool chosen by `select_pool` from the two benchmark batches before the
peak count starts. The one-off costs of the pool (the peak RSS of choosing it, the time of one regrowth with a
tenth of its gates closed) are measured in a worker of their own.

    python benchmarks/pool_memory.py --model minilm --batch_size 32 --seq_len 128 --rounds 6 --warmup 2 \
        --output benchmarks/results/pool_memory_minilm.json
    flock /work/wt/big.lock python benchmarks/pool_memory.py --model bert-base --batch_size 8 --seq_len 128 \
        --rounds 4 --warmup 1 --max_workers 2 --output benchmarks/results/pool_memory_bert_base.json

With `--heap_bytes` every worker also counts its live heap bytes (`heap_count.c`): every tensor and whatever else
malloc hands out, without what an allocator keeps after a free, so the peaks compare across allocators.

With `--max_workers 2` each method runs beside its own full fine-tuning worker (BERT-base's dense gated stage and
full fine-tuning take 9 GB together; four workers at once would not fit the machine beside other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import train_step
from _record import ALLOCATORS, HeapBytes, allocator_env, heap_count_env, release_free_memory, write_record


METHODS = ("full", "lora_all_r8", "diff_pruning", "pool")
#: The pool with the sampled weight gradient's operands transposed whole, on one thread, as `sampled_addmm` does itself
#: when given views (the code before `functional._transposed`): for an A/B of the blocked transposes in one run.
WHOLE_TRANSPOSES = "pool_whole_transposes"
#: The pool with `sampled_addmm` for every sampled weight gradient, whatever the density (the code before
#: `functional.DENSE_PRODUCT_DENSITY`): for an A/B of the kernel rule in one run.
SAMPLED_ONLY = "pool_sampled_addmm"
#: Suffixes of a method trained with the model's activation checkpointing, enabled before choosing a pool (which
#: then checkpoints too): `_checkpointed` recomputes each layer whole (`gradient_checkpointing_enable()`),
#: `_selective` keeps the matrix products and recomputes the rest (`peft_diffprune.selective_checkpointing()`).
#: Full fine-tuning's activations alone are 0.3x its peak on BERT-base: the pool needs one of them for 0.60x.
CHECKPOINTED = "_checkpointed"
SELECTIVE = "_selective"
#: Suffix of a method trained with `peft_diffprune.enable_lean_activations` (no checkpointing, the same gradients);
#: `LEAN_CHEAP` with the recipes that cost least time only (no masks, no activation outputs: norms and products).
LEAN = "_lean"
LEAN_CHEAP = "_lean_cheap"
#: Suffix (outermost) of a method trained with `peft_diffprune.enable_threaded_dropout`: dropout masks drawn over
#: threads and kept as bits (other masks than torch's, the same dropout).
THREADED = "_threaded"
CHEAP_RECIPES = ("norms", "products")
_build = train_step.build


def checkpointing_kwargs(method: str) -> tuple[str, dict | None]:
    """`(method without its checkpointing suffix, gradient_checkpointing_kwargs or None for no checkpointing)`."""
    from peft_diffprune import selective_checkpointing

    if method.endswith(CHECKPOINTED):
        return method.removesuffix(CHECKPOINTED), {"use_reentrant": False}
    if method.endswith(SELECTIVE):
        return method.removesuffix(SELECTIVE), selective_checkpointing()
    return method, None


def lean_kwargs(method: str) -> tuple[str, bool, tuple[str, ...] | None]:
    """`(method without its lean suffix, whether it is lean, its recipes: None for all)`."""
    if method.endswith(LEAN_CHEAP):
        return method.removesuffix(LEAN_CHEAP), True, CHEAP_RECIPES
    return method.removesuffix(LEAN), method.endswith(LEAN), None


def build(method: str, model_name: str, dtype: str = "fp32", optimizer: str = "fused", pool: float = 4.0):
    """`train_step.build`, plus `pool`: the gated stage over a candidate pool `pool` times the 0.5% budget (and
    `WHOLE_TRANSPOSES`, `SAMPLED_ONLY`, and any method with the suffix `CHECKPOINTED`, `SELECTIVE` or `LEAN`, then
    `THREADED`).
    A pool's checkpointing and lean activations are on before the pool is chosen, as `examples/glue.py` does, so
    choosing it is measured with them."""
    from peft_diffprune import enable_lean_activations, enable_threaded_dropout

    if method.endswith(THREADED):
        model, optimizer = build(method.removesuffix(THREADED), model_name, dtype, optimizer, pool)
        enable_threaded_dropout(model)
        return model, optimizer
    method, lean, recipes = lean_kwargs(method)
    method, checkpointing = checkpointing_kwargs(method)
    if method != "pool":
        model, optimizer = _build_other(method, model_name, dtype, optimizer, pool)
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        if lean:
            enable_lean_activations(model, recipes)
        return model, optimizer
    from peft import get_peft_model

    from peft_diffprune import DiffPruningConfig, param_groups, select_pool

    model = train_step.load_base(model_name, dtype)
    config = DiffPruningConfig(task_type="SEQ_CLS", candidate_pool=pool, pool_score_batches=2)
    model = get_peft_model(model, config, autocast_adapter_dtype=dtype == "fp32")
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if lean:
        enable_lean_activations(model, recipes)
    select_pool(model, train_step.make_batches(model.config.vocab_size, *BATCH_SHAPE)[:SCORE_BATCHES])
    return model, train_step.make_optimizer(param_groups(model, lr=1e-5, alpha_lr=0.1), optimizer)


def _build_other(method: str, model_name: str, dtype: str, optimizer: str, pool: float):
    """Every method but the plain pool: `WHOLE_TRANSPOSES` and `SAMPLED_ONLY` are the pool with a kernel patched."""
    if method in (WHOLE_TRANSPOSES, SAMPLED_ONLY):
        from peft_diffprune.diff_pruning import functional

        if method == WHOLE_TRANSPOSES:
            functional._transposed = lambda matrix: matrix.t().contiguous()
        else:
            functional.DENSE_PRODUCT_DENSITY = float("inf")
        return build("pool", model_name, dtype, optimizer, pool)
    return _build(method, model_name, dtype, optimizer)


def released(built):
    """`built`, after handing what building it freed back to the system: a caching allocator (tcmalloc) would keep
    choosing the pool's memory resident, and the training peak would be the selection's (measured on its own,
    `one_off_costs`, and in `stage_peak_rss_mib`)."""
    release_free_memory()
    return built


class PoolWorker(train_step.Worker):
    """`train_step.Worker` running this script, whose workers know the `pool` method; `env` replaces the worker's
    environment (`ab_checkouts.py` points `PYTHONPATH` at another checkout)."""

    def __init__(self, method: str, settings: dict, env: dict | None = None):
        cmd = [sys.executable, __file__, "--method", method, *[f"--{k}={v}" for k, v in settings.items()]]
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self.ask(None)


BATCH_SHAPE = (32, 128)
#: How many of the two benchmark batches choose and regrow the pool (`--score_batches`).
SCORE_BATCHES = 2


def one_off_costs(args) -> None:
    """Print the peak RSS of building the pool model (choosing the pool included) and the time of one regrowth."""
    from peft_diffprune import regrow_pool

    torch.set_num_threads(args.threads)
    heap = HeapBytes() if HeapBytes.loaded() else None
    model, optimizer = build(args.method or "pool", args.model, args.dtype, args.optimizer, args.pool)
    selection_peak = train_step.status_mib("VmHWM")
    selection_heap_peak = heap.peak_mib() if heap is not None else None
    batches = train_step.make_batches(model.config.vocab_size, *BATCH_SHAPE)
    model.train()
    train_step.train_step(model, optimizer, batches[0])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_alpha"):
                param[torch.arange(0, param.numel(), 10)] = -5.0
    start = time.perf_counter()
    regrown = regrow_pool(model, batches[:SCORE_BATCHES], optimizer)
    pool_entries = sum(p.numel() for n, p in model.named_parameters() if n.endswith("_alpha"))
    costs = {
        "pool_entries": pool_entries,
        "selection_peak_rss_mib": selection_peak,
        "regrow_seconds": time.perf_counter() - start,
        "regrown": regrown,
        "peak_rss_after_regrow_mib": train_step.status_mib("VmHWM"),
    }
    if heap is not None:  # peaks since the process started, as VmHWM's
        costs.update(selection_peak_heap_mib=selection_heap_peak, peak_heap_after_regrow_mib=heap.peak_mib())
    print(json.dumps(costs), flush=True)


def alone(method: str, settings: dict, rounds: int, warmup: int) -> dict:
    """Step times and peak RSS of one method in its own worker, with no reference beside it: for a configuration
    that must stay under the machine's per-process memory limit while its reference would not (BERT-base's full
    fine-tuning takes more than 3 GiB); compare with a reference measured elsewhere."""
    worker = PoolWorker(method, settings)
    try:
        times = [worker.ask("step")["step_time_s"] for _ in range(warmup + rounds)][warmup:]
        return {"step_time_s": sorted(times)[len(times) // 2], "step_times_s": times, **worker.ready, **worker.close()}
    finally:
        worker.process.kill()


def main() -> None:
    global BATCH_SHAPE, SCORE_BATCHES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", help="run one method as a worker (internal)")
    parser.add_argument("--one_off", action="store_true", help="measure the pool's one-off costs (internal)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=[
            *METHODS,
            WHOLE_TRANSPOSES,
            SAMPLED_ONLY,
            *(m + x for m in METHODS for x in (CHECKPOINTED, SELECTIVE, LEAN, LEAN_CHEAP)),
            *(m + THREADED for m in METHODS),
            *(m + x + THREADED for m in METHODS for x in (CHECKPOINTED, SELECTIVE, LEAN, LEAN_CHEAP)),
        ],
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=train_step.DTYPES, default="fp32")
    parser.add_argument("--optimizer", choices=train_step.OPTIMIZERS, default="fused")
    parser.add_argument(
        "--full_optimizer",
        choices=train_step.OPTIMIZERS,
        default=None,
        help="full fine-tuning's AdamW (--optimizer's)",
    )
    parser.add_argument("--pool", type=float, default=4.0, help="pool size as a multiple of the 0.5%% budget")
    parser.add_argument("--max_workers", type=int, default=len(METHODS), help="workers alive at once (train_step)")
    parser.add_argument(
        "--alone", action="store_true", help="run the methods one after another without a reference (no ratios)"
    )
    parser.add_argument(
        "--allocator",
        choices=list(ALLOCATORS),
        default="glibc",
        help="the workers' allocator (LD_PRELOAD; the default is glibc's heap)",
    )
    parser.add_argument(
        "--score_batches",
        type=int,
        choices=(1, 2),
        default=2,
        help="benchmark batches that choose and regrow the pool (the recipe's pool_score_batches; default 2)",
    )
    parser.add_argument(
        "--heap_bytes",
        action="store_true",
        help="also count each worker's peak of live heap bytes (heap_count.c; glibc's allocator only)",
    )
    parser.add_argument("--output", default="benchmarks/results/pool_memory.json")
    args = parser.parse_args()
    if args.heap_bytes and args.allocator != "glibc":
        parser.error("--heap_bytes counts glibc's heap: leave --allocator at glibc")
    BATCH_SHAPE, SCORE_BATCHES = (args.batch_size, args.seq_len), args.score_batches
    train_step.build = lambda method, *rest: released(build(method, *rest, pool=args.pool))
    if args.one_off:
        one_off_costs(args)
        return
    if args.method:
        train_step.worker(args)
        return
    torch.set_num_threads(args.threads)
    os.environ.update(allocator_env(args.allocator))  # inherited by every worker started below
    if args.heap_bytes:
        os.environ.update(heap_count_env())
    settings = {
        k: getattr(args, k)
        for k in ("model", "batch_size", "seq_len", "threads", "dtype", "optimizer", "pool", "score_batches")
    }
    train_step.Worker = PoolWorker  # `measure` starts its workers through this name
    if args.alone:
        results = {method: alone(method, settings, args.rounds, args.warmup) for method in args.methods}
    else:
        results = train_step.measure(args.methods, settings, args.rounds, args.warmup, args.max_workers)
    for method in args.methods:
        if checkpointing_kwargs(lean_kwargs(method.removesuffix(THREADED))[0])[0] != "pool":
            continue
        one_off = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one_off",
                f"--method={method}",
                *[f"--{k}={v}" for k, v in settings.items()],
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[method]["one_off"] = json.loads(one_off.stdout.strip().splitlines()[-1])
        # the gated stage's peak: choosing the pool, training it or regrowing it, whichever is highest
        one_off = results[method]["one_off"]
        stage_peak = max(
            results[method]["peak_rss_mib"], one_off["selection_peak_rss_mib"], one_off["peak_rss_after_regrow_mib"]
        )
        results[method]["stage_peak_rss_mib"] = stage_peak
        if "full" in results:
            results[method]["stage_peak_rss_ratio"] = stage_peak / results["full"]["peak_rss_mib"]
        if "peak_heap_mib" in results[method]:
            stage_heap = max(
                results[method]["peak_heap_mib"],
                one_off["selection_peak_heap_mib"],
                one_off["peak_heap_after_regrow_mib"],
            )
            results[method]["stage_peak_heap_mib"] = stage_heap
            if "full" in results:
                results[method]["stage_peak_heap_ratio"] = stage_heap / results["full"]["peak_heap_mib"]
    record = {**settings, "rounds": args.rounds, "warmup": args.warmup, "max_workers": args.max_workers}
    record.update(allocator=args.allocator, LD_PRELOAD=os.environ.get("LD_PRELOAD"), heap_bytes=args.heap_bytes)
    write_record(args.output, record, results)


if __name__ == "__main__":
    main()
