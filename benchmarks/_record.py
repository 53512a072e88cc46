"""Writing a benchmark's results together with what produced them."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def git_commit(cwd: Path | None = None) -> str:
    """The short hash of the checked-out commit."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd
    ).stdout.strip()


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
