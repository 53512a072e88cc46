"""The GLUE accuracy table on one GPU, checked on a CPU in seconds: the runner's side-by-side runs (`--jobs`), the
plan of the "gpu" budget (benchmarks/glue_accuracy.py) and the refusals of its one command (benchmarks/gpu_accuracy.sh).
No run trains here: `run_one` is replaced, and the script stops before it would start one."""

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_accuracy.sh"
TABLE_METHODS = ["structured", "diff_pruning", "full", "lora"]


@pytest.fixture
def runner(monkeypatch):
    """benchmarks/glue_accuracy.py, imported by path (it imports its neighbour `_record`)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("glue_accuracy_under_test", BENCHMARKS / "glue_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(runner, monkeypatch, *argv: str):
    monkeypatch.setattr(sys, "argv", ["glue_accuracy.py", *argv])
    args = runner.parse_args()
    args.tasks = args.tasks or list(runner.BUDGETS[args.budget])
    return args


def record(budget: str, task: str, method: str, seed: int, score: float = 0.5) -> dict:
    return {"budget": budget, "task": task, "method": method, "seed": seed, "main_metric": "accuracy"} | {
        "metrics": {"accuracy": score},
        "wall_seconds": 0.0,
    }


def test_jobs_make_every_planned_run_once_and_append_one_record_each(runner, monkeypatch, tmp_path):
    output = tmp_path / "records.jsonl"
    made, guard = [], threading.Lock()
    # the first two runs wait for each other: with one run at a time the second never comes and the barrier breaks
    first_two = threading.Barrier(2, timeout=20)

    def fake_run_one(args, task, method, seed):
        with guard:
            made.append((task, method, seed))
            waits = len(made) <= 2
        if waits:
            first_two.wait()
        return record(args.budget, task, method, seed)

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    argv = ["--budget", "gpu", "--methods", "full", "lora", "--seeds", "1", "2", "--jobs", "2"]
    argv += ["--output", str(output), "--work_dir", str(tmp_path / "work")]
    parse(runner, monkeypatch, *argv)
    runner.main()

    planned = [(task, method, seed) for seed in (1, 2) for method in ("full", "lora") for task in runner.TASKS]
    assert len(made) == len(set(made)) == 20
    assert sorted(made) == sorted(planned)
    lines = output.read_text().splitlines()
    assert len(lines) == 20
    assert sorted((r["task"], r["method"], r["seed"]) for r in map(json.loads, lines)) == sorted(planned)
    assert not first_two.broken
    # resumable: a second invocation finds every run made and makes none
    made.clear()
    runner.main()
    assert made == []
    assert len(output.read_text().splitlines()) == 20


def test_the_gpu_budget_makes_the_whole_table_in_120_runs(runner, monkeypatch, tmp_path):
    output = tmp_path / "records.jsonl"
    common = ["--budget", "gpu", "--methods", *TABLE_METHODS, "--output", str(output)]
    sweep = runner.planned_runs(parse(runner, monkeypatch, *common, "--sweep"))
    assert len(sweep) == len(set(sweep)) == 5 * (3 + 4 + 4 + 5) == 80
    seeds_args = parse(runner, monkeypatch, *common, "--at_picked_lr", "--seeds", "1", "2", "3")
    assert runner.planned_runs(seeds_args) == []  # no rate is picked before the sweep

    # the sweep's records, the second rate of every sweep scoring best
    lines = []
    for task, method, seed in sweep:
        swept, rate = method.rsplit("_lr", 1)
        lines.append(json.dumps(record("gpu", task, method, seed, 0.9 if rate == runner.SWEEP[swept][1] else 0.5)))
    output.write_text("\n".join(lines) + "\n")
    seeds = runner.planned_runs(seeds_args)
    assert len(seeds) == 4 * 5 * 3
    assert {method for _, method, _ in seeds} == {f"{name}_lr{runner.SWEEP[name][1]}" for name in TABLE_METHODS}
    new = [run for run in seeds if ("gpu", *run) not in runner.finished_runs(output)]
    assert len(new) == 40  # seed 1 of each row is its sweep run
    assert {seed for *_, seed in new} == {2, 3}
    assert len(sweep) + len(new) == 120


def test_the_gpu_budget_trains_on_more_than_the_cpu_budgets_and_evaluates_whole_dev_sets(runner):
    gpu = runner.BUDGETS["gpu"]
    assert sorted(gpu) == sorted(runner.TASKS)
    for task, settings in gpu.items():
        assert "max_eval_samples" not in settings
        for cpu_budget in ("cpu", "separable"):
            if task in runner.BUDGETS[cpu_budget]:
                assert settings["max_train_samples"] > runner.BUDGETS[cpu_budget][task]["max_train_samples"]


def test_stop_at_takes_a_date_and_time(runner, monkeypatch, tmp_path):
    assert runner.past("2000-01-01T00:00:00")
    assert runner.past("2000-01-01T00:00:00+00:00")
    assert not runner.past("2999-01-01T00:00:00")
    assert not runner.past(None)
    with pytest.raises(SystemExit):
        parse(runner, monkeypatch, "--stop_at", "7")
    # past it, no run starts
    monkeypatch.setattr(runner, "run_one", lambda *args: pytest.fail("a run started after --stop_at"))
    argv = ["--budget", "gpu", "--methods", "full", "--seeds", "1", "--output", str(tmp_path / "r")]
    parse(runner, monkeypatch, *argv, "--stop_at", "2000-01-01T00:00:00")
    runner.main()
    assert not (tmp_path / "r").exists()


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run_script(script: Path, tmp_path: Path, nvidia_smi: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the script with a PATH whose nvidia-smi says `nvidia_smi` ('absent' for none) and whose Python programs
    record that they were called (a run needs them)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "python", "pip", "pip3"):
        stub(bin_dir, name, f'echo "{name} $*" >> {calls}')
    if nvidia_smi == "failing":
        stub(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9")
    elif nvidia_smi == "no gpu":
        stub(bin_dir, "nvidia-smi", "exit 0")
    elif nvidia_smi == "h200":
        stub(bin_dir, "nvidia-smi", "echo 'NVIDIA H200'")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    bash = shutil.which("bash")
    result = subprocess.run([bash, str(script)], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    return result, calls


@pytest.mark.parametrize("nvidia_smi", ["absent", "failing", "no gpu"])
def test_the_gpu_script_refuses_to_run_without_a_gpu(nvidia_smi, tmp_path):
    if nvidia_smi == "absent" and shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("this machine has an nvidia-smi in /usr/bin or /bin")
    result, calls = run_script(SCRIPT, tmp_path, nvidia_smi)
    assert result.returncode == 2, result.stderr
    assert "error: no GPU here: nvidia-smi is missing, failed or lists no GPU" in result.stderr
    assert "--budget separable" in result.stderr  # what to run on a CPU instead
    assert not calls.exists()  # no Python started: no install, no run
    assert not (tmp_path / "out").exists()  # no records, no log


def test_the_gpu_script_names_the_preparation_when_the_carried_files_are_missing(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, checkout / "benchmarks" / SCRIPT.name)
    result, calls = run_script(checkout / "benchmarks" / SCRIPT.name, tmp_path, "h200")
    assert result.returncode == 2, result.stderr
    assert "error: .gpu_carry/whl is missing: run python benchmarks/prepare_gpu_carry.py" in result.stderr
    assert not calls.exists()


def test_the_baseline_is_computed_once_per_task_and_never_by_two_threads_at_once(runner, monkeypatch):
    """`datasets.load_dataset` is not thread-safe (one of two concurrent calls raised in tqdm's lock): the runner's
    jobs share one baseline per task, computed under a lock, and each gets its own copy of it."""
    import _record

    active, most, calls, guard = [0], [0], [], threading.Lock()

    def slow_baseline(task_name):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
            calls.append(task_name)
        threading.Event().wait(0.05)
        with guard:
            active[0] -= 1
        return {"kind": "majority class", "metric": "accuracy", "score": 0.5}

    monkeypatch.setattr(_record, "_baseline_score", slow_baseline)
    monkeypatch.setattr(_record, "_BASELINES", {})
    results = []
    threads = [
        threading.Thread(target=lambda task=task: results.append(_record.baseline_score(task)))
        for task in ["sst2", "sst2", "rte", "sst2", "rte", "rte"]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert sorted(calls) == ["rte", "sst2"]
    assert len(results) == 6 and all(result["score"] == 0.5 for result in results)
    results[0]["score"] = 1.0  # a caller's change does not reach the cached baseline
    assert _record.baseline_score("sst2")["score"] == 0.5
