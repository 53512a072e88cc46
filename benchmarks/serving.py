"""Serving cost of sparse diff pruning adapters on the packaged MiniLM, against PEFT's LoRA (CPU).

Measures, for adapters with the same number of trainable entries (0.5% of the model; LoRA r=12 on query/value):
bytes per kept entry against the information bound, adapter file size, adapter load time, merged task switch
(unmerge one adapter, merge the next), unmerged switch (set_adapter) and the unmerged forward overhead.

    python benchmarks/serving.py --output benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _record import write_record
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

import peft_diffprune  # noqa: F401
from peft_diffprune import DiffPruningConfig, project_to_sparsity
from peft_diffprune.hub import packaged_minilm_path


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def base_model(path: str):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def make_diff_adapters(path: str, folder: Path, count: int, density: float, values_dtype: str) -> dict:
    info = {}
    for i in range(count):
        torch.manual_seed(100 + i)
        model = get_peft_model(
            base_model(path), DiffPruningConfig(task_type="SEQ_CLS", init_weights=False, values_dtype=values_dtype)
        )
        report = project_to_sparsity(model, density)
        model.save_pretrained(folder / f"diff{i}")
        info = {"kept": report.kept, "total_parameters": report.total_parameters}
    return info


def make_lora_adapters(path: str, folder: Path, count: int, r: int) -> int:
    for i in range(count):
        torch.manual_seed(100 + i)
        config = LoraConfig(task_type="SEQ_CLS", r=r, target_modules=["query", "value"], init_lora_weights=False)
        model = get_peft_model(base_model(path), config)
        model.save_pretrained(folder / f"lora{i}")
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def file_bytes(adapter: Path) -> dict:
    """Bytes of the adapter file, and of the sparse diff tensors alone (positions + values), as stored."""
    total = (adapter / "adapter_model.safetensors").stat().st_size
    diff = 0
    with safe_open(adapter / "adapter_model.safetensors", "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            if ".diff_pruning_state." in key or "lora_" in key:
                tensor = handle.get_tensor(key)
                diff += tensor.numel() * tensor.element_size()
    return {"file_bytes": total, "adapter_tensor_bytes": diff}


def load_all(path: str, folder: Path, prefix: str, count: int) -> tuple[PeftModel, float]:
    model = base_model(path)
    start = time.perf_counter()
    model = PeftModel.from_pretrained(model, folder / f"{prefix}0", adapter_name=f"{prefix}0")
    load_time = time.perf_counter() - start
    for i in range(1, count):
        model.load_adapter(folder / f"{prefix}{i}", adapter_name=f"{prefix}{i}")
    return model.eval(), load_time


def switch_merged(model: PeftModel, names: list[str]):
    state = {"i": 0}
    model.base_model.set_adapter(names[0])
    model.merge_adapter()

    def step():
        model.unmerge_adapter()
        state["i"] = (state["i"] + 1) % len(names)
        model.base_model.set_adapter(names[state["i"]])
        model.merge_adapter()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--density", type=float, default=0.005)
    parser.add_argument("--lora_r", type=int, default=12)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results/serving.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = args.model or packaged_minilm_path()
    batch = {"input_ids": torch.randint(1000, 30000, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=int)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for dtype in ("float32", "float16"):
            info = make_diff_adapters(path, folder / dtype, 1, args.density, dtype)
            sizes = file_bytes(folder / dtype / "diff0")
            results[f"diff_pruning_{dtype}_storage"] = {
                **info,
                **sizes,
                "bytes_per_kept_entry": sizes["adapter_tensor_bytes"] / info["kept"],
            }
        n, k = info["total_parameters"], info["kept"]
        log2_choose = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
        results["information_bound_fp16_bytes_per_entry"] = 2 + log2_choose / 8 / k

        make_diff_adapters(path, folder, args.adapters, args.density, "float16")
        lora_params = make_lora_adapters(path, folder, args.adapters, args.lora_r)
        results["lora_storage"] = {"trainable": lora_params, **file_bytes(folder / "lora0")}

        base = base_model(path)
        with torch.no_grad():
            base_forward = timed(lambda: base(**batch), args.repeats)
        results["base_forward_s"] = base_forward
        for prefix in ("diff", "lora"):
            model, load_time = load_all(path, folder, prefix, args.adapters)
            names = [f"{prefix}{i}" for i in range(args.adapters)]
            with torch.no_grad():
                model.base_model.set_adapter(names[0])
                unmerged_forward = timed(lambda m=model: m(**batch), args.repeats)

                def set_next(m=model, names=names, state={"i": 0}):  # noqa: B006 (a counter kept between calls)
                    state["i"] = (state["i"] + 1) % len(names)
                    m.base_model.set_adapter(names[state["i"]])
                    m(**batch)

                unmerged_switch_and_forward = timed(set_next, args.repeats)
                merged_switch = timed(switch_merged(model, names), args.repeats)
                merged_forward = timed(lambda m=model: m(**batch), args.repeats)
                model.unmerge_adapter()
            results[prefix] = {
                "load_time_s": load_time,
                "merged_switch_s": merged_switch,
                "unmerged_forward_s": unmerged_forward,
                "unmerged_forward_ratio_to_base": unmerged_forward / base_forward,
                "unmerged_switch_plus_forward_s": unmerged_switch_and_forward,
                "merged_forward_ratio_to_base": merged_forward / base_forward,
            }
    results["merged_switch_ratio_diff_to_lora"] = (
        results["diff"]["merged_switch_s"] / results["lora"]["merged_switch_s"]
    )
    write_record(args.output, vars(args), results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
