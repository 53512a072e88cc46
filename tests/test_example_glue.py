"""End-to-end tests of examples/glue.py on a tiny random BERT and real RTE data, offline.

Every run is a subprocess, as a user would start it: one process with `python`, two with `accelerate launch`. The
tiny model (hidden size 32, two layers) shares the packaged MiniLM's tokenizer, so its vocabulary is the real one.
Launches are the slow part, so each run is made once per session and checked by several tests.
"""

import inspect
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    DataCollatorWithPadding,
)

import peft_diffprune  # noqa: F401  (registers diff pruning with PEFT for PeftModel.from_pretrained)
from peft_diffprune.recipe.glue import compute_glue_metrics, load_glue, predictions_from_logits, tokenize_glue
from peft_diffprune.recipe.hub import packaged_minilm_path


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "glue.py"
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO_ROOT.parent / "shared" / "data" / "glue"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

MAX_LENGTH = 64
EVAL_SAMPLES = 32
TARGET_SPARSITY = 0.005
# 64 examples in batches of 8: 8 batches per epoch; 5 steps per stage, a checkpoint after step 3 of each stage.
COMMON_ARGS = [
    "--task_name", "rte",
    "--max_train_samples", "64",
    "--max_eval_samples", str(EVAL_SAMPLES),
    "--max_length", str(MAX_LENGTH),
    "--max_train_steps", "5",
    "--logging_steps", "2",
    "--target_sparsity", str(TARGET_SPARSITY),
    "--learning_rate", "1e-3",
    "--fixmask_learning_rate", "1e-3",
]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (GLUE_DIR / "RTE" / "train.tsv").is_file(), reason=f"no GLUE data in {GLUE_DIR}"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_example(
    args: list[str], processes: int = 1, check: bool = True, env: dict | None = None, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run examples/glue.py offline, with `python` for one process and `accelerate launch` for several (or with
    `launcher`, a command to put before the script)."""
    if launcher is not None:
        command = [*launcher, str(SCRIPT)]
    elif processes == 1:
        command = [sys.executable, str(SCRIPT)]
    else:
        # `accelerate launch --cpu --num_processes N` would start a single process (it needs MPI for more); this
        # goes through torchrun, and the script's --cpu makes the processes one CPU data-parallel group.
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            str(SCRIPT), "--cpu",
        ]  # fmt: skip
    result = subprocess.run(
        command + args,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE, **(env or {})},
        cwd=REPO_ROOT,
        timeout=600,
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command + args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer BERT encoder (no task head) with the packaged MiniLM's tokenizer, saved to a folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        # prefix tuning's virtual tokens shift BERT's positions by their number
        max_position_embeddings=MAX_LENGTH + 16,
        # no dropout, so that full fine-tuning computes the same updates on one process and on two
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def eval_batch(tiny_model) -> dict[str, torch.Tensor]:
    """The evaluation examples the runs use (first EVAL_SAMPLES of RTE dev), tokenized and padded in one batch."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    validation = tokenize_glue(load_glue("rte", GLUE_DIR), tokenizer, "rte", MAX_LENGTH)["validation"]
    return DataCollatorWithPadding(tokenizer)([validation[i] for i in range(EVAL_SAMPLES)])


@pytest.fixture(scope="session")
def runs(tiny_model, tmp_path_factory):
    """Runs made at most once per session, by name; each returns its output folder."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(name: str, args: list[str], processes: int = 1) -> Path:
        if name not in made:
            output_dir = root / name
            run = run_example(
                [*COMMON_ARGS, "--model_name_or_path", str(tiny_model), "--data_dir", str(GLUE_DIR)]
                + ["--output_dir", str(output_dir), *args],
                processes,
            )
            (output_dir / "stdout.txt").write_text(run.stdout + run.stderr)
            (output_dir / "table.txt").write_text(run.stdout)
            made[name] = output_dir
        return made[name]

    return get


def diff_pruning_run(runs) -> Path:
    """The reference run: diff pruning on one process, checkpointing every 3 steps."""
    return runs("diff_pruning", ["--per_device_train_batch_size", "8", "--checkpointing_steps", "3"])


def load_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def assert_saved_model_reproduces(output_dir: Path, tiny_model: Path, eval_batch, results: dict) -> None:
    """Reload what the run saved and check that it gives the metrics and eval loss the run reported."""
    if results["method"] == "full":
        model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    elif results["method"] == "bitfit":
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
        loaded = model.load_state_dict(load_file(output_dir / "bitfit_model.safetensors"), strict=False)
        assert not loaded.unexpected_keys
    else:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
        model = PeftModel.from_pretrained(base, output_dir)
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in eval_batch.items() if k != "labels"}).logits
    labels = eval_batch["labels"]
    metrics = compute_glue_metrics("rte", predictions_from_logits("rte", logits.numpy()), labels.numpy())
    reported = results["metrics"]["validation"]
    assert metrics["accuracy"] == reported["accuracy"]
    assert F.cross_entropy(logits, labels).item() == pytest.approx(reported["loss"], abs=1e-5)


def test_diff_pruning_one_process(runs, tiny_model, eval_batch):
    output_dir = diff_pruning_run(runs)
    results = load_results(output_dir)

    assert results["task"] == "rte" and results["method"] == "diff_pruning" and results["num_processes"] == 1
    assert results["args"]["target_sparsity"] == TARGET_SPARSITY
    assert set(results["stages"]) == {"gated", "projection", "fixmask"}
    for stage in ("gated", "fixmask"):
        assert results["stages"][stage]["steps"] == 5
        assert results["stages"][stage]["train_seconds"] > 0
        assert set(results["stages"][stage]["metrics"]["validation"]) == {"accuracy", "loss"}
    assert results["stages"]["projection"]["metrics"]["validation"]["accuracy"] >= 0
    assert results["metrics"] == results["stages"]["fixmask"]["metrics"]
    assert results["kept"] == round(TARGET_SPARSITY * results["total_parameters"])
    assert results["stages"]["projection"]["kept"] == results["kept"]
    assert results["density"] == pytest.approx(TARGET_SPARSITY, rel=1e-3)
    assert sum(t["kept"] for t in results["tensors"]) == results["kept"]
    assert results["adapter_bytes"] == (output_dir / "adapter_model.safetensors").stat().st_size
    assert set(results["wall_seconds"]) == {"gated", "projection", "fixmask"}
    for plot in ("training_curves.png", "layer_density.png"):
        assert (output_dir / plot).read_bytes().startswith(b"\x89PNG")

    log = (output_dir / "stdout.txt").read_text()
    assert "gated step 2/5: task_loss" in log and "expected_density" in log and "l0_term" in log
    assert results["args"]["l0_lambda"] == 1.25e-5  # the example's default for short runs (docs/training.md)

    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert sum(adapter_config["kept_pattern"].values()) == results["kept"]
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


def test_structured_diff_pruning_weighs_the_group_gates_apart(runs):
    # a group gate's penalty counts its whole tensor: at the element gates' 1.25e-5 every group closes
    output_dir = runs("structured", ["--per_device_train_batch_size", "8", "--structured"])
    results = load_results(output_dir)
    assert results["structured"] is True
    assert results["args"]["l0_lambda"] == 1.25e-5 and results["args"]["group_l0_lambda"] == 1.25e-7
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["structured"] is True and adapter_config["group_l0_lambda"] == 1.25e-7
    assert results["kept"] == round(TARGET_SPARSITY * results["total_parameters"])


def test_diff_pruning_two_processes_match_one(runs, tiny_model, eval_batch):
    """Same global batch (2 x 4 instead of 1 x 8), same data order. Each process samples its own gates, as another
    micro-batch would, so the runs are not identical: the kept count is, metrics agree within a loose tolerance."""
    one = load_results(diff_pruning_run(runs))
    # float16 values in the saved adapter: the reported metrics must be those of the rounded diff
    args = ["--per_device_train_batch_size", "4", "--values_dtype", "float16"]
    output_dir = runs("diff_pruning_2proc", args, processes=2)
    two = load_results(output_dir)
    assert json.loads((output_dir / "adapter_config.json").read_text())["values_dtype"] == "float16"

    assert two["num_processes"] == 2 and two["total_train_batch_size"] == one["total_train_batch_size"] == 8
    assert two["kept"] == one["kept"]
    for stage in ("gated", "projection", "fixmask"):
        metrics_one, metrics_two = (
            one["stages"][stage]["metrics"]["validation"],
            two["stages"][stage]["metrics"]["validation"],
        )
        assert metrics_two["accuracy"] == pytest.approx(metrics_one["accuracy"], abs=3 / EVAL_SAMPLES)
        assert metrics_two["loss"] == pytest.approx(metrics_one["loss"], abs=2e-3)
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, two)


@pytest.mark.parametrize("checkpoint", ["gated_step_3", "fixmask_step_3"])
def test_resume_matches_uninterrupted(runs, checkpoint, tiny_model, eval_batch):
    reference_dir = diff_pruning_run(runs)
    assert (reference_dir / "fixmask_step_3" / "projection" / "adapter_config.json").is_file()
    output_dir = runs(
        f"resume_{checkpoint}",
        ["--per_device_train_batch_size", "8", "--resume_from_checkpoint", str(reference_dir / checkpoint)],
    )
    reference, resumed = load_results(reference_dir), load_results(output_dir)

    assert resumed["resumed_from"] == str(reference_dir / checkpoint)
    for stage in ("gated", "projection", "fixmask"):
        assert resumed["stages"][stage]["metrics"] == reference["stages"][stage]["metrics"]
    assert resumed["kept"] == reference["kept"]
    reference_adapter = load_file(reference_dir / "adapter_model.safetensors")
    resumed_adapter = load_file(output_dir / "adapter_model.safetensors")
    assert reference_adapter.keys() == resumed_adapter.keys()
    for key, tensor in reference_adapter.items():
        assert torch.equal(tensor, resumed_adapter[key]), key
    assert "Resuming from" in (output_dir / "stdout.txt").read_text()
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, resumed)


def test_full_fine_tuning_two_processes_match_one(runs, tiny_model, eval_batch):
    """Full fine-tuning has no sampled gates and the model no dropout: 1 x 8 and 2 x 4 agree to rounding."""
    one_dir = runs("full", ["--method", "full", "--per_device_train_batch_size", "8"])
    two_dir = runs("full_2proc", ["--method", "full", "--per_device_train_batch_size", "4"], processes=2)
    one, two = load_results(one_dir), load_results(two_dir)

    assert one["method"] == "full" and set(one["stages"]) == {"train"}
    assert one["adapter_bytes"] == (one_dir / "model.safetensors").stat().st_size
    assert two["num_processes"] == 2
    assert two["metrics"]["validation"]["accuracy"] == one["metrics"]["validation"]["accuracy"]
    assert two["metrics"]["validation"]["loss"] == pytest.approx(one["metrics"]["validation"]["loss"], abs=1e-5)
    assert_saved_model_reproduces(one_dir, tiny_model, eval_batch, one)


def test_lora_baseline(runs, tiny_model, eval_batch):
    output_dir = runs("lora", ["--method", "lora", "--lora_r", "4"])
    results = load_results(output_dir)

    assert results["method"] == "lora" and set(results["stages"]) == {"train"}
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (output_dir / "training_curves.png").is_file()
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


def test_non_adaptive_diff_pruning(runs, tiny_model, eval_batch):
    """Full fine-tuning, its diff pruned by magnitude to the target, then the fixed-mask stage."""
    output_dir = runs("non_adaptive", ["--method", "non_adaptive", "--per_device_train_batch_size", "8"])
    results = load_results(output_dir)

    assert results["method"] == "non_adaptive" and list(results["stages"]) == ["train", "projection", "fixmask"]
    for stage in ("train", "fixmask"):
        assert results["stages"][stage]["steps"] == 5
    assert results["kept"] == round(TARGET_SPARSITY * results["total_parameters"])
    assert results["stages"]["projection"]["kept"] == results["kept"]
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "DIFF_PRUNING"
    # the fixed-mask stage trains the kept entries and the dense task head (32 x 2 + 2), nothing else
    assert results["trainable_parameters"] == results["kept"] + 66
    assert (output_dir / "layer_density.png").read_bytes().startswith(b"\x89PNG")
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


def test_bitfit_saves_only_biases_and_head(runs, tiny_model, eval_batch):
    output_dir = runs("bitfit", ["--method", "bitfit"])
    results = load_results(output_dir)
    saved = load_file(output_dir / "bitfit_model.safetensors")

    assert results["method"] == "bitfit"
    assert saved and all(name.endswith(".bias") or name.startswith("classifier.") for name in saved)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    biases = [name for name, _ in base.named_parameters() if name.endswith(".bias")]
    assert set(saved) == {*biases, "classifier.weight"}
    assert results["trainable_parameters"] == sum(tensor.numel() for tensor in saved.values())
    assert results["adapter_bytes"] == (output_dir / "bitfit_model.safetensors").stat().st_size
    pretrained = base.state_dict()
    assert all(not torch.equal(saved[name], pretrained[name]) for name in biases)
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


# PEFT's prefix tuning feeds BERT past_key_values, which BertModel.forward stopped taking in transformers 5.24
PREFIX_TUNING_WORKS = "past_key_values" in inspect.signature(BertModel.forward).parameters

# method, its flags, the saved adapter's peft_type, and the tensor names (last two parts) the file holds besides the
# task head
PEFT_BASELINES = [
    (
        "supertuning",
        [],
        "SUPERTUNING",
        {
            f"{module}.supertuning_{kind}"
            for module in ("query", "key", "value", "dense")
            for kind in ("values", "indices")
        },
    ),
    pytest.param(
        "prefix",
        ["--num_virtual_tokens", "4"],
        "PREFIX_TUNING",
        {"prompt_embeddings"},
        marks=pytest.mark.skipif(not PREFIX_TUNING_WORKS, reason="BERT takes no past_key_values (transformers>=5.24)"),
    ),
    (
        "parallel_adapter",
        ["--adapter_r", "4"],
        "PARALLEL_ADAPTER",
        {"parallel_adapter_down.weight", "parallel_adapter_down.bias", "parallel_adapter_up.weight"}
        | {"parallel_adapter_up.bias"},
    ),
    (
        "mam",
        ["--adapter_r", "4", "--prefix_length", "4"],
        "MAM",
        {"mam_down.weight", "mam_down.bias", "mam_up.weight", "mam_up.bias", "self.mam_prefix_key"}
        | {"self.mam_prefix_value"},
    ),
]


@pytest.mark.skipif(PREFIX_TUNING_WORKS, reason="this transformers still passes past_key_values to BERT")
def test_prefix_baseline_is_refused_before_training_when_bert_takes_no_past_key_values(tiny_model):
    args = [*COMMON_ARGS, "--model_name_or_path", str(tiny_model), "--data_dir", str(GLUE_DIR), "--method", "prefix"]
    result = run_example(args, check=False)
    assert result.returncode != 0
    assert "past_key_values" in result.stderr and "--method mam" in result.stderr
    assert "Stage" not in result.stdout + result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("method", "args", "peft_type", "tensors"),
    PEFT_BASELINES,
    ids=[getattr(m, "values", m)[0] for m in PEFT_BASELINES],
)
def test_peft_baseline(runs, method, args, peft_type, tensors, tiny_model, eval_batch):
    output_dir = runs(method, ["--method", method, *args])
    results = load_results(output_dir)
    saved = load_file(output_dir / "adapter_model.safetensors")

    assert results["method"] == method and results["seed"] == 42 and list(results["stages"]) == ["train"]
    assert "accuracy" in results["metrics"]["validation"] and results["total_wall_seconds"] > 0
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == peft_type
    assert results["adapter_bytes"] == (output_dir / "adapter_model.safetensors").stat().st_size
    head = {name for name in saved if "classifier" in name}
    assert len(head) == 2
    assert {".".join(name.split(".")[-2:]) for name in saved if name not in head} == tensors
    if method == "supertuning":
        # 1.1% of every linear weight of the encoder and pooler (--supertuning_sparsity 0.989), plus the head
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
        linear = [
            m.weight.numel()
            for n, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and "classifier" not in n
        ]
        values = sum(tensor.numel() for name, tensor in saved.items() if name.endswith("supertuning_values"))
        assert values == pytest.approx(0.011 * sum(linear), abs=len(linear))
        assert results["trainable_parameters"] == values + 66
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


@pytest.fixture(scope="session")
def three_label_model(tiny_model, tmp_path_factory) -> Path:
    """A checkpoint whose classification head has 3 labels, which RTE (2 labels) cannot use."""
    folder = tmp_path_factory.mktemp("three_labels")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_optimizer_in_backward_trains_as_the_ordinary_optimizer(runs, tiny_model, eval_batch):
    args = ["--per_device_train_batch_size", "8", "--max_grad_norm", "0"]
    ordinary = load_results(runs("no_clipping", args))
    output_dir = runs("in_backward", [*args, "--optimizer_in_backward"])
    in_backward = load_results(output_dir)
    assert in_backward["kept"] == ordinary["kept"]
    for split, metrics in ordinary["metrics"].items():
        assert in_backward["metrics"][split]["loss"] == pytest.approx(metrics["loss"], rel=1e-4), split
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, in_backward)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown_task", "invalid choice: 'nosuchtask'"),
        ("data_dir_without_task", "No local GLUE data for 'rte'"),
        ("head_with_other_num_labels", "has a classification head with 3 labels, but rte needs 2"),
        ("target_sparsity_zero", "--target_sparsity must be in (0, 1]"),
        ("target_sparsity_above_one", "--target_sparsity must be in (0, 1]"),
        ("group_l0_lambda_without_structured", "--group_l0_lambda weighs the group gates"),
        ("reference_results_missing", "--reference_results: "),
        ("in_backward_with_clipping", "so per-group clipping cannot run: add --max_grad_norm 0"),
        ("in_backward_with_accumulation", "gradient accumulation is not possible"),
    ],
)
def test_bad_input_fails_before_training(case, message, tiny_model, three_label_model, tmp_path):
    args = {
        "unknown_task": ["--task_name", "nosuchtask"],
        "data_dir_without_task": ["--data_dir", str(tmp_path / "empty_glue")],
        "head_with_other_num_labels": ["--model_name_or_path", str(three_label_model)],
        "target_sparsity_zero": ["--target_sparsity", "0"],
        "target_sparsity_above_one": ["--target_sparsity", "1.5"],
        "group_l0_lambda_without_structured": ["--group_l0_lambda", "1e-7"],
        "reference_results_missing": ["--reference_results", str(tmp_path / "nowhere" / "results.json")],
        "in_backward_with_clipping": ["--optimizer_in_backward"],
        "in_backward_with_accumulation": [
            "--optimizer_in_backward", "--max_grad_norm", "0", "--gradient_accumulation_steps", "2"
        ],
    }[case]  # fmt: skip
    output_dir = tmp_path / "output"
    defaults = ["--model_name_or_path", str(tiny_model), "--data_dir", str(GLUE_DIR), "--output_dir", str(output_dir)]
    # later occurrences of an option win in argparse, so `args` overrides the defaults
    result = run_example([*COMMON_ARGS, *defaults, *args], check=False)

    assert result.returncode != 0
    assert message in result.stderr
    assert "Stage gated" not in result.stdout + result.stderr
    assert not (output_dir / "results.json").exists()


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The closing table's rows by method: the cells, split on runs of two spaces or more."""
    lines = stdout[stdout.index("method ") :].split("\n\n")[0].splitlines()
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in lines)}


