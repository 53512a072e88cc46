"""Small models, reference computations and file surgery shared by the sparse-adapter tests.

Everything here is written from the method's definitions, not from the package's code, so that the tests compare the
package against an independent reference: the deterministic gate `z = min(1, max(0, sigmoid(alpha) * (r - l) + l))`,
the top-|delta| selection with ties to the lowest flat position in module order, and the Elias-Fano layout (the low
`L = floor(log2(n / k))` bits of every position verbatim, then the high parts in unary, each part padded to whole
bytes, most significant bit first).

This module imports neither `peft` nor `peft_diffprune` at import time: a fresh process may import it before
deciding whether to register the method.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification


VOCAB_SIZE = 50
NUM_LABELS = 2
HEAD = "classifier"
SUBPROCESS_TIMEOUT = 300


def tiny_bert(
    seed: int = 0,
    dtype: torch.dtype | None = None,
    hidden_size: int = 8,
    num_layers: int = 1,
    num_labels: int = NUM_LABELS,
) -> nn.Module:
    """A seeded, dropout-free BERT classifier with about 1.2k parameters outside the head, in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    model = BertForSequenceClassification(config).eval()
    return model if dtype is None else model.to(dtype)


def make_batch(seed: int = 0, with_labels: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB_SIZE, (4, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_labels:
        batch["labels"] = torch.randint(0, NUM_LABELS, (4,), generator=generator)
    return batch


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    batch = make_batch() if batch is None else {k: v for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()
    out = model(**batch).logits
    model.train(was_training)
    return out


def base_parameter_count(model: nn.Module, head: str = HEAD) -> int:
    """N of the paper: parameters of a plain (unwrapped) model outside the task head."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(f"{head}."))


def make_adapter(base: torch.nn.Module, seed: int, values_dtype: str = "float32", target_sparsity: float = 0.05):
    """A projected adapter with random diffs and a moved head. The in-memory values are rounded to `values_dtype`,
    so that the model in memory is exactly what its file holds."""
    from peft import get_peft_model

    from peft_diffprune import DiffPruningConfig, project_to_sparsity

    torch.manual_seed(seed)
    model = get_peft_model(base, DiffPruningConfig(task_type="SEQ_CLS", init_weights=False, values_dtype=values_dtype))
    with torch.no_grad():
        for param in model.base_model.model.classifier.modules_to_save["default"].parameters():
            param.add_(torch.randn_like(param) * 0.5)
    project_to_sparsity(model, target_sparsity)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_values"):
                param.copy_(param.to(getattr(torch, values_dtype)).float())
    return model


# ----------------------------------------------------------------------------------------------------------------
# the gated state, read without the package's helpers


def diff_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Wrapped layers by module name relative to the base model, in module order."""
    from peft_diffprune.diff_pruning.layer import DiffPruningLayer

    return {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, DiffPruningLayer)
    }


def manual_gate(alpha: torch.Tensor, stretch: tuple[float, float]) -> torch.Tensor:
    left, right = stretch
    return (torch.sigmoid(alpha) * (right - left) + left).clamp(0.0, 1.0)


@torch.no_grad()
def dense_gated_diffs(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """`z * w` (times the group gate) of every gated tensor, keyed `<module>.<param>`, in module order."""
    diffs = {}
    stretch = peft_model.peft_config[adapter_name].stretch
    for module_name, layer in diff_layers(peft_model).items():
        if adapter_name not in layer.diff_pruning_state:
            continue
        state = layer.diff_pruning_state[adapter_name]
        for name, _ in layer.get_base_layer().named_parameters(recurse=False):
            if not hasattr(state, f"{name}_diff"):
                continue
            delta = manual_gate(getattr(state, f"{name}_alpha"), stretch) * getattr(state, f"{name}_diff")
            group_alpha = getattr(state, f"{name}_group_alpha", None)
            if group_alpha is not None:
                delta = delta * manual_gate(group_alpha, stretch)
            diffs[f"{module_name}.{name}"] = delta.detach().clone().float()
    return diffs


def reference_top_k(diffs: dict[str, torch.Tensor], budget: int) -> dict[str, list[int]]:
    """Brute force: rank every entry by (-|delta|, position in the module-order concatenation), keep `budget`."""
    flat = [
        (key, position, float(value))
        for key, diff in diffs.items()
        for position, value in enumerate(diff.reshape(-1).tolist())
    ]
    order = sorted(range(len(flat)), key=lambda offset: (-abs(flat[offset][2]), offset))
    kept: dict[str, list[int]] = {}
    for offset in order[:budget]:
        key, position, _ = flat[offset]
        kept.setdefault(key, []).append(position)
    return {key: sorted(positions) for key, positions in kept.items()}


def sparse_entries(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[list[int], torch.Tensor]]:
    """Decoded kept positions and fp32 values of every sparse tensor, keyed `<module>.<param>`."""
    from peft_diffprune.diff_pruning.encoding import decode_positions

    entries = {}
    for module_name, layer in diff_layers(peft_model).items():
        if adapter_name not in layer.diff_pruning_state:
            continue
        state = layer.diff_pruning_state[adapter_name]
        for name, param in layer.get_base_layer().named_parameters(recurse=False):
            if not hasattr(state, f"{name}_positions"):
                continue
            values = getattr(state, f"{name}_values").detach().float().clone()
            positions = decode_positions(getattr(state, f"{name}_positions"), param.numel(), values.numel())
            entries[f"{module_name}.{name}"] = (positions.tolist(), values)
    return entries


@torch.no_grad()
def apply_sparse_diff(model: nn.Module, entries: dict[str, tuple[list[int], torch.Tensor]]) -> nn.Module:
    """Add kept diff entries to a plain model's weights in place (the manual reference of an adapted model)."""
    params = dict(model.named_parameters())
    for key, (positions, values) in entries.items():
        flat = params[key].data.view(-1)
        flat[torch.tensor(positions, dtype=torch.long)] += values.to(flat.dtype)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Elias-Fano, written from the format description


def _pack_bits(bits: list[int]) -> list[int]:
    bits = bits + [0] * (-len(bits) % 8)
    return [int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8)]


def low_bits(n: int, k: int) -> int:
    return (n // k).bit_length() - 1 if k else 0


def raw_elias_fano(positions: list[int], n: int) -> torch.Tensor:
    """Elias-Fano bytes of `positions` with no validation: non-decreasing, duplicate or out-of-range lists can be
    written, as a corrupt or malicious file would hold them."""
    k = len(positions)
    low = low_bits(n, k)
    low_part = [(p >> b) & 1 for p in positions for b in range(low - 1, -1, -1)]
    upper = [0] * (k + ((n - 1) >> low) + 1)
    for i, position in enumerate(positions):
        upper[(position >> low) + i] = 1
    body = _pack_bits(low_part) + _pack_bits(upper)
    # format version 1 ends the code with the little-endian CRC-32 of the bytes before it
    return torch.tensor(body + list(zlib.crc32(bytes(body)).to_bytes(4, "little")), dtype=torch.uint8)


def low_part_bytes(n: int, k: int) -> int:
    return (k * low_bits(n, k) + 7) // 8


# ----------------------------------------------------------------------------------------------------------------
# files


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The JSON header of a safetensors file: per tensor its dtype, shape and byte range (metadata dropped)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def tensor_nbytes(header: dict[str, dict], suffix: str) -> int:
    return sum(
        info["data_offsets"][1] - info["data_offsets"][0] for key, info in header.items() if key.endswith(suffix)
    )


def folder_bytes(folder: str | os.PathLike) -> dict[str, bytes]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_adapter(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    shutil.copytree(source, target)
    return Path(target)


def edit_weights(folder: str | os.PathLike, edit) -> None:
    """Rewrite `adapter_model.safetensors` of `folder` with `edit(state_dict)` applied (edits in place)."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "adapter_model.safetensors"
    state_dict = load_file(path)
    edit(state_dict)
    save_file(state_dict, path, metadata={"format": "pt"})


def edit_config(folder: str | os.PathLike, **changes) -> None:
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def weight_key(state_dict: dict[str, torch.Tensor], module_suffix: str, kind: str) -> str:
    """The one saved key of `<...module_suffix>.diff_pruning_state.<param>_<kind>`."""
    (key,) = [k for k in state_dict if f"{module_suffix}.diff_pruning_state." in k and k.endswith(f"_{kind}")]
    return key


# ----------------------------------------------------------------------------------------------------------------
# fresh processes


def run_fresh(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python (the one running the tests) and fail with its stderr if it fails."""
    full_env = {
        **os.environ,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=full_env,
    )
    assert result.returncode == 0, f"fresh process failed:\n{result.stderr[-4000:]}"
    return result
