"""Checksums of saved adapter files: every tensor of every adapter of this package is checked on load.

Each kind of saved adapter (diff pruning sparse and gated, parallel adapter, MAM; all with a task head in
`modules_to_save`) is sealed on save. Single bits are flipped at seeded random places of its file, data and header,
and each flip must be refused before a model is built; one flip per tensor is then loaded through every loader.
"""

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from _sparse_helpers import HEAD, edit_weights, logits, make_adapter, tiny_bert
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from peft_diffprune import DiffPruningConfig, MAMConfig, ParallelAdapterConfig
from peft_diffprune.integrity import (
    CHECKSUMS_KEY,
    METADATA_CRC_KEY,
    AdapterChecksumError,
    file_metadata,
    seal_file,
    verify_file,
)


WEIGHTS = "adapter_model.safetensors"
#: seeded random single-bit flips per adapter file in its header, and anywhere, on top of one in every tensor
#: (all 62,328 single-bit flips of the sparse adapter's file were checked once: every one is refused)
HEADER_FLIPS, RANDOM_FLIPS = 150, 150


def _randomized(model):
    """Make every trainable tensor non-trivial, so that a changed byte would change the outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _adapter(kind: str, base):
    if kind == "diff_pruning_sparse":
        return make_adapter(base, seed=1, values_dtype="float16")
    config = {
        "diff_pruning_gated": DiffPruningConfig(task_type="SEQ_CLS", structured=True),
        "parallel_adapter": ParallelAdapterConfig(task_type="SEQ_CLS", r=2),
        "mam": MAMConfig(task_type="SEQ_CLS", r=2, prefix_length=2, prefix_hidden_size=4),
    }[kind]
    return _randomized(get_peft_model(base, config))


KINDS = ["diff_pruning_sparse", "diff_pruning_gated", "parallel_adapter", "mam"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every kind of adapter saved on one tiny base, which is saved too (for AutoPeftModel)."""
    root = tmp_path_factory.mktemp("integrity")
    tiny_bert(0).save_pretrained(root / "base")
    models, outputs = {}, {}
    for kind in KINDS:
        model = _adapter(kind, AutoModelForSequenceClassification.from_pretrained(root / "base").eval())
        model.save_pretrained(root / kind)
        models[kind], outputs[kind] = model, logits(model)
    return {"root": root, "models": models, "outputs": outputs}


def read_header(path: Path) -> tuple[dict, int]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), 8 + length


def owner_of(header: dict, start: int, byte: int) -> str | None:
    """The tensor whose data holds file byte `byte` (None for the header)."""
    for key, info in header.items():
        if key != "__metadata__" and start + info["data_offsets"][0] <= byte < start + info["data_offsets"][1]:
            return key
    return None


