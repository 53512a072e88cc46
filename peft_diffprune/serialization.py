"""Saving and loading this package's adapters (diff pruning, parallel adapters, MAM): what PEFT and transformers
are made to do differently, all installed by `install_hooks` on import.

- Atomic saves: `PeftModel.save_pretrained` writes straight into the target folder, so an exception or a kill half
  way leaves a mix of old and new files. For this package's adapters we let PEFT write into a temporary sibling folder
  and move each finished file into place with `os.replace` (atomic on POSIX): weights first, `adapter_config.json`
  last. An error before the move leaves the previous adapter untouched.
- Checksums: before the move, every `adapter_model.safetensors` is sealed with a CRC-32 per tensor (`integrity.py`),
  and the base model's label names go into the same header. Every loader checks a sealed file before any of its
  tensors reaches a model: PEFT's (`PeftModel.from_pretrained`, `load_adapter`, `AutoPeftModel*`, hotswapping: all
  read through `load_peft_weights`) and transformers' `model.load_adapter` (which reads the file itself).
- Label names: `PeftModel.load_adapter` (and so `from_pretrained` and `AutoPeftModel*`) puts the saved `id2label` and
  `label2id` of the active adapter on the base model's config, so that pipelines answer with the task's names, and
  `set_adapter` switches them with the adapter.
- The model card section, also on `push_to_hub`, and `print_trainable_parameters`, which says what the trainable
  parameters of a diff pruning adapter are.

Other PEFT methods are saved, loaded and printed exactly as PEFT does.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import peft.utils.save_and_load
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, PeftType
from transformers import PreTrainedModel

from .diff_pruning.encoding import encoded_size
from .diff_pruning.model import get_tuner
from .diff_pruning.sparse import base_parameter_count, sparsity_report
from .integrity import file_metadata, seal_file, verify_file


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


#: Metadata key of the label names in the header of a saved adapter file.
LABELS_KEY = "peft_diffprune.labels"


#: On a PeftModel: the label names of each of this package's adapters loaded from a file (None: it has none), and
#: the base model's own label names, restored for an adapter without any.
_ADAPTER_LABELS, _BASE_LABELS = "_diff_pruning_labels", "_diff_pruning_base_labels"


def _config_labels(model: PeftModel) -> dict | None:
    """The base model config's `id2label` and `label2id` as saved, or None for transformers' defaults."""
    config = getattr(model.get_base_model(), "config", None)
    id2label, label2id = getattr(config, "id2label", None), getattr(config, "label2id", None)
    if not id2label:
        return None
    defaults = {int(i): f"LABEL_{i}" for i in id2label}
    if {int(i): name for i, name in id2label.items()} == defaults and label2id == {v: k for k, v in defaults.items()}:
        return None
    return {"id2label": {str(i): name for i, name in id2label.items()}, "label2id": dict(label2id or {})}


def _label_metadata(model: PeftModel, adapter_name: str) -> dict[str, str]:
    """Header metadata with the label names of `adapter_name`: the config's for an active adapter (and one made in
    this session), else those it was loaded with, since the config holds the active adapter's names."""
    loaded = model.__dict__.get(_ADAPTER_LABELS, {})
    use_config = adapter_name in model.active_adapters or adapter_name not in loaded
    labels = _config_labels(model) if use_config else loaded[adapter_name]
    return {} if labels is None else {LABELS_KEY: json.dumps(labels, sort_keys=True)}


def _put_labels(model: PeftModel, labels: dict | None) -> None:
    """Set the base model config's label names to `labels` (None: the base model's own)."""
    config = getattr(model.get_base_model(), "config", None)
    if config is None or getattr(config, "id2label", None) is None:
        return
    base = model.__dict__.setdefault(_BASE_LABELS, (dict(config.id2label), dict(config.label2id)))
    if labels is None:
        config.id2label, config.label2id = dict(base[0]), dict(base[1])
        return
    config.id2label = {int(i): name for i, name in labels["id2label"].items()}
    config.label2id = {name: int(i) for name, i in labels["label2id"].items()}


