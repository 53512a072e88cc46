"""Training-step cost of diff pruning vs full fine-tuning on the packaged MiniLM (CPU).

Each method runs in its own process so that peak memory (max RSS) is not polluted by another method's tensors.
Step time is the median over timed steps after warm-up; all methods see the same batches.

    python benchmarks/train_step.py --batch_size 32 --seq_len 128 --steps 6 --output benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _record import write_record


METHODS = (
    "full",
    "diff_pruning",
    "diff_pruning_structured",
    "dense_reference",
    "fixmask",
    "lora_qv_r8",
    "lora_all_r8",
    "supertuning",
    "shira",
    "eval_base",
    "eval_diff_pruning",
)
#: PEFT's sparse methods at about the diff pruning budget: 0.5% of MiniLM's 22.7M parameters is ~114k entries.
SUPERTUNING_SPARSITY = 0.989  # 1.1% of the 10.7M linear weights
SHIRA_R = 8  # r * (in + out) entries per linear layer, ~111k in all


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(method: str, model_path: str):
    from peft import LoraConfig, PeftModel, ShiraConfig, SupertuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    import peft_diffprune  # noqa: F401
    from peft_diffprune import DiffPruningConfig, param_groups, project_to_sparsity

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    if method in ("full", "eval_base"):
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    if method == "dense_reference":
        model = DenseDiffPruning(model)
        groups = [{"params": model.diffs.parameters()}, {"params": model.alphas.parameters(), "lr": 0.1}]
        return model, torch.optim.AdamW(groups, lr=1e-5, fused=True)
    peft_configs = {
        "lora_qv_r8": LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]),
        "lora_all_r8": LoraConfig(task_type="SEQ_CLS", r=8, target_modules="all-linear"),
        "supertuning": SupertuningConfig(
            task_type="SEQ_CLS", target_modules=["query", "key", "value", "dense"], sparsity=SUPERTUNING_SPARSITY
        ),
        "shira": ShiraConfig(task_type="SEQ_CLS", r=SHIRA_R, target_modules=["query", "key", "value", "dense"]),
    }
    if method in peft_configs:
        model = get_peft_model(model, peft_configs[method])
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    config = DiffPruningConfig(
        task_type="SEQ_CLS", structured=method.endswith("structured"), init_weights=method != "fixmask"
    )
    model = get_peft_model(model, config)
    if method == "fixmask":
        # The fixed-mask stage trains the 0.5% kept entries only (random diffs stand in for a stage-1 result). It is
        # loaded from a saved sparse adapter, as a stage-2 job would, so that freed stage-1 memory is not counted.
        project_to_sparsity(model, 0.005)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            del model
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed stage-1 memory back, as a fresh process would
            base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
            model = PeftModel.from_pretrained(base, folder, is_trainable=True)
    return model, torch.optim.AdamW(param_groups(model, lr=1e-5, alpha_lr=0.1), fused=True)


class DenseDiffPruning(torch.nn.Module):
    """The authors' approach, written plainly: a dense diff and gate logits for every parameter (the task head
    trained directly), gates sampled with ordinary autograd ops, the model run with the adapted parameters."""

    def __init__(self, model: torch.nn.Module, stretch=(-1.5, 1.5), l0_lambda: float = 1.25e-7):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.config = model.config
        self.stretch, self.l0_lambda = stretch, l0_lambda
        names = [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]
        self.keys = {n: n.replace(".", "/") for n in names}
        self.diffs = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(torch.zeros_like(model.get_parameter(n))) for n, k in self.keys.items()}
        )
        self.alphas = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(torch.full_like(model.get_parameter(n), 5.0)) for n, k in self.keys.items()}
        )
        model.classifier.requires_grad_(True)
        self.diffs.update({f"head/{n}": p for n, p in model.classifier.named_parameters()})

    def forward(self, **batch):
        left, right = self.stretch
        params = {}
        penalty = 0.0
        for name, key in self.keys.items():
            alpha, u = self.alphas[key], torch.rand_like(self.alphas[key]).clamp(1e-4, 1 - 1e-4)
            z = (torch.sigmoid(torch.log(u) - torch.log(1 - u) + alpha) * (right - left) + left).clamp(0, 1)
            params[name] = self.model.get_parameter(name) + z * self.diffs[key]
            penalty = penalty + torch.sigmoid(alpha - math.log(-left / right)).sum()
        outputs = torch.func.functional_call(self.model, params, (), batch)
        outputs.loss = outputs.loss + self.l0_lambda * penalty
        return outputs


def run_one(args) -> dict:
    from peft_diffprune.hub import packaged_minilm_path

    torch.set_num_threads(args.threads)
    model_path = args.model or packaged_minilm_path()
    model, optimizer = build(args.method, model_path)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [
        {
            "input_ids": torch.randint(1000, vocab, (args.batch_size, args.seq_len), generator=generator),
            "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (args.batch_size,), generator=generator),
        }
        for _ in range(2)
    ]
    rss_before = rss_mib()
    times = []
    evaluating = args.method.startswith("eval")
    model.train(not evaluating)
    for step in range(args.warmup + args.steps):
        batch = batches[step % 2]
        start = time.perf_counter()
        if evaluating:
            with torch.no_grad():
                model(**batch)
        else:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": args.method,
        "step_time_s": statistics.median(times),
        "step_times_s": times,
        "rss_before_training_mib": rss_before,
        "peak_rss_mib": peak,
        "peak_over_loaded_mib": peak - rss_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, help="run one method in this process (internal)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    results = {}
    for method in args.methods:
        cmd = [sys.executable, __file__, "--method", method] + [
            f"--{k}={v}" for k in ("batch_size", "seq_len", "steps", "warmup", "threads") for v in [getattr(args, k)]
        ]
        if args.model:
            cmd.append(f"--model={args.model}")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        print(method, {k: round(v, 3) for k, v in results[method].items() if isinstance(v, float)}, flush=True)
    for train_or_eval, reference in (("", "full"), ("eval_", "eval_base")):
        if reference not in results:
            continue
        ref = results[reference]
        for method, res in results.items():
            if method.startswith("eval") != bool(train_or_eval):
                continue
            res["time_ratio"] = res["step_time_s"] / ref["step_time_s"]
            res["peak_rss_ratio"] = res["peak_rss_mib"] / ref["peak_rss_mib"]
            res["peak_over_loaded_ratio"] = res["peak_over_loaded_mib"] / ref["peak_over_loaded_mib"]
    write_record(
        args.output, {k: getattr(args, k) for k in ("batch_size", "seq_len", "steps", "warmup", "threads")}, results
    )
    for method, res in results.items():
        if "time_ratio" in res:
            print(
                f"{method:28s} time x{res['time_ratio']:.3f}  peak RSS x{res['peak_rss_ratio']:.3f}  "
                f"peak over loaded x{res['peak_over_loaded_ratio']:.3f}"
            )


if __name__ == "__main__":
    main()
