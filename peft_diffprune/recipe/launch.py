"""Checks a training script makes before it trains: the launch it got is the one it asked for, and the optional
packages it will need at the end are installed. Each stops the run with a message naming the fix."""

from __future__ import annotations

import importlib
import os

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType


_FSDP_ON_CPU = (
    "FSDP was requested (`accelerate launch --use_fsdp`, or ACCELERATE_USE_FSDP=true) but Accelerate's FSDP plugin "
    "needs GPUs (or another accelerator), and this machine has none: {found}. Drop --use_fsdp (several CPU processes "
    "train as one data-parallel group with `torchrun --nproc_per_node N <script> --cpu`), or run on GPUs; "
    "docs/distributed.md shows torch's own FSDP on CPU."
)


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def launched_processes() -> int:
    """The process count the launcher (torchrun, `accelerate launch`) set up, 1 if none."""
    return max(int(os.environ.get(name, 1)) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))


def make_accelerator(**kwargs) -> Accelerator:
    """`Accelerator(**kwargs)`, stopped with a clear message where it would not train what the launch asked for:

    - FSDP requested where Accelerate cannot run it (on a CPU-only machine its plugin fails, or a single process runs
      unsharded);
    - several processes launched that did not form one group (torchrun on CPU without `--cpu`: each process trains
      alone, so N unrelated copies would be trained and saved over each other).
    """
    try:
        accelerator = Accelerator(**kwargs)
    except RuntimeError as error:
        if fsdp_requested():
            raise SystemExit("error: " + _FSDP_ON_CPU.format(found=error)) from None
        raise
    if fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP:
        raise SystemExit("error: " + _FSDP_ON_CPU.format(found=f"Accelerate runs {accelerator.distributed_type}"))
    launched = launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        raise SystemExit(
            f"error: {launched} processes were launched but Accelerate formed no group of them (each runs alone, "
            f"{accelerator.distributed_type}: accelerate found no GPU to share); they would train {launched} "
            "unrelated copies. Pass --cpu to train them together on CPU."
        )
    return accelerator


def require_packages(plots: bool, trackers: str | None) -> None:
    """Stop before training if what the end of the run needs is missing: matplotlib for the plots, the tracker
    named in `--report_to` (`"all"`: at least one installed)."""
    if plots:
        try:
            importlib.import_module("matplotlib")
        except ImportError as error:
            raise SystemExit(
                f"error: the plots need matplotlib, which does not import ({error}): `pip install matplotlib` (or "
                "`pip install peft_diffprune[examples]`), or pass --no_plots."
            ) from None
    if trackers is not None:
        available = [str(tracker) for tracker in get_available_trackers()]
        if not available or trackers not in ("all", *available):
            raise SystemExit(
                f"error: --with_tracking --report_to {trackers}: installed trackers are {available or 'none'}. "
                "Install one (e.g. `pip install tensorboard`) or drop --with_tracking."
            )
