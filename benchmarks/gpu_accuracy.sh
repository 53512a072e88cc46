#!/usr/bin/env bash
# The GLUE accuracy table (issue 13) on one GPU, in one command from the repository root of the GPU machine: the
# learning-rate sweep of full fine-tuning, LoRA, diff pruning and structured diff pruning on the five tasks of the
# "gpu" budget, then seeds 2 and 3 at the picked rates (120 runs), 12 side by side, in bf16.
#
#   python benchmarks/prepare_gpu_carry.py     # first, on the machine that calls the device tool
#   bash benchmarks/gpu_accuracy.sh            # on the GPU machine, with .gpu_carry carried
#
# Records are appended to $OUT/glue_accuracy.jsonl as each run finishes, next to the log $OUT/gpu_accuracy.log, so
# a killed call keeps every finished run (without $OUT: outputs/gpu_accuracy). Records of the budget already in
# benchmarks/results/glue_accuracy.jsonl are not made again. No new run starts after GPU_ACCURACY_STOP_AFTER_S
# seconds (default 420; the runs that start last are LoRA's, the shortest), so that the call ends inside 8 minutes
# with whole rows of the table even on a slower GPU than assumed. docs/benchmarks.md, "The table on one GPU".
#
# `bash benchmarks/gpu_accuracy.sh --rehearse` goes through the same steps on a CPU, on STS-B at the "smoke" budget
# with 2 jobs for 100 s, to check the carried wheels, model and data before spending device time (it needs a Python
# 3.12 with torch, as there, for the carried multiprocess wheel).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

start=$(date -u +%s)
budget=gpu
tasks=()
jobs=${GPU_ACCURACY_JOBS:-12}
stop_after=${GPU_ACCURACY_STOP_AFTER_S:-420}
if [ "${1:-}" = "--rehearse" ]; then
    budget=smoke
    tasks=(--tasks stsb)
    jobs=2
    stop_after=100
elif [ -n "${1:-}" ]; then
    echo "error: unknown argument $1 (the only one is --rehearse)." >&2
    exit 2
else
    gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null) || gpus=""
    if [ -z "$gpus" ]; then
        echo "error: no GPU here: nvidia-smi is missing, failed or lists no GPU. This script runs the accuracy" \
            "table on one GPU (the device machine; docs/benchmarks.md, \"The table on one GPU\"). On a CPU, run" \
            "benchmarks/glue_accuracy.py --budget separable, or check the carried files with --rehearse." >&2
        exit 2
    fi
fi

carry=.gpu_carry
for path in "$carry/whl" "$carry/minilm-fp16/model.safetensors" "$carry/glue" "$carry/commit"; do
    if [ ! -e "$path" ]; then
        echo "error: $path is missing: run python benchmarks/prepare_gpu_carry.py in the checkout that calls the" \
            "device tool, and name $carry in the run call's carry." >&2
        exit 2
    fi
done

out=${OUT:-outputs/gpu_accuracy}
mkdir -p "$out"
records=$out/glue_accuracy.jsonl
exec > >(tee -a "$out/gpu_accuracy.log") 2>&1
python=${PYTHON:-python3}
site=${GPU_ACCURACY_SITE:-/tmp/site}
stop_at=$(date -u -d "@$((start + stop_after))" +%Y-%m-%dT%H:%M:%S)
echo "$(date -u +%H:%M:%S) budget $budget, $jobs jobs, no new run after $stop_at UTC; GPU: ${gpus:-none (rehearsal)}"

"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$carry"/whl/*.whl || { echo "error: installing the carried wheels failed (above)."; exit 3; }
GLUE_ACCURACY_COMMIT=$(cat "$carry/commit")
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 GLUE_DIR=$PWD/$carry/glue GLUE_ACCURACY_COMMIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_DATASETS_DISABLE_PROGRESS_BARS=1
model=/tmp/minilm-from-fp16

# Before any run: the packages import, CUDA works (unless rehearsing), the model is turned back into fp32
# (from_pretrained would keep fp16 weights), and each task's data loads once, filling the datasets cache for the runs.
checks_failed() { echo "error: the checks before the runs failed (above)."; exit 3; }
"$python" - "$carry/minilm-fp16" "$model" "$budget" <<'EOF' || checks_failed
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


names = ("torch", "transformers", "accelerate", "peft", "datasets", "huggingface_hub", "pyarrow", "fsspec", "numpy")
print("versions:", ", ".join(f"{name} {version(name)}" for name in names), flush=True)

import torch  # noqa: E402

sys.path.insert(0, "benchmarks")
import peft_diffprune  # noqa: F401
from glue_accuracy import BUDGETS
from peft_diffprune.recipe.glue import load_glue
from safetensors.torch import load_file, save_file

source, target, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if budget != "smoke" and not torch.cuda.is_available():
    sys.exit("error: nvidia-smi lists a GPU but torch sees none (torch.cuda.is_available() is False).")
if torch.cuda.is_available():
    print(f"torch sees {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
target.mkdir(parents=True, exist_ok=True)
for path in source.iterdir():
    if path.name != "model.safetensors":
        shutil.copy(path, target / path.name)
weights = load_file(source / "model.safetensors")
save_file({name: tensor.float() for name, tensor in weights.items()}, target / "model.safetensors", {"format": "pt"})
for task in BUDGETS[budget]:
    load_glue(task, os.environ["GLUE_DIR"])
print(f"model: {target} (fp32 from fp16); data of {list(BUDGETS[budget])} loaded")
EOF

if [ ! -s "$records" ]; then
    grep -F "\"budget\": \"$budget\"" benchmarks/results/glue_accuracy.jsonl >"$records"
fi
# One short run of each method first (STS-B at the "smoke" budget, side by side): a method that fails on this GPU is
# left out of the table, with its error once in the log instead of in each of its 20-30 runs.
"$python" benchmarks/glue_accuracy.py --budget smoke --tasks stsb --methods structured diff_pruning full lora \
    --seeds 1 --jobs 4 --mixed_precision bf16 --model "$model" --output "$records" --work_dir /tmp/glue_accuracy_gpu
methods=()
for method in structured diff_pruning full lora; do
    if grep -qF "\"budget\": \"smoke\", \"task\": \"stsb\", \"method\": \"$method\", " "$records"; then
        methods+=("$method")
    else
        echo "warning: $method failed its smoke run on this machine (above): the table leaves it out."
    fi
done
[ ${#methods[@]} -gt 0 ] || { echo "error: every method failed its smoke run (above)."; exit 4; }
# the expensive methods first, so that the end of each step is not one long run alone
run=("$python" benchmarks/glue_accuracy.py --budget "$budget" "${tasks[@]}" --methods "${methods[@]}"
    --jobs "$jobs" --mixed_precision bf16 --model "$model" --output "$records" --stop_at "$stop_at"
    --work_dir /tmp/glue_accuracy_gpu)
"${run[@]}" --sweep
"${run[@]}" --at_picked_lr --seeds 1 2 3
"$python" benchmarks/report_accuracy.py --results "$records" --budget "$budget" --sweep
"$python" benchmarks/report_accuracy.py --results "$records" --budget "$budget" --picked --spread std --plot "$out/table.png"
made=$(grep -cF "\"budget\": \"$budget\"" "$records")
echo "$(date -u +%H:%M:%S) done in $(($(date -u +%s) - start)) s: $made records of budget $budget in $records"
