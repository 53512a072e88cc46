"""Markdown tables of the benchmark results, for docs/benchmarks.md.

python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path


RESULTS = Path(__file__).parent / "results"
NAMES = {
    "full": "full fine-tuning",
    "diff_pruning": "diff pruning, gated stage",
    "diff_pruning_structured": "structured diff pruning, gated stage",
    "dense_reference": "dense reference of the authors' approach",
    "fixmask": "diff pruning, fixed-mask stage (0.5% kept)",
    "lora_qv_r8": "LoRA q,v r=8",
    "lora_all_r8": "LoRA all-linear r=8",
    "supertuning": "Super-Tuning (1.05% of q, k, v, dense weights, 113,016 entries)",
    "shira": "SHiRA r=12 q,v (110,592 entries)",
    "eval_base": "eval forward, base model",
    "eval_diff_pruning": "eval forward, diff pruning (deterministic gate)",
}


def train_step_table(record: dict) -> str:
    rows = [
        "| method | step time (s) | time / reference | peak RSS (MiB) | peak RSS / reference |",
        "|---|---|---|---|---|",
    ]
    for method, res in record["results"].items():
        rows.append(
            f"| {NAMES[method]} | {res['step_time_s']:.2f} | {res['time_ratio']:.3f} | {res['peak_rss_mib']:.0f} | "
            f"{res['peak_rss_ratio']:.3f} |"
        )
    return "\n".join(rows)


def scaling_table(record: dict) -> str:
    methods = {"diff_pruning": "gated", "diff_pruning_structured": "structured gated", "fixmask": "fixed mask"}
    rows = [
        "| sweep | model | parameters | batch x tokens | full FT step (s) | "
        + " | ".join(f"{label}: time / peak RSS" for label in methods.values())
        + " |",
        "|---|---|---|---|---|" + "---|" * len(methods),
    ]
    for case in record["results"]["cases"]:
        res = case["results"]
        rows.append(
            f"| {case['sweep']} | {case['model']} | {case['parameters'] / 1e6:.1f}M | "
            f"{case['batch_size']} x {case['seq_len']} | {res['full']['step_time_s']:.2f} | "
            + " | ".join(f"{res[m]['time_ratio']:.2f} / {res[m]['peak_rss_ratio']:.2f}" for m in methods)
            + " |"
        )
    return "\n".join(rows)


def serving_table(record: dict) -> str:
    storage, serving = record["results"]["storage"], record["results"]["serving"]
    rows = [
        "| adapter | trainable entries | adapter tensor bytes | bytes per entry | information bound | file bytes |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "diff_pruning_float16": "diff pruning, fp16 values",
        "diff_pruning_float32": "diff pruning, fp32 values",
        "lora": f"LoRA r={record['settings']['lora_r']} q,v",
        "shira": f"SHiRA r={record['settings']['lora_r']} q,v",
        "supertuning": "Super-Tuning q,k,v,dense",
    }
    for key, name in names.items():
        s = storage[key]
        bound = f"{s['information_bound_bytes_per_entry']:.3f}" if "information_bound_bytes_per_entry" in s else ""
        rows.append(
            f"| {name} | {s['trainable_entries']:,} | {s['adapter_tensor_bytes']:,} | {s['bytes_per_entry']:.3f} | "
            f"{bound} | {s['file_bytes']:,} |"
        )
    rows += [
        "",
        "| | load (s) | load / base model load | merged switch (s) | unmerged switch + forward (s) | "
        "unmerged forward / base | merged forward / base |",
        "|---|---|---|---|---|---|---|",
    ]
    for prefix, name in (("diff", "diff pruning"), ("lora", "LoRA")):
        r = serving[prefix]
        rows.append(
            f"| {name} | {r['load_s']:.3f} | {r['load_ratio_to_base_load']:.3f} | {r['merged_switch_s']:.4f} | "
            f"{r['unmerged_switch_plus_forward_s']:.3f} | {r['unmerged_forward_ratio_to_base']:.3f} | "
            f"{r['merged_forward_ratio_to_base']:.3f} |"
        )
    rows.append(
        f"| base model | {serving['base_load_s']:.3f} | 1.000 | | {serving['base_forward_s']:.3f} (forward) | 1.000 | "
        "1.000 |"
    )
    ratios = serving["diff_to_lora"]
    rows.append(
        f"\nDiff pruning / LoRA (median of per-round ratios): load {ratios['load']:.2f}x, merged switch "
        f"{ratios['merged_switch']:.2f}x, unmerged switch + forward {ratios['unmerged_switch_plus_forward']:.2f}x, "
        f"unmerged forward {ratios['unmerged_forward']:.2f}x."
    )
    if "trained" in serving:
        trained = serving["trained"]
        rows.append(
            f"Trained adapter `{trained['adapter']}` ({trained['kept']:,} kept entries): merged switch "
            f"{trained['merged_switch_s']:.4f} s, {ratios['trained_merged_switch']:.2f}x LoRA's."
        )
    return "\n".join(rows)


def main() -> None:
    renderers = {"serving.json": serving_table, "scaling.json": scaling_table, "train_step.json": train_step_table}
    for name, render in renderers.items():
        path = RESULTS / name
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        print(
            f"### {name}\n\n`{record['command']}` (commit {record['commit']}, {record['date']}, {record['machine']})\n"
        )
        print(render(record) + "\n")


if __name__ == "__main__":
    main()
