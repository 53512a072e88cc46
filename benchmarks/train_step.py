"""Training-step cost of diff pruning vs full fine-tuning on CPU, for the packaged MiniLM or a randomly initialised
BERT (tiny or BERT-base size).

Each method runs in its own worker process, so that its peak memory (peak RSS while training) is its own; all
workers see the same batches. The workers take turns, one step each per round (full, diff_pruning, ..., full,
diff_pruning, ...), and a method's time ratio is the median over rounds of its step time over the reference's step
time in the same round, so that load from other jobs on the machine cancels out. At most `--max_workers` workers (the
reference included) are alive at once; longer method lists run in several groups, each with its own reference worker.

    python benchmarks/train_step.py --model minilm --batch_size 32 --seq_len 128 --rounds 6 --warmup 2 --threads 1 \
        --output benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _record import HeapBytes, write_record


METHODS = (
    "full",
    "diff_pruning",
    "diff_pruning_unfused",
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
#: PEFT's sparse methods at about the diff pruning budget: 0.5% of MiniLM's 22.7M parameters is 113,566 entries.
SUPERTUNING_SPARSITY = 0.9895  # 1.05% of the 10.8M query, key, value and dense weights: 113,016 entries
SHIRA_R = 12  # r * (in + out) entries per query and value layer: 110,592 entries, as LoRA r=12 on query and value
#: Randomly initialised BERTs (BertConfig's defaults are BERT-base: 12 layers, 768 hidden, 3072 intermediate, 12 heads,
#: vocabulary 30522); "minilm" is the packaged pretrained all-MiniLM-L6-v2 (6 layers, 384 hidden).
RANDOM_BERTS = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 2},
    "bert-base": {},
}
MODELS = ("tiny", "minilm", "bert-base")
#: How the AdamW step runs: torch's fused kernel (the benchmarks' default), torch's default implementation (what a
#: new user gets), or recipe/optim.py's per-parameter step in backward with either.
OPTIMIZERS = ("fused", "default", "in_backward", "in_backward_fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def status_mib(field: str) -> float:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Restart the peak RSS count (Linux), so that it covers training only: building the fixed-mask stage goes
    through a dense stage-1 model, which on BERT-base takes more memory than training the sparse one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load_base(model: str, dtype: str = "fp32") -> torch.nn.Module:
    """A two-label classifier: `model` is one of MODELS or a model folder, in `dtype` (one of DTYPES). Seeded, so every
    call returns the same weights (the fixed-mask stage reloads the base under its adapter)."""
    return _load_base(model).to(DTYPES[dtype])


def _load_base(model: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from peft_diffprune.recipe.hub import packaged_minilm_path

    torch.manual_seed(0)
    if model in RANDOM_BERTS:
        return BertForSequenceClassification(BertConfig(num_labels=2, **RANDOM_BERTS[model]))
    path = packaged_minilm_path() if model == "minilm" else model
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def make_optimizer(params, optimizer: str = "fused", **kwargs) -> torch.optim.Optimizer:
    """AdamW over `params`, run as `optimizer` says (one of OPTIMIZERS)."""
    from peft_diffprune.recipe.optim import OptimizerInBackward

    fused = optimizer.endswith("fused")
    if optimizer.startswith("in_backward"):
        return OptimizerInBackward(params, fused=fused, **kwargs)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def build(method: str, model_name: str, dtype: str = "fp32", optimizer: str = "fused"):
    """The model of `method` with its optimizer. With `dtype="bf16"` the base is bf16 and so is the adapter state
    (PEFT's `autocast_adapter_dtype=False`)."""
    from peft import LoraConfig, PeftModel, ShiraConfig, SupertuningConfig, get_peft_model

    import peft_diffprune  # noqa: F401
    from peft_diffprune import DiffPruningConfig, param_groups, project_to_sparsity

    if method.endswith("_unfused"):
        # the gate's eager code of gates.py instead of the fused kernels of diff_pruning/fused.py
        from peft_diffprune.diff_pruning import fused

        fused.set_mode("off")
        method = method.removesuffix("_unfused")
    model = load_base(model_name, dtype)
    if method in ("full", "eval_base"):
        return model, make_optimizer(model.parameters(), optimizer, lr=1e-5, weight_decay=0.0)
    if method == "dense_reference":
        model = DenseDiffPruning(model)
        groups = [{"params": model.diffs.parameters()}, {"params": model.alphas.parameters(), "lr": 0.1}]
        return model, make_optimizer(groups, optimizer, lr=1e-5)
    peft_configs = {
        "lora_qv_r8": LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]),
        "lora_all_r8": LoraConfig(task_type="SEQ_CLS", r=8, target_modules="all-linear"),
        "supertuning": SupertuningConfig(
            task_type="SEQ_CLS", target_modules=["query", "key", "value", "dense"], sparsity=SUPERTUNING_SPARSITY
        ),
        "shira": ShiraConfig(task_type="SEQ_CLS", r=SHIRA_R, target_modules=["query", "value"]),
    }
    if method in peft_configs:
        model = get_peft_model(model, peft_configs[method])
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr=1e-4)
    config = DiffPruningConfig(
        task_type="SEQ_CLS", structured=method.endswith("structured"), init_weights=method != "fixmask"
    )
    model = get_peft_model(model, config, autocast_adapter_dtype=dtype == "fp32")
    if method == "fixmask":
        # The fixed-mask stage trains the 0.5% kept entries only (random diffs stand in for a stage-1 result). It is
        # loaded from a saved sparse adapter, as a stage-2 job would, so that freed stage-1 memory is not counted.
        project_to_sparsity(model, 0.005)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            del model
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed stage-1 memory back, as a fresh process would
            base = load_base(model_name, dtype)
            model = PeftModel.from_pretrained(base, folder, is_trainable=True, autocast_adapter_dtype=dtype == "fp32")
    return model, make_optimizer(param_groups(model, lr=1e-5, alpha_lr=0.1), optimizer)


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