def test_closing_table_reports_the_run_and_where_its_outputs_are(runs):
    output_dir = diff_pruning_run(runs)
    results = load_results(output_dir)
    stdout = (output_dir / "table.txt").read_text()
    rows = table_rows(stdout)

    assert rows["method"] == ["dev accuracy", "kept entries", "adapter bytes", "wall time"]
    score, kept, size, wall = rows["diff_pruning"]
    assert float(score) == pytest.approx(results["metrics"]["validation"]["accuracy"], abs=5e-5)
    assert kept == f"{results['kept']:,}" and size == f"{results['adapter_bytes']:,}"
    assert re.fullmatch(r"(\d+m )?\d+s", wall)
    assert f"adapter:      {output_dir / 'adapter_model.safetensors'}" in stdout
    assert f"results.json: {output_dir / 'results.json'}" in stdout
    assert f"{output_dir / 'layer_density.png'}, {output_dir / 'training_curves.png'}" in stdout


def test_reference_results_add_the_reference_row(runs):
    reference = load_results(diff_pruning_run(runs))
    output_dir = runs(
        "full_with_reference",
        ["--method", "full", "--reference_results", str(diff_pruning_run(runs) / "results.json")],
    )
    rows = table_rows((output_dir / "table.txt").read_text())
    assert list(rows) == ["method", "full", "diff_pruning (reference)"]
    assert rows["diff_pruning (reference)"][1:3] == [f"{reference['kept']:,}", f"{reference['adapter_bytes']:,}"]
    # full fine-tuning has no projected diff: its trainable parameters stand in the kept column
    assert rows["full"][1] == f"{load_results(output_dir)['trainable_parameters']:,}"
    # the task's label names are in the model config, so the saved model answers with them
    config = json.loads((output_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert load_results(output_dir)["label_names"] == ["entailment", "not_entailment"]


def fake_matplotlib(folder: Path, body: str) -> dict[str, str]:
    """An environment whose `import matplotlib` runs `body` instead of the real package."""
    (folder / "matplotlib").mkdir(parents=True)
    (folder / "matplotlib" / "__init__.py").write_text(body)
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def test_a_failing_plot_loses_neither_results_nor_adapter(tiny_model, tmp_path):
    env = fake_matplotlib(tmp_path / "site", "def use(*args, **kwargs):\n    raise RuntimeError('no display today')\n")
    output_dir = tmp_path / "output"
    args = [*COMMON_ARGS, "--model_name_or_path", str(tiny_model), "--data_dir", str(GLUE_DIR)]
    result = run_example([*args, "--output_dir", str(output_dir), "--max_train_steps", "1"], env=env)

    results = load_results(output_dir)
    assert results["plot_error"] == "RuntimeError: no display today"
    assert (output_dir / "adapter_model.safetensors").stat().st_size == results["adapter_bytes"]
    assert "Plotting failed (RuntimeError: no display today)" in result.stderr
    assert "plots:        FAILED (RuntimeError: no display today)" in result.stdout
    assert not (output_dir / "training_curves.png").exists()


def test_missing_matplotlib_stops_before_training(tiny_model, tmp_path):
    env = fake_matplotlib(tmp_path / "site", "raise ModuleNotFoundError(\"No module named 'matplotlib'\")\n")
    args = [*COMMON_ARGS, "--model_name_or_path", str(tiny_model), "--data_dir", str(GLUE_DIR)]
    result = run_example([*args, "--output_dir", str(tmp_path / "output")], env=env, check=False)
    assert result.returncode != 0
    assert "the plots need matplotlib" in result.stderr and "--no_plots" in result.stderr
    assert "Stage gated" not in result.stdout + result.stderr


LAUNCH_FAILURES = {
    # one process, FSDP asked for through the environment `accelerate launch --use_fsdp` sets: it would run unsharded
    "fsdp_one_process": ({"ACCELERATE_USE_FSDP": "true"}, None, "FSDP was requested"),
    # the launch on a CPU-only machine: Accelerate's FSDP plugin finds no device
    "fsdp_two_processes": (
        {},
        [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
        "FSDP was requested",
    ),
    # torchrun on CPU without --cpu: two processes that each train alone
    "two_processes_no_group": (
        {},
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
        "2 processes were launched but Accelerate formed no group",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LAUNCH_FAILURES))
def test_launches_that_would_not_train_as_asked_stop_before_training(case, tiny_model, tmp_path):
    env, launcher, message = LAUNCH_FAILURES[case]
    launcher = launcher and [*launcher, str(free_port())]  # torchrun waits forever on port 0
    output_dir = tmp_path / "output"
    args = [*COMMON_ARGS, "--model_name_or_path", str(tiny_model), "--data_dir", str(GLUE_DIR)]
    result = run_example([*args, "--output_dir", str(output_dir)], env=env, launcher=launcher, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Stage gated" not in result.stdout + result.stderr
    assert not (output_dir / "results.json").exists()


def test_diff_pruning_over_a_candidate_pool(runs, tiny_model, eval_batch):
    """--candidate_pool: the gated stage trains only the pool (2 numbers per entry and the head), regrows it, and
    projects it to the same budget; the saved adapter reproduces the reported metrics."""
    output_dir = runs(
        "candidate_pool",
        ["--per_device_train_batch_size", "8", "--candidate_pool", "4", "--pool_regrow_steps", "2"],
    )
    results = load_results(output_dir)
    assert results["kept"] == round(TARGET_SPARSITY * results["total_parameters"])
    log = (output_dir / "stdout.txt").read_text()
    trainable = int(log.split("Stage gated")[1].split("Trainable parameters = ")[1].split()[0].replace(",", ""))
    head = 32 * 2 + 2
    assert trainable == 2 * round(4 * TARGET_SPARSITY * results["total_parameters"]) + head
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


def test_pool_regrow_fraction_regrows_open_entries_and_reports_how_many(runs, tiny_model, eval_batch):
    """--pool_regrow_fraction: every regrowth also replaces the smallest open entries, so entries are regrown in a
    run too short for any gate to close; results.json and the log say how many, and the adapter still reproduces."""
    pool_args = ["--per_device_train_batch_size", "8", "--candidate_pool", "4", "--pool_regrow_steps", "2"]
    plain = load_results(runs("candidate_pool", pool_args))
    assert plain["stages"]["gated"]["pool_regrown"] == 0  # no gate closes in these few steps
    output_dir = runs("candidate_pool_fraction", [*pool_args, "--pool_regrow_fraction", "0.25"])
    results = load_results(output_dir)
    logged = [
        int(line.split("regrew ")[1].split()[0])
        for line in (output_dir / "stdout.txt").read_text().splitlines()
        if " regrew " in line
    ]
    assert len(logged) == results["stages"]["gated"]["steps"] // 2
    assert results["stages"]["gated"]["pool_regrown"] == sum(logged) > 0
    assert results["kept"] == plain["kept"]
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


def test_pool_score_batches_chooses_and_regrows_the_pool_from_that_many_batches(runs, tiny_model, eval_batch):
    """--pool_score_batches: the pool is chosen from that many batches (the log says so, the adapter's config keeps
    it) and is another pool than the default's four batches choose; the adapter still reproduces."""
    pool_args = ["--per_device_train_batch_size", "8", "--candidate_pool", "4", "--pool_regrow_steps", "2"]
    default_dir = runs("candidate_pool", pool_args)
    output_dir = runs("candidate_pool_one_batch", [*pool_args, "--pool_score_batches", "1"])
    for directory, batches in ((default_dir, 4), (output_dir, 1)):
        log = (directory / "stdout.txt").read_text()
        assert f"chosen from {batches} batches" in log
        saved = json.loads((directory / "adapter_config.json").read_text())
        assert saved["pool_score_batches"] == batches
    assert load_results(output_dir)["metrics"] != load_results(default_dir)["metrics"]
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, load_results(output_dir))
    # more than the training set has (64 examples, 8 batches): all of them, and the log counts what was used
    log = (runs("candidate_pool_all_batches", [*pool_args, "--pool_score_batches", "20"]) / "stdout.txt").read_text()
    assert "chosen from 8 batches" in log


def test_selective_checkpointing_of_a_pool_run_changes_no_number(runs, tiny_model, eval_batch):
    """--activation_checkpointing selective: the pool is chosen and trained with its layers checkpointed (both
    recompute the same values: no dropout here, the gates drawn again from the same state), so the run's
    metrics, kept entries and saved adapter are those of the same run without it."""
    pool_args = ["--per_device_train_batch_size", "8", "--candidate_pool", "4", "--pool_regrow_steps", "2"]
    reference = load_results(runs("candidate_pool", pool_args))
    output_dir = runs("candidate_pool_selective", [*pool_args, "--activation_checkpointing", "selective"])
    results = load_results(output_dir)
    assert results["kept"] == reference["kept"]
    for name, value in reference["metrics"].items():
        assert results["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


def test_lean_activations_of_a_pool_run_change_no_number(runs, tiny_model, eval_batch):
    """--lean_activations: the pool is chosen and trained with its GELU and layer norm outputs and its masks saved as
    recipes, which rebuild the same bits, so the run's metrics, kept entries and saved adapter are those of the same
    run without it."""
    assert_pool_run_is_the_plain_one(runs, tiny_model, eval_batch, "candidate_pool_lean", ["--lean_activations"])


def assert_pool_run_is_the_plain_one(runs, tiny_model, eval_batch, name: str, flags: list[str]) -> None:
    """The candidate pool run with `flags` has the plain run's kept entries and metrics, bit for bit, and saves an
    adapter that reproduces them."""
    pool_args = ["--per_device_train_batch_size", "8", "--candidate_pool", "4", "--pool_regrow_steps", "2"]
    reference = load_results(runs("candidate_pool", pool_args))
    output_dir = runs(name, [*pool_args, *flags])
    results = load_results(output_dir)
    assert results["kept"] == reference["kept"]
    assert results["metrics"] == reference["metrics"]
    assert_saved_model_reproduces(output_dir, tiny_model, eval_batch, results)


def test_penalty_until_target_reaches_the_config(runs):
    """--penalty_until_target: the gated stage's config carries it (and so does the saved adapter's); with every gate
    open and a budget of all entries, no step adds a penalty, so the logged L0 term is 0 throughout."""
    output_dir = runs(
        "until_target",
        ["--per_device_train_batch_size", "8", "--penalty_until_target", "--target_sparsity", "1.0"],
    )
    saved = json.loads((output_dir / "adapter_config.json").read_text())
    assert saved["penalty_until_target"] is True
    terms = re.findall(r"gated step \d+/\d+: .*?l0_term (\S+),", (output_dir / "stdout.txt").read_text())
    assert terms and all(float(term) == 0.0 for term in terms)


def test_the_main_jobs_flags_on_a_tiny_slice(runs):
    """`make glue`'s flags (the Makefile's MAIN_JOB_FLAGS), on a slice of SST-2 that takes seconds: the recipe runs
    with them, prints its table and saves an adapter whose config carries them."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    flags = re.search(r"^MAIN_JOB_FLAGS := (.*)$", makefile, re.MULTILINE).group(1).split()
    slice_args = ["--max_train_samples", "64", "--max_train_steps", "5", "--max_length", str(MAX_LENGTH)]
    output_dir = runs("main_job_flags", [*flags, *slice_args, "--per_device_train_batch_size", "8"])
    results = load_results(output_dir)
    assert results["task"] == "sst2" and results["kept"] == round(TARGET_SPARSITY * results["total_parameters"])
    assert list(table_rows((output_dir / "table.txt").read_text())) == ["method", "diff_pruning"]
    saved = json.loads((output_dir / "adapter_config.json").read_text())
    assert saved["penalty_until_target"] is ("--penalty_until_target" in flags)


def test_threaded_dropout_of_a_pool_run_without_dropout_changes_no_number(runs, tiny_model, eval_batch):
    """--threaded_dropout: its hooks sit on every module through choosing, training, projecting, saving and
    evaluating the pool; the tiny model has no dropout, so every number is that of the same run without it."""
    assert_pool_run_is_the_plain_one(
        runs, tiny_model, eval_batch, "candidate_pool_threaded_dropout", ["--threaded_dropout"]
    )