def flip(source: Path, target: Path, bit: int) -> None:
    data = bytearray(source.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    target.write_bytes(bytes(data))


def flip_sites(path: Path, seed: int) -> list[int]:
    """Bits to flip: one at random in every tensor, HEADER_FLIPS in the header, and RANDOM_FLIPS anywhere."""
    header, start = read_header(path)
    size = path.stat().st_size
    rng = random.Random(seed)
    sites = [
        8 * rng.randrange(start + info["data_offsets"][0], start + info["data_offsets"][1]) + rng.randrange(8)
        for key, info in sorted(header.items())
        if key != "__metadata__" and info["data_offsets"][1] > info["data_offsets"][0]
    ]
    sites += [rng.randrange(8 * start) for _ in range(HEADER_FLIPS)]
    return sites + [rng.randrange(8 * size) for _ in range(RANDOM_FLIPS)]


# ----------------------------------------------------------------------------------------------------------------
# what is saved


@pytest.mark.parametrize("kind", KINDS)
def test_every_saved_tensor_has_a_checksum(saved, kind):
    path = saved["root"] / kind / WEIGHTS
    header, _ = read_header(path)
    metadata = header.pop("__metadata__")
    table = json.loads(metadata[CHECKSUMS_KEY])
    assert table["algorithm"] == "crc32"
    assert set(table["tensors"]) == set(header) and len(header) > 2
    assert all(len(value) == 8 and int(value, 16) >= 0 for value in table["tensors"].values())
    assert f"base_model.model.{HEAD}.weight" in header  # the dense head of modules_to_save
    assert metadata["format"] == "pt" and METADATA_CRC_KEY in metadata
    assert verify_file(path) is True


@pytest.mark.parametrize("kind", KINDS)
def test_sealed_file_reads_as_before_with_plain_safetensors(saved, kind, tmp_path):
    """Old readers see the same tensors: sealing rewrites the header only."""
    path = saved["root"] / kind / WEIGHTS
    tensors = safetensors.torch.load_file(path)
    unsealed = tmp_path / WEIGHTS
    safetensors.torch.save_file(tensors, unsealed, metadata={"format": "pt"})
    _, start = read_header(path)
    _, unsealed_start = read_header(unsealed)
    assert path.read_bytes()[start:] == unsealed.read_bytes()[unsealed_start:]
    with safe_open(path, framework="pt") as handle:
        assert set(handle.keys()) == set(tensors)
        assert handle.metadata()["format"] == "pt"


def test_named_adapters_in_subfolders_are_sealed(tmp_path):
    model = make_adapter(tiny_bert(0), seed=1)
    model.add_adapter("other", DiffPruningConfig(task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    assert verify_file(tmp_path / WEIGHTS) and verify_file(tmp_path / "other" / WEIGHTS)


def test_sealing_is_atomic_and_idempotent_for_the_data(tmp_path):
    path = tmp_path / WEIGHTS
    safetensors.torch.save_file({"a": torch.arange(5.0), "b": torch.ones(3, dtype=torch.bfloat16)}, path)
    seal_file(path, {"extra": "1"})
    first = path.read_bytes()
    seal_file(path)  # a second seal records the same checksums
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == [WEIGHTS]
    assert file_metadata(path)["extra"] == "1"
    assert torch.equal(safetensors.torch.load_file(path)["a"], torch.arange(5.0))


# ----------------------------------------------------------------------------------------------------------------
# every flipped bit is refused


@pytest.mark.parametrize("kind", KINDS)
def test_every_single_bit_flip_is_refused(saved, kind, tmp_path):
    source = saved["root"] / kind / WEIGHTS
    header, start = read_header(source)
    damaged = tmp_path / WEIGHTS
    sites = flip_sites(source, seed=KINDS.index(kind))
    assert len(sites) > RANDOM_FLIPS + HEADER_FLIPS
    for bit in sites:
        flip(source, damaged, bit)
        with pytest.raises(AdapterChecksumError) as error:
            verify_file(damaged)
        owner = owner_of(header, start, bit // 8)
        message = str(error.value)
        assert str(damaged) in message and "download or copy the adapter again" in message, bit
        if owner is not None:
            assert f"Tensor {owner!r}" in message, (bit, message)


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_files_never_load(saved, kind, tmp_path):
    """One flip in every tensor, each loaded with PeftModel.from_pretrained: all refused, none loads."""
    source = saved["root"] / kind
    header, start = read_header(source / WEIGHTS)
    rng = random.Random(1)
    for key, info in sorted(header.items()):
        if key == "__metadata__":
            continue
        folder = tmp_path / key
        shutil.copytree(source, folder)
        byte = rng.randrange(start + info["data_offsets"][0], start + info["data_offsets"][1])
        flip(source / WEIGHTS, folder / WEIGHTS, 8 * byte + rng.randrange(8))
        with pytest.raises(AdapterChecksumError, match=f"Tensor '{key}'"):
            PeftModel.from_pretrained(tiny_bert(0), folder)


# ----------------------------------------------------------------------------------------------------------------
# every loader checks


def damaged_copy(saved, tmp_path, kind="diff_pruning_sparse", suffix=f"{HEAD}.weight"):
    """A copy of a saved adapter with one bit flipped in tensor `...<suffix>` (by default the dense task head)."""
    source = saved["root"] / kind
    folder = tmp_path / "damaged"
    shutil.copytree(source, folder)
    header, start = read_header(source / WEIGHTS)
    (key,) = [key for key in header if key.endswith(suffix)]
    flip(source / WEIGHTS, folder / WEIGHTS, 8 * (start + header[key]["data_offsets"][0]) + 3)
    return folder, key


def load_peft(saved, folder):
    return PeftModel.from_pretrained(tiny_bert(0), folder)


def load_low_cpu(saved, folder):
    return PeftModel.from_pretrained(tiny_bert(0), folder, low_cpu_mem_usage=True)


def load_trainable(saved, folder):
    return PeftModel.from_pretrained(tiny_bert(0), folder, is_trainable=True)


def load_second_adapter(saved, folder):
    model = PeftModel.from_pretrained(tiny_bert(0), saved["root"] / "diff_pruning_sparse")
    model.load_adapter(folder, adapter_name="second")
    return model


def load_auto(saved, folder):
    return AutoPeftModelForSequenceClassification.from_pretrained(folder)


def load_transformers(saved, folder):
    model = tiny_bert(0)
    model.load_adapter(str(folder))
    return model


def load_transformers_auto(saved, folder):
    # transformers finds adapter_config.json, loads the base it names, then the adapter
    return AutoModelForSequenceClassification.from_pretrained(folder)


LOADERS = [
    load_peft,
    load_low_cpu,
    load_trainable,
    load_second_adapter,
    load_auto,
    load_transformers,
    load_transformers_auto,
]


def _point_at_saved_base(saved, folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(saved["root"] / "base")


@pytest.mark.parametrize("loader", LOADERS, ids=lambda loader: loader.__name__)
def test_every_loader_refuses_a_damaged_head(saved, tmp_path, loader):
    folder, key = damaged_copy(saved, tmp_path)
    _point_at_saved_base(saved, folder)
    with pytest.raises(AdapterChecksumError, match=f"Tensor '{key}' of .*damaged.* fails its checksum"):
        loader(saved, folder)


@pytest.mark.parametrize("loader", LOADERS, ids=lambda loader: loader.__name__)
def test_every_loader_loads_an_intact_adapter(saved, loader):
    model = loader(saved, saved["root"] / "diff_pruning_sparse")
    if loader is load_second_adapter:
        model.set_adapter("default")
    torch.testing.assert_close(logits(model), saved["outputs"]["diff_pruning_sparse"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["diff_pruning_gated", "parallel_adapter", "mam"])
def test_other_kinds_refuse_damaged_values(saved, tmp_path, kind):
    """The gated diffs and the adapters' own weights are checked, not only the head."""
    header, _ = read_header(saved["root"] / kind / WEIGHTS)
    suffix = next(key for key in sorted(header) if key != "__metadata__" and HEAD not in key)
    folder, key = damaged_copy(saved, tmp_path, kind, suffix)
    with pytest.raises(AdapterChecksumError, match=f"Tensor '{key}'"):
        load_low_cpu(saved, folder)


# ----------------------------------------------------------------------------------------------------------------
# adapters saved before checksums


def test_adapters_without_checksums_still_load(saved, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(saved["root"] / "diff_pruning_sparse", folder)
    edit_weights(folder, lambda state_dict: None)  # rewritten as PEFT writes it: metadata {"format": "pt"}
    assert file_metadata(folder / WEIGHTS) == {"format": "pt"}
    assert verify_file(folder / WEIGHTS) is False
    model = PeftModel.from_pretrained(tiny_bert(0), folder)
    torch.testing.assert_close(logits(model), saved["outputs"]["diff_pruning_sparse"], rtol=0, atol=1e-6)


def test_a_damaged_checksum_table_is_refused(saved, tmp_path):
    """Removing one of the two checksum entries (as a flipped bit in its name would) is not taken for an old file."""
    path = tmp_path / WEIGHTS
    shutil.copy(saved["root"] / "diff_pruning_sparse" / WEIGHTS, path)
    tensors = safetensors.torch.load_file(path)
    metadata = file_metadata(path)
    metadata.pop(METADATA_CRC_KEY)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(AdapterChecksumError, match="header .* is damaged"):
        verify_file(path)
