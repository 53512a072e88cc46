"""What the per-tensor checksums of saved adapters cost on the packaged MiniLM (CPU): load time with and without
them, the check alone, and sealing at save time.

Two adapters: a sparse diff pruning adapter at 0.5% (fp16 values, the dense task head) and the gated checkpoint of
the first stage (dense diffs and gate logits, 181 MB). Each is saved once (sealed, as `save_pretrained` now writes
it) and copied without its checksums (as PEFT wrote it before: the same tensors, metadata `{"format": "pt"}`).
A round loads each file with `PeftModel.from_pretrained` onto a freshly built base (the base build not timed), in
turn (the order alternating between rounds), and times `verify_file` and `seal_file` alone; ratios are medians of per-round ratios, so that load from
other jobs on the machine cancels out.

    python benchmarks/integrity.py --threads 1 --output benchmarks/results/integrity.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
import transformers
from _record import write_record
from peft import PeftModel, get_peft_model
from train_step import load_base

import peft_diffprune  # noqa: F401
from peft_diffprune import DiffPruningConfig, project_to_sparsity
from peft_diffprune.integrity import seal_file, verify_file


WEIGHTS = "adapter_model.safetensors"


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def unsealed_copy(folder: Path, target: Path) -> Path:
    """The adapter as it was saved before checksums: the same tensors, PEFT's metadata only."""
    shutil.copytree(folder, target)
    safetensors.torch.save_file(safetensors.torch.load_file(folder / WEIGHTS), target / WEIGHTS, {"format": "pt"})
    return target


def measure(folder: Path, rounds: int) -> dict:
    old = unsealed_copy(folder, folder.with_name(f"{folder.name}-unsealed"))
    scratch = folder.with_name(f"{folder.name}-scratch.safetensors")
    samples: dict[str, list[float]] = {"sealed": [], "unsealed": [], "verify": [], "seal": []}
    for round_index in range(rounds + 1):
        times = {}
        # alternate which goes first: the second load of a round also frees the first one's model
        for name, path in (("sealed", folder), ("unsealed", old))[:: 1 if round_index % 2 else -1]:
            base = load_base("minilm").eval()
            times[name] = timed(lambda path=path, base=base: PeftModel.from_pretrained(base, path))
        times["verify"] = timed(lambda: verify_file(folder / WEIGHTS))
        shutil.copy(old / WEIGHTS, scratch)
        times["seal"] = timed(lambda: seal_file(scratch))
        if round_index:  # the first round warms caches up
            for name, value in times.items():
                samples[name].append(value)
    ratios = [sealed / unsealed for sealed, unsealed in zip(samples["sealed"], samples["unsealed"], strict=True)]
    return {
        "file_bytes": (folder / WEIGHTS).stat().st_size,
        "tensors": len(safetensors.torch.load_file(folder / WEIGHTS)),
        "rounds": rounds,
        "load_sealed_s": statistics.median(samples["sealed"]),
        "load_unsealed_s": statistics.median(samples["unsealed"]),
        "load_ratio_sealed_over_unsealed": statistics.median(ratios),
        "verify_s": statistics.median(samples["verify"]),
        "verify_share_of_load": statistics.median(
            v / s for v, s in zip(samples["verify"], samples["sealed"], strict=True)
        ),
        "seal_s": statistics.median(samples["seal"]),
        "verify_mb_per_s": (folder / WEIGHTS).stat().st_size / 1e6 / statistics.median(samples["verify"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sparse_rounds", type=int, default=20)
    parser.add_argument("--gated_rounds", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/results/integrity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the base's new head is reported on every load

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = DiffPruningConfig(task_type="SEQ_CLS", init_weights=False, values_dtype="float16")
        model = get_peft_model(load_base("minilm"), config)
        model.save_pretrained(Path(tmp) / "gated")
        project_to_sparsity(model, 0.005)
        model.save_pretrained(Path(tmp) / "sparse")
        del model
        for name, rounds in (("sparse", args.sparse_rounds), ("gated", args.gated_rounds)):
            results[name] = measure(Path(tmp) / name, rounds)
            print(name, results[name], flush=True)
    write_record(args.output, vars(args), results)


if __name__ == "__main__":
    main()