def make_batches(vocab_size: int, batch_size: int, seq_len: int) -> list[dict]:
    """Two fixed batches of random token ids and labels (the same for every method), used in turn."""
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1000, vocab_size, (batch_size, seq_len), generator=generator),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=generator),
        }
        for _ in range(2)
    ]


def train_step(model, optimizer, batch: dict) -> None:
    """One optimizer step, its phases labelled for torch.profiler (profile_step.py)."""
    with torch.profiler.record_function("forward"):
        loss = model(**batch).loss
    with torch.profiler.record_function("backward"):
        loss.backward()
    with torch.profiler.record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def worker(args) -> None:
    """Build one method, then run one step per "step" line read from stdin and answer with its time; on "exit",
    answer with the peak RSS. Every answer is one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    optimizer_kind = args.full_optimizer if args.method == "full" and args.full_optimizer else args.optimizer
    model, optimizer = build(args.method, args.model, args.dtype, optimizer_kind)
    batches = make_batches(model.config.vocab_size, args.batch_size, args.seq_len)
    evaluating = args.method.startswith("eval")
    model.train(not evaluating)
    rss_before = status_mib("VmRSS")
    reset_peak_rss()
    ready = {"rss_before_training_mib": rss_before}
    # under heap_count_env() (pool_memory.py --heap_bytes): live heap bytes too, from the same moment
    heap = HeapBytes() if HeapBytes.loaded() else None
    if heap is not None:
        ready["heap_before_training_mib"] = heap.live_mib()
        heap.reset_peak()
    print(json.dumps(ready), flush=True)
    for step, command in enumerate(sys.stdin):
        if command.strip() == "exit":
            break
        batch = batches[step % 2]
        start, start_cpu = time.perf_counter(), time.process_time()
        if evaluating:
            with torch.no_grad():
                model(**batch)
        else:
            train_step(model, optimizer, batch)
        cpu_time = time.process_time() - start_cpu
        print(json.dumps({"step_time_s": time.perf_counter() - start, "cpu_time_s": cpu_time}), flush=True)
    peak = status_mib("VmHWM")
    final = {"peak_rss_mib": peak, "peak_over_loaded_mib": peak - rss_before}
    if heap is not None:
        final["peak_heap_mib"] = heap.peak_mib()
    print(json.dumps(final), flush=True)


class Worker:
    """One method in its own process, driven over its stdin/stdout."""

    def __init__(self, method: str, settings: dict):
        cmd = [sys.executable, __file__, "--method", method, *[f"--{k}={v}" for k, v in settings.items()]]
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self.ask(None)

    def ask(self, command: str | None) -> dict:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.process.args} died (exit code {self.process.wait()})")
        return json.loads(line)

    def close(self) -> dict:
        answer = self.ask("exit")
        self.process.wait()
        return answer


def groups(methods: list[str], max_workers: int) -> list[list[str]]:
    """Split `methods` into groups of at most `max_workers`, each led by its reference (full fine-tuning for training
    methods, the base model's forward for eval methods)."""
    out = []
    for reference in ("full", "eval_base"):
        others = [m for m in methods if m != reference and m.startswith("eval") == reference.startswith("eval")]
        if reference in methods and not others:
            out.append([reference])
        out += [[reference, *others[i : i + max_workers - 1]] for i in range(0, len(others), max_workers - 1)]
    return out


def measure(methods: list[str], settings: dict, rounds: int, warmup: int, max_workers: int = 5) -> dict:
    """Step time and peak RSS of each method, and their ratios to the reference, measured in interleaved rounds."""
    results = {}
    for group in groups(methods, max_workers):
        workers = {}
        try:
            for method in group:
                workers[method] = Worker(method, settings)
            times = {method: [] for method in group}
            cpu_times = {method: [] for method in group}
            loads = []
            for _ in range(warmup + rounds):
                loads.append(os.getloadavg()[0])
                for method, worker in workers.items():
                    answer = worker.ask("step")
                    times[method].append(answer["step_time_s"])
                    cpu_times[method].append(answer["cpu_time_s"])
            peaks = {method: worker.close() for method, worker in workers.items()}
        finally:
            for worker in workers.values():
                worker.process.kill()
        reference = group[0]
        for method in group:
            if method in results:
                continue
            timed = times[method][warmup:]
            ratios = [t / r for t, r in zip(timed, times[reference][warmup:], strict=True)]
            cpu_timed = cpu_times[method][warmup:]
            cpu_ratios = [t / r for t, r in zip(cpu_timed, cpu_times[reference][warmup:], strict=True)]
            results[method] = {
                "step_time_s": statistics.median(timed),
                "step_times_s": timed,
                "time_ratio": statistics.median(ratios),
                "time_ratios": ratios,
                "cpu_time_s": statistics.median(cpu_timed),
                "cpu_time_ratio": statistics.median(cpu_ratios),
                "cpu_time_ratios": cpu_ratios,
                "load_average_1min": loads[warmup:],
                **workers[method].ready,
                **peaks[method],
                "peak_rss_ratio": peaks[method]["peak_rss_mib"] / peaks[reference]["peak_rss_mib"],
                "peak_over_loaded_ratio": peaks[method]["peak_over_loaded_mib"]
                / peaks[reference]["peak_over_loaded_mib"],
            }
            if "peak_heap_mib" in peaks[method]:
                results[method]["peak_heap_ratio"] = peaks[method]["peak_heap_mib"] / peaks[reference]["peak_heap_mib"]
            print(
                f"{method:28s} {results[method]['step_time_s']:.3f} s  time x{results[method]['time_ratio']:.3f}  "
                f"peak RSS x{results[method]['peak_rss_ratio']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, help="run one method as a worker (internal)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--model", default="minilm", help=f"one of {', '.join(MODELS)}, or a model folder")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="of the base model and the adapter state")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="fused", help="how AdamW runs")
    parser.add_argument(
        "--full_optimizer", choices=OPTIMIZERS, default=None, help="how full fine-tuning's AdamW runs (--optimizer's)"
    )
    parser.add_argument("--max_workers", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    if args.method:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    keys = ("model", "batch_size", "seq_len", "threads", "dtype", "optimizer", "full_optimizer")
    settings = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    results = measure(args.methods, settings, args.rounds, args.warmup, args.max_workers)
    write_record(args.output, {**settings, "rounds": args.rounds, "warmup": args.warmup}, results)


if __name__ == "__main__":
    main()
