"""Peak memory per rank under FSDP2 with 2 processes against one process training the same model on the same batch.

For each method (full fine-tuning, the gated stage) and each round, one single-process run and one 2-rank FSDP2 run
(torchrun, gloo, `fully_shard` on each encoder layer, on the embeddings and on the root; each rank takes half of
every batch, so the two runs train on the same global batches) take turns. Each process builds its model in full,
shards it, frees what sharding left behind (`gc`, then `malloc_trim` or the `--allocator`'s own call), then counts
its peak RSS over each phase of each training step (forward, backward, optimizer; `/proc/self/clear_refs` at the
start of each, as train_step.py does), so that the peak covers the training steps only, the warm-up step and the
timed ones, and says in which phase it is. A ratio is a rank's peak over the single process's peak in the same
round (the larger of the two ranks, and the median over rounds).

With `MALLOC_MMAP_THRESHOLD_` set (recorded in the settings), glibc hands every freed block above it back to the
system, so that the peak RSS comes close to the peak of live bytes.

With `--heap_bytes` each process also counts its live heap bytes at every malloc and free (`heap_count.c`,
`_record.HeapBytes`): every tensor's bytes and whatever else malloc hands out, without the libraries' code and data
(about 330 MiB of the process here, which no sharding halves) and without what the heap keeps after a free: the
nearest thing on CPU to a GPU's `torch.cuda.max_memory_allocated`.

    python benchmarks/fsdp_memory.py --output benchmarks/results/fsdp_memory.json
    python benchmarks/fsdp_memory.py --model bert-base --batch_size 8 --rows --rounds 1 \
        --output benchmarks/results/fsdp_memory_bert_base_rows.json
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/fsdp_memory.py --rounds 1 --output benchmarks/results/fsdp_memory_mmap.json
    python benchmarks/fsdp_memory.py --heap_bytes --rounds 1 --output benchmarks/results/fsdp_memory_heap.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _record import ALLOCATORS, HeapBytes, allocator_env, heap_count_env, release_free_memory, write_record
from train_step import build, make_batches, make_optimizer, reset_peak_rss, status_mib


METHODS = ("full", "diff_pruning")


def shard(model: torch.nn.Module, rows: bool, units: str) -> None:
    """FSDP2 units: every encoder layer (`units="layer"`) or each of its attention, intermediate and output blocks
    (`"sublayer"`: a third of a layer's parameters gathered at a time), the embeddings (the largest tensors) and the
    root; with `rows`, the word embedding of a diff pruning model is sharded by rows instead
    (`shard_embedding_rows`) and left out of FSDP."""
    from torch.distributed.fsdp import fully_shard

    from peft_diffprune import shard_embedding_rows

    ignored = shard_embedding_rows(model) if rows else None
    bert = model.bert if hasattr(model, "bert") else model.base_model.model.bert
    for layer in bert.encoder.layer:
        for block in [layer] if units == "layer" else [layer.attention, layer.intermediate, layer.output]:
            fully_shard(block)
    fully_shard(bert.embeddings, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def phased_step(model, optimizer, batch, heap: HeapBytes | None = None) -> tuple[dict, dict]:
    """One training step; the peak RSS of each of its phases (forward, backward, optimizer step), each counted from
    its start (`/proc/self/clear_refs`): their maximum is the step's peak, and they say where it is. With `heap`,
    also each phase's peak of live heap bytes (else an empty dict)."""
    rss, heap_peaks = {}, {}

    def start() -> None:
        reset_peak_rss()
        if heap is not None:
            heap.reset_peak()

    def end(phase: str) -> None:
        rss[phase] = status_mib("VmHWM")
        if heap is not None:
            heap_peaks[phase] = heap.peak_mib()

    start()
    loss = model(**batch).loss
    end("forward")
    start()
    loss.backward()
    end("backward")
    start()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end("optimizer")
    return rss, heap_peaks


def worker(args) -> None:
    """One process of a run: build, shard if there are several ranks, train, write this rank's peak RSS."""
    import torch.distributed as dist

    from peft_diffprune import param_groups

    torch.set_num_threads(args.threads)
    heap = HeapBytes() if HeapBytes.loaded() else None  # the parent's --heap_bytes preloads the counter
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model, optimizer = build(args.method, args.model, "fp32", "default")
    del optimizer  # it holds the unsharded parameters: made again below, over the shards
    if world > 1:
        shard(model, args.rows and args.method != "full", args.units)
    params = model.parameters() if args.method == "full" else param_groups(model, lr=1e-5, alpha_lr=0.1)
    optimizer = make_optimizer(
        params, "default", **({"lr": 1e-5, "weight_decay": 0.0} if args.method == "full" else {})
    )
    share = args.batch_size // world
    batches = [
        {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}
        for batch in make_batches(model.config.vocab_size, args.batch_size, args.seq_len)
    ]
    model.train()
    gc.collect()
    release_free_memory()  # hand back what the unsharded model left, as loading shards would
    rss_before = status_mib("VmRSS")
    heap_before = heap.live_mib() if heap is not None else None
    times, phases, heap_phases = [], [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        rss, heap_peaks = phased_step(model, optimizer, batches[step % 2], heap)
        phases.append(rss)
        heap_phases.append(heap_peaks)
        times.append(time.perf_counter() - start)
    peak = max(peak for step in phases for peak in step.values())
    record = {
        "rank": rank,
        "peak_rss_mib": peak,
        "rss_before_training_mib": rss_before,
        "step_times_s": times,
        "phase_peaks_mib": phases,
    }
    if heap is not None:
        record["heap_before_training_mib"] = heap_before
        record["heap_phase_peaks_mib"] = heap_phases
        record["peak_heap_mib"] = max(peak for step in heap_phases for peak in step.values())
    Path(args.out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def run(method: str, processes: int, args) -> list[dict]:
    """One run of `method` on `processes` ranks: each rank's record."""
    with tempfile.TemporaryDirectory() as out_dir:
        settings = [f"--{k}={getattr(args, k)}" for k in ("model", "batch_size", "seq_len", "threads", "steps")]
        settings += [f"--units={args.units}"] + (["--rows"] if args.rows else [])
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port=29731"]
            + [__file__, "--worker", f"--method={method}", f"--out_dir={out_dir}", f"--warmup={args.warmup}"]
            + settings,
            check=True,
            env=dict(os.environ, **allocator_env(args.allocator), **(heap_count_env() if args.heap_bytes else {})),
        )
        return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="run as one rank (internal)")
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--out_dir")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--model", default="minilm", help="minilm, bert-base or tiny (see train_step.py)")
    parser.add_argument("--batch_size", type=int, default=32, help="the global batch: each rank takes its share")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps after the warm-up, all within the peak")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument(
        "--rows", action="store_true", help="shard the gated stage's word embedding by rows (shard_embedding_rows)"
    )
    parser.add_argument("--units", choices=("layer", "sublayer"), default="layer", help="FSDP2 units (see shard)")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="glibc", help="the ranks' allocator")
    parser.add_argument(
        "--heap_bytes",
        action="store_true",
        help="also count each process's peak of live heap bytes (heap_count.c, glibc's allocator only)",
    )
    parser.add_argument("--output", default="benchmarks/results/fsdp_memory.json")
    args = parser.parse_args()
    if args.heap_bytes and args.allocator != "glibc":
        parser.error("--heap_bytes counts glibc's heap: leave --allocator at glibc")
    if args.worker:
        worker(args)
        return
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "batch_size",
            "seq_len",
            "rounds",
            "steps",
            "warmup",
            "threads",
            "rows",
            "units",
            "heap_bytes",
        )
    }
    # glibc keeps freed blocks below its (adaptive) mmap threshold: fixing the threshold shows the live bytes' peak
    settings["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    # gates drawn again in backward instead of kept: under FSDP every rank keeps the gates of whole tensors
    settings["PEFT_DIFFPRUNE_REDRAW_GATES"] = os.environ.get("PEFT_DIFFPRUNE_REDRAW_GATES")
    settings["allocator"] = args.allocator
    runs = {method: {"single": [], "fsdp2": []} for method in args.methods}
    for round_index in range(args.rounds):
        for method in args.methods:
            for kind, processes in (("single", 1), ("fsdp2", 2)):
                load = os.getloadavg()[0]
                ranks = run(method, processes, args)
                runs[method][kind].append({"ranks": ranks, "load_average": [load, os.getloadavg()[0]]})
                write_record(args.output, settings, {"unfinished_runs": runs})
                peaks = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in ranks)
                heaps = ", ".join(f"{r['peak_heap_mib']:.0f}" for r in ranks if "peak_heap_mib" in r)
                heaps = f", live heap {heaps} MiB" if heaps else ""
                print(f"round {round_index} {method:12s} {kind:6s} peak RSS per rank {peaks} MiB{heaps}", flush=True)
    results = {}
    for method, kinds in runs.items():
        single = [r["ranks"][0]["peak_rss_mib"] for r in kinds["single"]]
        per_rank = [max(rank["peak_rss_mib"] for rank in r["ranks"]) for r in kinds["fsdp2"]]
        ratios = [p / s for p, s in zip(per_rank, single, strict=True)]
        results[method] = {
            "single_process_peak_rss_mib": statistics.median(single),
            "fsdp2_peak_rss_mib_per_rank": statistics.median(per_rank),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "runs": kinds,
        }
        print(f"{method:12s} per-rank peak / single-process peak x{results[method]['ratio']:.3f}", flush=True)
        if args.heap_bytes:
            single = [r["ranks"][0]["peak_heap_mib"] for r in kinds["single"]]
            per_rank = [max(rank["peak_heap_mib"] for rank in r["ranks"]) for r in kinds["fsdp2"]]
            ratios = [p / s for p, s in zip(per_rank, single, strict=True)]
            results[method].update(
                single_process_peak_heap_mib=statistics.median(single),
                fsdp2_peak_heap_mib_per_rank=statistics.median(per_rank),
                heap_ratio=statistics.median(ratios),
                heap_ratios=ratios,
            )
            print(f"{method:12s} on live heap bytes x{results[method]['heap_ratio']:.3f}", flush=True)
    write_record(args.output, settings, results)


if __name__ == "__main__":
    main()
