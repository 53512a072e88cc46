"""Storage and serving cost of sparse diff pruning adapters on the packaged MiniLM, against PEFT's LoRA, SHiRA and
Super-Tuning adapters with about the same number of trainable entries (CPU).

Storage: each adapter is saved and its file measured; diff pruning's bytes per kept entry are set against the
information bound (log2 C(n, k) bits for the positions of k kept entries among n parameters, plus the value bits).
Serving: adapter load time, merged task switch (unmerge one adapter, merge the next), unmerged task switch (set_adapter
and the first forward) and the forward pass, against the base model and LoRA. The timed operations take turns, once
each per round, and ratios are the median over rounds of the per-round ratio, so that load from other jobs on the
machine cancels out.

    python benchmarks/serving.py --threads 1 --output benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _record import write_record
from peft import LoraConfig, PeftModel, ShiraConfig, SupertuningConfig, get_peft_model
from safetensors import safe_open
from train_step import load_base

import peft_diffprune  # noqa: F401
from peft_diffprune import DiffPruningConfig, project_to_sparsity


#: Linear layers Super-Tuning picks entries from; LoRA and SHiRA adapt query and value only.
SUPERTUNING_TARGETS = ["query", "key", "value", "dense"]


def save(model, folder: Path, trainable: int) -> dict:
    """Save `model`'s adapter to `folder`; its file size, and the bytes of the adapter tensors alone (the classifier
    head, saved by every method alike, left out)."""
    model.save_pretrained(folder)
    path = folder / "adapter_model.safetensors"
    tensor_bytes = 0
    with safe_open(path, "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            if "classifier" not in key:
                tensor = handle.get_tensor(key)
                tensor_bytes += tensor.numel() * tensor.element_size()
    return {
        "trainable_entries": trainable,
        "adapter_tensor_bytes": tensor_bytes,
        "bytes_per_entry": tensor_bytes / trainable,
        "file_bytes": path.stat().st_size,
    }


def trainable_entries(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def make_adapters(folder: Path, density: float, lora_r: int, serving_copies: int) -> dict:
    """Save one adapter of each kind (diff pruning with fp32 and fp16 values, LoRA, SHiRA, Super-Tuning) at about
    `density` of the model, plus `serving_copies` fp16 diff pruning and LoRA adapters for the switching benchmarks
    (`diff0`, `diff1`, ..., `lora0`, ...)."""
    storage = {}
    for i in range(serving_copies):
        for values_dtype in ("float16", "float32") if i == 0 else ("float16",):
            torch.manual_seed(100 + i)
            config = DiffPruningConfig(task_type="SEQ_CLS", init_weights=False, values_dtype=values_dtype)
            model = get_peft_model(load_base("minilm"), config)
            report = project_to_sparsity(model, density)
            name = f"diff{i}" if values_dtype == "float16" else "diff_fp32"
            storage[f"diff_pruning_{values_dtype}"] = save(model, folder / name, report.kept)
            storage[f"diff_pruning_{values_dtype}"]["total_parameters"] = report.total_parameters
        torch.manual_seed(100 + i)
        config = LoraConfig(task_type="SEQ_CLS", r=lora_r, target_modules=["query", "value"], init_lora_weights=False)
        model = get_peft_model(load_base("minilm"), config)
        storage["lora"] = save(model, folder / f"lora{i}", trainable_entries(model))
    kept = storage["diff_pruning_float16"]["trainable_entries"]

    config = ShiraConfig(task_type="SEQ_CLS", r=lora_r, target_modules=["query", "value"], init_weights=False)
    model = get_peft_model(load_base("minilm"), config)
    storage["shira"] = save(model, folder / "shira", trainable_entries(model))

    base = load_base("minilm")
    linear = sum(
        m.weight.numel()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in SUPERTUNING_TARGETS
    )
    sparsity = 1 - kept / linear
    config = SupertuningConfig(
        task_type="SEQ_CLS", target_modules=SUPERTUNING_TARGETS, sparsity=sparsity, init_weights=False
    )
    model = get_peft_model(base, config)
    storage["supertuning"] = save(model, folder / "supertuning", trainable_entries(model))
    storage["supertuning"]["sparsity"] = sparsity

    n = storage["diff_pruning_float16"]["total_parameters"]
    log2_choose = (math.lgamma(n + 1) - math.lgamma(kept + 1) - math.lgamma(n - kept + 1)) / math.log(2)
    storage["information_bound_positions_bytes_per_entry"] = log2_choose / 8 / kept
    for values_dtype, value_bytes in (("float16", 2), ("float32", 4)):
        bound = value_bytes + log2_choose / 8 / kept
        storage[f"diff_pruning_{values_dtype}"]["information_bound_bytes_per_entry"] = bound
        storage[f"diff_pruning_{values_dtype}"]["over_bound_bytes_per_entry"] = (
            storage[f"diff_pruning_{values_dtype}"]["bytes_per_entry"] - bound
        )
    return storage


def clocked(fn: Callable) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def in_rounds(operations: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each operation once per round, in turn, for `warmup + rounds` rounds; each returns the seconds it took."""
    times = {name: [] for name in operations}
    for _ in range(warmup + rounds):
        for name, operation in operations.items():
            times[name].append(operation())
    return {name: values[warmup:] for name, values in times.items()}


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    return statistics.median(t / r for t, r in zip(times[name], times[reference], strict=True))


