"""How well a candidate pool covers the entries that fine-tuning changes most, by how the pool is chosen.

Fine-tunes the packaged MiniLM fully on SST-2 for `--steps` steps and takes the 0.5% budget's largest `|delta|`
(what non-adaptive diff pruning would keep, the closest cheap stand-in for the entries a gated stage ends on). Then,
for each way of choosing a pool of `c` times the budget, it reports the recall of those entries (the share of them
inside the pool) and of their mass (`sum |delta|` inside over all): pools by `select_pool` (the task loss's gradient
magnitude summed over B batches, the first batches of the same stream), by the base weights' magnitude (Super-Tuning's
criterion) and at random.

    python benchmarks/pool_selection.py --steps 100 --batch_size 16 --max_length 64 \
        --output benchmarks/results/pool_selection.json
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from _record import write_record
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding


BUDGET = 0.005


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="/work/shared/data/glue")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--score_batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--pools", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/pool_selection.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import get_peft_model

    from peft_diffprune import DiffPruningConfig, select_pool
    from peft_diffprune.recipe.glue import load_glue, tokenize_glue
    from peft_diffprune.recipe.hub import packaged_minilm_path

    path = packaged_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = tokenize_glue(load_glue("sst2", args.data_dir), tokenizer, "sst2", args.max_length)["train"]
    loader = DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=DataCollatorWithPadding(tokenizer),
        generator=torch.Generator().manual_seed(0),
    )
    batches = list(itertools.islice(loader, args.steps))

    def base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    # the reference: full fine-tuning's largest changes
    model = base()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("classifier.")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    fine_tune_seconds = time.perf_counter() - start
    names = list(initial)
    sizes = torch.tensor([initial[n].numel() for n in names])
    offsets = dict(zip(names, (torch.cumsum(sizes, 0) - sizes).tolist(), strict=True))
    delta = torch.cat([(model.get_parameter(n).detach() - initial[n]).abs().reshape(-1) for n in names])
    budget = round(BUDGET * delta.numel())
    top = torch.zeros(delta.numel(), dtype=torch.bool)
    top[delta.topk(budget).indices] = True
    top_mass = delta[top].sum()
    del model, optimizer

    def coverage(pool: torch.Tensor) -> dict:
        inside = top[pool]
        return {
            "pool_entries": pool.numel(),
            "recall": inside.sum().item() / budget,
            "mass_recall": (delta[pool][inside].sum() / top_mass).item(),
        }

    results = {"budget": budget, "parameters": delta.numel(), "fine_tune_seconds": fine_tune_seconds, "pools": []}
    for factor in args.pools:
        size = round(factor * budget)
        weights = torch.cat([initial[n].abs().reshape(-1) for n in names])
        rows = [
            ("weight magnitude", None, weights.topk(size).indices),
            ("random", None, torch.randperm(delta.numel(), generator=torch.Generator().manual_seed(0))[:size]),
        ]
        for count in args.score_batches:
            config = DiffPruningConfig(task_type="SEQ_CLS", target_sparsity=BUDGET, candidate_pool=factor)
            peft_model = get_peft_model(base(), config)
            start = time.perf_counter()
            select_pool(peft_model, batches[:count])
            seconds = time.perf_counter() - start
            chosen = []
            for module in peft_model.base_model.diff_layers().values():
                state = module.diff_pruning_state["default"]
                for name in state.tensor_names:
                    key = f"{state.module_name}.{name}"
                    chosen.append(getattr(state, f"{name}_pool_positions") + offsets[key])
            rows.append((f"gradient, {count} batches", seconds, torch.cat(chosen)))
        for criterion, seconds, pool in rows:
            row = {"criterion": criterion, "pool": factor, **coverage(pool)}
            if seconds is not None:
                row["select_seconds"] = seconds
            results["pools"].append(row)
            print(f"x{factor:g} {criterion:22s} recall {row['recall']:.3f} mass {row['mass_recall']:.3f}", flush=True)
    write_record(args.output, vars(args), results)


if __name__ == "__main__":
    main()