def _weights_file(model_id: str | os.PathLike, hub_kwargs: dict) -> str | None:
    """The `adapter_model.safetensors` PEFT reads for `model_id`: in the folder, or in the Hub cache (PEFT has just
    fetched it); None for adapters saved as `adapter_model.bin`."""
    local = os.path.join(model_id, hub_kwargs.get("subfolder") or "", SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(local):
        return local
    if os.path.isdir(model_id):
        return None
    hub_kwargs = {key: value for key, value in hub_kwargs.items() if key != "use_auth_token"}
    try:
        return hf_hub_download(str(model_id), SAFETENSORS_WEIGHTS_NAME, **hub_kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def install_hooks() -> None:
    """Install what this package changes in PEFT and transformers (see the module docstring). Idempotent."""
    _install_save_hooks()
    _install_load_hooks()
    _install_trainable_parameters_note()


def _install_save_hooks() -> None:
    """Wrap `PeftModel.save_pretrained` so that this package's adapters are saved atomically, sealed with checksums
    and with their model card, and make `push_to_hub` upload that card. Other PEFT methods are untouched."""
    original = PeftModel.save_pretrained
    if getattr(original, "_diff_pruning_atomic", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _is_ours(self) or not kwargs.get("is_main_process", True):
            return original(self, save_directory, *args, **kwargs)
        if len(args) < 3:
            # PEFT's "auto" saves the full input and output embeddings whenever an embedding is targeted, as diff
            # pruning's default targets are: 2 x vocabulary x hidden of base weights in a file of a few hundred kB.
            # Our adapters hold their diffs as adapter state; a resized vocabulary still needs True, passed explicitly.
            kwargs.setdefault("save_embedding_layers", False)
        target = Path(save_directory)
        if target.is_file():
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.saving-") as staging:
            if (target / "README.md").exists():
                # PEFT updates an existing model card in place; give it the current one to update
                shutil.copy2(target / "README.md", Path(staging) / "README.md")
            original(self, staging, *args, **kwargs)
            # named adapters are saved in subfolders, one weights file each
            for weights in Path(staging).rglob(SAFETENSORS_WEIGHTS_NAME):
                adapter_name = "default" if weights.parent == Path(staging) else weights.parent.name
                seal_file(weights, _label_metadata(self, adapter_name))
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


def _install_load_hooks() -> None:
    """Check sealed adapter files where PEFT and transformers read them, and apply the saved label names."""
    original_read = peft.utils.save_and_load.safe_load_file
    if getattr(original_read, "_diff_pruning_verified", False):
        return

    # every PEFT loader reads adapter weights through `load_peft_weights`, which calls this module global
    @functools.wraps(original_read)
    def safe_load_file(filename, *args, **kwargs):
        verify_file(filename)
        return original_read(filename, *args, **kwargs)

    safe_load_file._diff_pruning_verified = True
    peft.utils.save_and_load.safe_load_file = safe_load_file

    # transformers' `model.load_adapter` reads the checkpoint files itself, in `_load_pretrained_model` (a static
    # method, also used for base models, whose files carry no checksums and are only opened to read the header)
    original_load = PreTrainedModel._load_pretrained_model

    @functools.wraps(original_load)
    def load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs):
        for checkpoint in checkpoint_files or ():
            if str(checkpoint).endswith(".safetensors"):
                verify_file(checkpoint)
        return original_load(model, state_dict, checkpoint_files, *args, **kwargs)

    PreTrainedModel._load_pretrained_model = staticmethod(load_pretrained_model)

    original_load_adapter = PeftModel.load_adapter

    @functools.wraps(original_load_adapter)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        result = original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        if _type_name(self.peft_config[adapter_name]) in OUR_PEFT_TYPES:
            weights = _weights_file(model_id, self._split_kwargs(kwargs)[0])
            saved = file_metadata(weights).get(LABELS_KEY) if weights is not None else None
            labels = json.loads(saved) if saved is not None else None
            self.__dict__.setdefault(_ADAPTER_LABELS, {})[adapter_name] = labels
            if adapter_name in self.active_adapters:
                _put_labels(self, labels)
        return result

    PeftModel.load_adapter = load_adapter

    # the config holds one set of label names: switching adapters switches them
    original_set_adapter = PeftModel.set_adapter

    @functools.wraps(original_set_adapter)
    def set_adapter(self, adapter_name, *args, **kwargs):
        original_set_adapter(self, adapter_name, *args, **kwargs)
        loaded = self.__dict__.get(_ADAPTER_LABELS, {})
        if isinstance(adapter_name, str) and adapter_name in loaded:
            _put_labels(self, loaded[adapter_name])

    PeftModel.set_adapter = set_adapter


def trainable_parameters_note(model: PeftModel) -> str | None:
    """What the trainable parameters of the active diff pruning adapter are, in the paper's terms; None for adapters
    of other methods."""
    adapter_name = model.active_adapter
    config = model.peft_config.get(adapter_name)
    if config is None or config.peft_type != PeftType.DIFF_PRUNING:
        return None
    tuner = get_tuner(model)
    sizes: dict[str, int] = {}
    for layer in tuner.diff_layers().values():
        if adapter_name not in layer.diff_pruning_state:
            continue
        # `<parameter>_diff`, `_alpha`, `_group_alpha` (gated) or `_values` (sparse)
        for name, param in layer.diff_pruning_state[adapter_name].named_parameters():
            kind = "group" if name.endswith("_group_alpha") else name.rsplit("_", 1)[-1]
            sizes[kind] = sizes.get(kind, 0) + param.numel()
    head = sum(p.numel() for name, p in model.named_parameters() if f".modules_to_save.{adapter_name}." in name)
    total = base_parameter_count(tuner)
    head_text = f", plus {head:,} in the task head (modules_to_save)" if head else ""
    frozen = "frozen, loaded for inference: " if config.inference_mode else ""
    if config.kept_pattern:
        kept = sizes.get("values", 0)
        return (
            f"{frozen}kept entries of the sparse diff: {kept:,} values at fixed positions = {100 * kept / total:.3g}% "
            f"of the base model's {total:,} parameters{head_text}"
        )
    group = sizes.get("group", 0)
    group_text = f", and {group:,} group logits" if group else ""
    budget = min(round(config.target_sparsity * total), sizes.get("diff", 0))
    return (
        f"{frozen}dense diffs w ({sizes.get('diff', 0):,}) and gate logits alpha ({sizes.get('alpha', 0):,}"
        f"{group_text}) of the gated stage{head_text}; projection will keep {budget:,} entries = "
        f"{100 * budget / total:.3g}% of the base model's {total:,} parameters"
    )


def _install_trainable_parameters_note() -> None:
    original = PeftModel.print_trainable_parameters
    if getattr(original, "_diff_pruning_note", False):
        return

    @functools.wraps(original)
    def print_trainable_parameters(self) -> None:
        note = trainable_parameters_note(self)
        if note is None:
            return original(self)
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
            f"{100 * trainable / total:.4f} ({note})"
        )

    print_trainable_parameters._diff_pruning_note = True
    PeftModel.print_trainable_parameters = print_trainable_parameters


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