def load_time(adapter: Path) -> Callable[[], float]:
    def run() -> float:
        base = load_base("minilm")
        start = time.perf_counter()
        PeftModel.from_pretrained(base, adapter)
        return time.perf_counter() - start

    return run


def load_adapters(adapters: dict[str, Path]) -> tuple[PeftModel, list[str]]:
    """One base model with every adapter of `adapters` (name -> folder) loaded onto it; the model and the names."""
    names = list(adapters)
    model = PeftModel.from_pretrained(load_base("minilm"), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval(), names


def load_all(folder: Path, prefix: str, count: int) -> tuple[PeftModel, list[str]]:
    """The adapters `<folder>/<prefix>0`, `<prefix>1`, ... of `make_adapters` on one base model."""
    return load_adapters({f"{prefix}{i}": folder / f"{prefix}{i}" for i in range(count)})


def cycling(names: list[str], switch: Callable[[str], None]) -> Callable[[], None]:
    """A callable that switches to the next adapter in `names` on every call."""
    state = {"i": 0}

    def step() -> None:
        state["i"] = (state["i"] + 1) % len(names)
        switch(names[state["i"]])

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--lora_r", type=int, default=12)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/serving.json")
    parser.add_argument(
        "--trained_adapter",
        type=Path,
        default=None,
        help="A sparse adapter saved by examples/glue.py: its merged switch is timed too (loaded --adapters times). "
        "The random adapters spread their kept entries uniformly, the worst case for the scattered reads and writes "
        "of a merge; trained diffs are clustered.",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = {"input_ids": torch.randint(1000, 30000, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=int)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        storage = make_adapters(folder, args.density, args.lora_r, args.adapters)
        loads = in_rounds(
            {
                "base": clocked(lambda: load_base("minilm")),
                "diff": load_time(folder / "diff0"),
                "lora": load_time(folder / "lora0"),
            },
            args.rounds,
        )
        base = load_base("minilm").eval()
        models = {prefix: load_all(folder, prefix, args.adapters) for prefix in ("diff", "lora")}
    trained = {}
    if args.trained_adapter is not None:
        copies = {f"trained{i}": args.trained_adapter for i in range(args.adapters)}
        trained = {"trained": load_adapters(copies)}

    def switch_and_forward(model: PeftModel) -> Callable[[str], None]:
        def switch(name: str) -> None:
            model.base_model.set_adapter(name)
            model(**batch)

        return switch

    def merged_switch(model: PeftModel) -> Callable[[str], None]:
        def switch(name: str) -> None:
            model.unmerge_adapter()
            model.base_model.set_adapter(name)
            model.merge_adapter()

        return switch

    with torch.no_grad():
        unmerged = in_rounds(
            {
                "base": clocked(lambda: base(**batch)),
                **{p: clocked(lambda m=m: m(**batch)) for p, (m, _) in models.items()},
                **{f"{p}_switch": clocked(cycling(names, switch_and_forward(m))) for p, (m, names) in models.items()},
            },
            args.rounds,
        )
        for model, names in [*models.values(), *trained.values()]:
            model.base_model.set_adapter(names[0])
            model.merge_adapter()
        merged = in_rounds(
            {
                "base": clocked(lambda: base(**batch)),
                **{p: clocked(lambda m=m: m(**batch)) for p, (m, _) in models.items()},
                **{
                    f"{p}_switch": clocked(cycling(names, merged_switch(m)))
                    for p, (m, names) in (models | trained).items()
                },
            },
            args.rounds,
        )

    serving = {"base_load_s": statistics.median(loads["base"]), "base_forward_s": statistics.median(unmerged["base"])}
    for prefix in models:
        serving[prefix] = {
            "load_s": statistics.median(loads[prefix]),
            "load_ratio_to_base_load": median_ratio(loads, prefix, "base"),
            "unmerged_forward_s": statistics.median(unmerged[prefix]),
            "unmerged_forward_ratio_to_base": median_ratio(unmerged, prefix, "base"),
            "unmerged_switch_plus_forward_s": statistics.median(unmerged[f"{prefix}_switch"]),
            "unmerged_switch_plus_forward_ratio_to_base_forward": median_ratio(unmerged, f"{prefix}_switch", "base"),
            "merged_switch_s": statistics.median(merged[f"{prefix}_switch"]),
            "merged_forward_ratio_to_base": median_ratio(merged, prefix, "base"),
        }
    serving["diff_to_lora"] = {
        "load": median_ratio(loads, "diff", "lora"),
        "unmerged_forward": median_ratio(unmerged, "diff", "lora"),
        "unmerged_switch_plus_forward": median_ratio(unmerged, "diff_switch", "lora_switch"),
        "merged_switch": median_ratio(merged, "diff_switch", "lora_switch"),
    }
    if trained:
        serving["trained"] = {
            "adapter": str(args.trained_adapter),
            "kept": sum(
                json.loads((args.trained_adapter / "adapter_config.json").read_text())["kept_pattern"].values()
            ),
            "merged_switch_s": statistics.median(merged["trained_switch"]),
        }
        serving["diff_to_lora"]["trained_merged_switch"] = median_ratio(merged, "trained_switch", "lora_switch")
    settings = {**vars(args), "trained_adapter": None if args.trained_adapter is None else str(args.trained_adapter)}
    record = write_record(args.output, settings, {"storage": storage, "serving": serving})
    print(record["results"])


if __name__ == "__main__":
    main()
