"""What a training forward of GPT-2 (random weights, GPT-2 small's shape, its dropout) saves for backward, and how
long a forward and backward take: without lean activations, with them, and with them but `gelu_new` left as
autograd saves it (`activations.FORMULA_ACTIVATIONS` emptied: the code before formula activations were kept lean).

Saved bytes are counted in forward, by storage, parameters left out: a mask of bits counts its bytes, a tensor
rebuilt in backward counts nothing. The variants take turns `--reps` times on one model (the first two of each are
warm-ups); a time is the median of one forward and backward. With `--heap_bytes` the script runs again under
`heap_count.c` (`_record.heap_count_env`) and records each step's peak of live heap bytes above what was live
before it (the model, its gradients from no earlier step): the activations' bytes as the allocator sees them.

    python benchmarks/lean_formula.py --output benchmarks/results/lean_formula_gpt2.json
    python benchmarks/lean_formula.py --heap_bytes --reps 4 --output benchmarks/results/lean_formula_gpt2_heap.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from _record import HeapBytes, heap_count_env, write_record
from transformers import GPT2Config, GPT2LMHeadModel

from peft_diffprune import disable_lean_activations, enable_lean_activations
from peft_diffprune.diff_pruning import activations


MIB = 2**20


def saved_bytes(model, batch) -> dict:
    """Bytes of the activations one training forward saves, by what they are kept as."""
    held = {t.untyped_storage().data_ptr() for t in model.parameters()}
    kept, masks, rebuilt = {}, {}, 0
    alive = []  # every storage counted stays alive until the count is done: no address is counted twice

    def count(into, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            alive.append(storage)
            into[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        nonlocal rebuilt
        packed = activations._pack(tensor) if lean else activations._Kept(tensor)
        if isinstance(packed, activations._TwoValued):
            count(masks, packed.mask)
        elif isinstance(packed, activations._Kept):
            count(kept, packed.tensor)
        else:
            rebuilt += 1
        return packed

    lean = bool(getattr(model, "_lean_activation_hooks", None))
    hooks = model._lean_activation_hooks[-2:] if lean else []
    for handle in hooks:  # the model's own context: `pack` is applied here instead
        handle.remove()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, activations._unpack):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if lean:  # on again with its context
        recipes = model._lean_activation_recipes
        disable_lean_activations(model)
        enable_lean_activations(model, recipes)
    return {
        "kept_mib": sum(kept.values()) / MIB,
        "masks_mib": sum(masks.values()) / MIB,
        "saved_mib": (sum(kept.values()) + sum(masks.values())) / MIB,
        "rebuilt_tensors": rebuilt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--heap_bytes", action="store_true", help="each step's peak of live heap bytes (glibc)")
    parser.add_argument("--output", default="benchmarks/results/lean_formula_gpt2.json")
    args = parser.parse_args()
    if args.heap_bytes and not HeapBytes.loaded():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **heap_count_env()})
    heap = HeapBytes() if args.heap_bytes else None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_positions=max(1024, args.seq_len))).train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "labels": ids}
    formulas = activations.FORMULA_ACTIVATIONS

    def use(name: str) -> None:
        disable_lean_activations(model)
        activations.FORMULA_ACTIVATIONS = () if name == "lean_gelu_new_as_saved" else formulas
        if name != "plain":
            enable_lean_activations(model)

    def step(name: str) -> None:
        torch.manual_seed(0)
        if heap is not None:
            live = heap.live_mib()
            heap.reset_peak()
        start = time.perf_counter()
        model(**batch).loss.backward()
        results[name]["step_times_s"].append(time.perf_counter() - start)
        if heap is not None:
            results[name]["step_peaks_above_live_mib"].append(heap.peak_mib() - live)
        model.zero_grad(set_to_none=True)

    names = ("plain", "lean", "lean_gelu_new_as_saved")
    results = {}
    for name in names:
        use(name)
        results[name] = {**saved_bytes(model, batch), "step_times_s": [], "step_peaks_above_live_mib": []}
    for _ in range(args.reps):
        for name in names:
            use(name)
            step(name)
    use("plain")
    activations.FORMULA_ACTIVATIONS = formulas
    for name, result in results.items():
        result["step_s"] = statistics.median(result["step_times_s"][2:])
        result["saved_over_plain"] = result["saved_mib"] / results["plain"]["saved_mib"]
        result["step_over_plain"] = result["step_s"] / results["plain"]["step_s"]
        peak = ""
        if heap is not None:
            result["step_peak_above_live_mib"] = max(result["step_peaks_above_live_mib"])
            peak = f", step's heap peak above live {result['step_peak_above_live_mib']:.1f} MiB"
        print(
            f"{name:24s} saved {result['saved_mib']:8.1f} MiB ({result['saved_over_plain']:.3f} of plain), "
            f"step {result['step_s']:.3f} s ({result['step_over_plain']:.3f}){peak}",
            flush=True,
        )
    write_record(args.output, vars(args), results)


if __name__ == "__main__":
    main()
