"""The base fingerprint of a sparse diff: a few values of every diffed base tensor, to refuse loading a diff onto
weights other than those it was made on."""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING

import torch

from .distributed import flat_entries
from .layer import DiffPruningLayer


if TYPE_CHECKING:
    from .model import DiffPruningModel


#: Values sampled per tensor for the base fingerprint.
FINGERPRINT_SAMPLES = 8


def _fingerprint_parts(tuner: DiffPruningModel, tensor_names: list[str]) -> tuple[str, list[torch.Tensor]]:
    """A hash of the named base tensors' names and shapes, and a few values of each at fixed strided positions."""
    structure = hashlib.sha256()
    samples = []
    for key in sorted(tensor_names):
        module_name, _, param_name = key.rpartition(".")
        module = tuner.model.get_submodule(module_name)
        if isinstance(module, DiffPruningLayer):
            module = module.get_base_layer()
        tensor = getattr(module, param_name).detach()
        structure.update(f"{key}|{tensor.numel()}|".encode())
        # float64: float32 positions run past the end of tensors with more than 2^24 entries
        positions = torch.linspace(0, tensor.numel() - 1, FINGERPRINT_SAMPLES, dtype=torch.float64).long()
        samples.append(flat_entries(tensor, positions.to(tensor.device)).cpu())
    return structure.hexdigest()[:32], samples


def base_fingerprint(tuner: DiffPruningModel, tensor_names: list[str]) -> str:
    """Fingerprint of the base weights a sparse diff is made on: `v1:<structure hash>:<base64 fp32 samples>`.

    A few values of every diffed tensor, at fixed positions, identify a checkpoint (two differently trained or
    initialised models differ almost everywhere) while staying checkable when the base is later loaded in another
    dtype: see [`fingerprint_matches`].
    """
    structure, samples = _fingerprint_parts(tuner, tensor_names)
    data = torch.cat([sample.float() for sample in samples]).numpy().tobytes()
    return f"v1:{structure}:{base64.b64encode(data).decode()}"


def fingerprint_matches(tuner: DiffPruningModel, tensor_names: list[str], fingerprint: str) -> bool:
    """Whether the model's base weights are those `fingerprint` was taken from, up to a change of dtype: the
    recorded fp32 samples, rounded to each tensor's current dtype, must equal the current values exactly."""
    version, _, rest = fingerprint.partition(":")
    structure, _, data = rest.partition(":")
    if version != "v1":
        return False
    current_structure, samples = _fingerprint_parts(tuner, tensor_names)
    recorded = torch.frombuffer(bytearray(base64.b64decode(data)), dtype=torch.float32)
    if current_structure != structure or recorded.numel() != FINGERPRINT_SAMPLES * len(samples):
        return False
    return all(
        torch.equal(recorded_sample.to(sample.dtype), sample)
        for recorded_sample, sample in zip(recorded.split(FINGERPRINT_SAMPLES), samples, strict=True)
    )
