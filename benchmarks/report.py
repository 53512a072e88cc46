"""Markdown tables of the benchmark results, for docs/benchmarks.md.

python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path


RESULTS = Path(__file__).parent / "results"


def train_step_table(record: dict) -> str:
    rows = [
        "| method | step time (s) | time / full FT | peak RSS (MiB) | peak RSS / full FT | peak above loaded / full FT |",
        "|---|---|---|---|---|---|",
    ]
    for method, res in record["results"].items():
        rows.append(
            f"| {method} | {res['step_time_s']:.2f} | {res.get('time_ratio', float('nan')):.3f} | "
            f"{res['peak_rss_mib']:.0f} | {res.get('peak_rss_ratio', float('nan')):.3f} | "
            f"{res.get('peak_over_loaded_ratio', float('nan')):.3f} |"
        )
    return "\n".join(rows)


def serving_table(record: dict) -> str:
    res = record["results"]
    storage = [
        "| adapter | kept / trainable entries | adapter tensor bytes | bytes per entry | file bytes |",
        "|---|---|---|---|---|",
    ]
    for dtype in ("float32", "float16"):
        s = res[f"diff_pruning_{dtype}_storage"]
        storage.append(
            f"| diff pruning, {dtype} values | {s['kept']:,} | {s['adapter_tensor_bytes']:,} | "
            f"{s['bytes_per_kept_entry']:.3f} | {s['file_bytes']:,} |"
        )
    lora = res["lora_storage"]
    storage.append(
        f"| LoRA r={record['settings']['lora_r']} q,v (fp32) | {lora['trainable']:,} | "
        f"{lora['adapter_tensor_bytes']:,} | {lora['adapter_tensor_bytes'] / lora['trainable']:.3f} | "
        f"{lora['file_bytes']:,} |"
    )
    storage.append(
        f"\nInformation bound with fp16 values: {res['information_bound_fp16_bytes_per_entry']:.3f} bytes per entry."
    )
    timing = [
        "| | load (s) | merged switch (s) | unmerged switch + forward (s) | unmerged forward / base | merged forward / base |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("diff", "lora"):
        r = res[name]
        timing.append(
            f"| {'diff pruning' if name == 'diff' else 'LoRA'} | {r['load_time_s']:.3f} | {r['merged_switch_s']:.4f} | "
            f"{r['unmerged_switch_plus_forward_s']:.3f} | {r['unmerged_forward_ratio_to_base']:.3f} | "
            f"{r['merged_forward_ratio_to_base']:.3f} |"
        )
    timing.append(f"\nMerged switch, diff pruning / LoRA: {res['merged_switch_ratio_diff_to_lora']:.2f}x.")
    return "\n".join(storage) + "\n\n" + "\n".join(timing)


def main() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        render = serving_table if path.name == "serving.json" else train_step_table
        print(
            f"### {path.name}\n\n`{record['command']}` (commit {record['commit']}, {record['date']}, {record['machine']})\n"
        )
        print(render(record) + "\n")


if __name__ == "__main__":
    main()
