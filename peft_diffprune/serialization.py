"""Atomic saving and the model card of this package's adapters (diff pruning, parallel adapters, MAM).

`PeftModel.save_pretrained` writes straight into the target folder, so an exception or a kill half way leaves a
mix of old and new files. For this package's adapters we let PEFT write into a temporary sibling folder and move each
finished file into place with `os.replace` (atomic on POSIX): weights first, `adapter_config.json` last. An error
before the move leaves the previous adapter untouched. Other PEFT methods are saved exactly as PEFT does.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from peft.utils import CONFIG_NAME, PeftType

from .diff_pruning.encoding import encoded_size
from .diff_pruning.sparse import sparsity_report


#: Files written last, so that a folder never pairs a new config with old weights.
_WRITE_LAST = (CONFIG_NAME,)


#: The PEFT methods of this package (registered on import), saved atomically with a model card section.
OUR_PEFT_TYPES = {"DIFF_PRUNING": "Diff pruning", "PARALLEL_ADAPTER": "Parallel adapter", "MAM": "MAM"}


def _type_name(config) -> str:
    return getattr(config.peft_type, "value", config.peft_type)


def _is_ours(model: PeftModel) -> bool:
    return any(_type_name(config) in OUR_PEFT_TYPES for config in model.peft_config.values())


def _move_into_place(staging: Path, target: Path) -> None:
    files = [p for p in staging.rglob("*") if p.is_file()]
    files.sort(key=lambda p: (p.name in _WRITE_LAST, str(p)))
    for source in files:
        destination = target / source.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(source, destination)


def install_save_hooks() -> None:
    """Wrap `PeftModel.save_pretrained` so that diff pruning adapters are saved atomically with their model card,
    and make `push_to_hub` upload that card. Idempotent; other PEFT methods are untouched."""
    original = PeftModel.save_pretrained
    if getattr(original, "_diff_pruning_atomic", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _is_ours(self) or not kwargs.get("is_main_process", True):
            return original(self, save_directory, *args, **kwargs)
        target = Path(save_directory)
        if target.is_file():
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.saving-") as staging:
            if (target / "README.md").exists():
                # PEFT updates an existing model card in place; give it the current one to update
                shutil.copy2(target / "README.md", Path(staging) / "README.md")
            original(self, staging, *args, **kwargs)
            write_model_card(self, Path(staging))
            target.mkdir(exist_ok=True)
            _move_into_place(Path(staging), target)

    save_pretrained._diff_pruning_atomic = True
    PeftModel.save_pretrained = save_pretrained

    # `push_to_hub` (transformers' mixin) saves into a temporary folder, then overwrites README.md with the Hub's
    # card before uploading: add the diff pruning section back just before the upload.
    original_upload = PeftModel._upload_modified_files

    @functools.wraps(original_upload)
    def upload_modified_files(self, working_dir, *args, **kwargs):
        if _is_ours(self):
            write_model_card(self, Path(working_dir))
        return original_upload(self, working_dir, *args, **kwargs)

    PeftModel._upload_modified_files = upload_modified_files


_CARD_MARKER = "<!-- peft_diffprune -->"
_HOW_TO_LOAD = (
    "How to load (import `peft_diffprune` first: it registers the method with PEFT):\n\n"
    "```python\nimport peft_diffprune  # noqa: F401\nfrom peft import PeftModel\n"
    'model = PeftModel.from_pretrained(base_model, "<this repo or folder>")\n```\n\n'
)


def adapter_summary(model: PeftModel, adapter_name: str) -> dict:
    """Sizes of one saved sparse adapter: kept entries, bytes of positions and values, per-module density."""
    config = model.peft_config[adapter_name]
    report = sparsity_report(model, adapter_name)
    value_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[config.values_dtype]
    position_bytes = sum(encoded_size(t.parameters, t.kept) for t in report.tensors if t.name in config.kept_pattern)
    modules: dict[str, list[int]] = {}
    for tensor in report.tensors:
        module = tensor.name.rsplit(".", 1)[0]
        counts = modules.setdefault(module, [0, 0])
        counts[0] += tensor.parameters
        counts[1] += tensor.kept
    return {
        "report": report,
        "kept": report.kept,
        "position_bytes": position_bytes,
        "value_bytes": report.kept * value_bytes,
        "module_density": {name: kept / params for name, (params, kept) in modules.items()},
    }


def write_model_card(model: PeftModel, folder: Path) -> None:
    """Add a diff pruning section to the README.md PEFT wrote: base model, task, sparsity, sizes, how to load."""
    readme = folder / "README.md"
    text = readme.read_text() if readme.exists() else ""
    text = text.split(_CARD_MARKER)[0].rstrip() + "\n\n" + _CARD_MARKER + "\n"
    for adapter_name, config in model.peft_config.items():
        if config.peft_type != PeftType.DIFF_PRUNING:
            if _type_name(config) in OUR_PEFT_TYPES:
                text += f"## {OUR_PEFT_TYPES[_type_name(config)]} adapter `{adapter_name}`\n\n"
                text += f"- Base model: `{config.base_model_name_or_path}`\n- Task type: `{config.task_type}`\n\n"
                text += _HOW_TO_LOAD
            continue
        text += f"## Diff pruning adapter `{adapter_name}`\n\n"
        text += f"- Base model: `{config.base_model_name_or_path}`\n- Task type: `{config.task_type}`\n"
        if not config.kept_pattern:
            text += "- State: gated (not yet projected): dense diffs and gate logits, a training checkpoint.\n\n"
            continue
        summary = adapter_summary(model, adapter_name)
        report = summary["report"]
        stored = summary["position_bytes"] + summary["value_bytes"]
        text += (
            f"- Target sparsity: {config.target_sparsity:.4%} of {report.total_parameters:,} base parameters\n"
            f"- Kept entries: {summary['kept']:,} (density {report.kept / report.total_parameters:.4%})\n"
            f"- Stored diff: {stored:,} bytes ({stored / max(summary['kept'], 1):.2f} bytes per kept entry: "
            f"Elias-Fano coded positions + {config.values_dtype} values)\n"
            f"- Modules with a diff: {len(summary['module_density'])}\n\n"
        )
        densest = sorted(summary["module_density"].items(), key=lambda item: -item[1])[:10]
        text += "Densest modules:\n\n| module | density |\n|---|---|\n"
        text += "".join(f"| `{name}` | {density:.3%} |\n" for name, density in densest)
        text += "\n" + _HOW_TO_LOAD
    readme.write_text(text)
