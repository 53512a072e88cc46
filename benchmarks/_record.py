"""Writing a benchmark's results together with what produced them."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit(cwd: Path | None = None) -> str:
    """The short hash of the checked-out commit."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd
    ).stdout.strip()


#: Allocators a benchmark's workers can run under (`LD_PRELOAD`), and the Debian package that has each.
ALLOCATORS = {
    "glibc": (None, None),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
}


def allocator_env(name: str) -> dict:
    """The environment variables that make a child process allocate with `name` (see `ALLOCATORS`): none for glibc,
    `LD_PRELOAD` of the library otherwise. glibc's heap gives back freed memory at its top and takes it again, page
    by page, so step times on it depend on the heap's layout; a caching allocator takes that out of a comparison."""
    library, package = ALLOCATORS[name]
    if library is None:
        return {}
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if (Path(folder) / library).exists():
            return {"LD_PRELOAD": str(Path(folder) / library)}
    raise SystemExit(f"--allocator {name}: {library} is not installed; install it with `apt-get install {package}`.")


def release_free_memory() -> None:
    """Hand freed memory back to the system with whichever allocator this process runs (`allocator_env`): glibc's
    `malloc_trim`, tcmalloc's `MallocExtension_ReleaseFreeMemory`, or jemalloc's purge of every arena."""
    import ctypes

    process = ctypes.CDLL(None)
    if hasattr(process, "MallocExtension_ReleaseFreeMemory"):
        process.MallocExtension_ReleaseFreeMemory()
    elif hasattr(process, "mallctl"):
        process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))  # MALLCTL_ARENAS_ALL
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def heap_count_env() -> dict:
    """The environment variables that make a child process count its live heap bytes (`HeapBytes`): `LD_PRELOAD` of
    `heap_count.c`, compiled here once (into the temporary folder) with the system's C compiler."""
    source = Path(__file__).with_name("heap_count.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    library = Path(tempfile.gettempdir(), f"peft_diffprune_heap_count_{digest}.so")
    if not library.exists():
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        try:
            subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(partial), str(source)], check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            raise SystemExit(
                f"--heap_bytes needs a C compiler to build {source.name} (apt-get install gcc): {error}"
            ) from error
        partial.replace(library)
    return {"LD_PRELOAD": str(library)}


class HeapBytes:
    """This process's live heap bytes, counted at every malloc and free by `heap_count.c` (run under
    `heap_count_env()`): every tensor's memory and whatever else malloc hands out, from every thread, but not the
    libraries' code and data or what the heap keeps after a free. On CPU it is the nearest thing to a GPU's
    `torch.cuda.max_memory_allocated`, plus the process's own malloc'd objects."""

    @staticmethod
    def loaded() -> bool:
        """Whether this process runs under `heap_count_env()`."""
        import ctypes

        return hasattr(ctypes.CDLL(None), "heap_peak_bytes")

    def __init__(self):
        import ctypes

        if not self.loaded():
            raise RuntimeError("HeapBytes: this process does not run under heap_count_env() (LD_PRELOAD).")
        process = ctypes.CDLL(None)
        for name in ("heap_live_bytes", "heap_peak_bytes"):
            getattr(process, name).restype = ctypes.c_longlong
        self._process = process

    def live_mib(self) -> float:
        return self._process.heap_live_bytes() / 2**20

    def peak_mib(self) -> float:
        """The largest count since the last `reset_peak()`."""
        return self._process.heap_peak_bytes() / 2**20

    def reset_peak(self) -> None:
        self._process.heap_reset_peak()


def write_record(output: str, settings: dict, results: dict) -> dict:
    """Write `results` to `output` (JSON) with the command, commit, date, machine and torch version."""
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "settings": settings,
        "results": results,
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(record, indent=2) + "\n")
    return record


_BASELINES: dict[str, dict] = {}
_BASELINES_LOCK = threading.Lock()


def baseline_score(task_name: str) -> dict:
    """The dev score, in the task's main metric, of always answering the training set's most frequent class (F1 of
    class 1 for MRPC, 0 MCC for CoLA), or of chance for STS-B (Spearman 0): what a run has to beat.

    Computed once per task and process, under a lock: `datasets.load_dataset` is not safe to call from two threads
    at once (tqdm's `thread_map` lock raised `AttributeError` in one of `glue_accuracy.py --jobs 2`'s runs)."""
    with _BASELINES_LOCK:
        if task_name not in _BASELINES:
            _BASELINES[task_name] = _baseline_score(task_name)
        return dict(_BASELINES[task_name])


def _baseline_score(task_name: str) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    from peft_diffprune.recipe.glue import compute_glue_metrics, get_glue_task, load_glue

    task = get_glue_task(task_name)
    if task.is_regression:
        return {"kind": "chance", "metric": task.main_metric, "score": 0.0}
    data = load_glue(task_name, os.environ.get("GLUE_DIR", REPO_ROOT.parent / "shared" / "data" / "glue"))
    majority = Counter(data["train"]["label"]).most_common(1)[0][0]
    dev = data[task.eval_splits[0]]["label"]
    metrics = compute_glue_metrics(task_name, [majority] * len(dev), dev)
    score = metrics[task.main_metric]
    return {
        "kind": "majority class",
        "label": task.label_names[majority],
        "metric": task.main_metric,
        "score": 0.0 if score != score else score,  # MCC of a constant prediction: nan, i.e. no correlation
    }


class LoadSampler(threading.Thread):
    """Samples `os.getloadavg()` (1-minute average) every `interval` seconds until stopped."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.samples, self.done = interval, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(os.getloadavg()[0])
            self.done.wait(self.interval)

    def summary(self) -> dict:
        self.done.set()
        self.join()
        samples = self.samples or [os.getloadavg()[0]]
        return {
            "mean_1min": round(sum(samples) / len(samples), 2),
            "max_1min": round(max(samples), 2),
            "at_end": [round(value, 2) for value in os.getloadavg()],
            "samples": len(samples),
        }
