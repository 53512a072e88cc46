"""Checksums of saved adapter files: every tensor of an `adapter_model.safetensors` is checked on load.

At save time (see `serialization.py`) the file PEFT wrote is sealed: its safetensors header gets two
`__metadata__` entries,

- `peft_diffprune.checksums`: JSON `{"algorithm": "crc32", "tensors": {"<key>": "<8 hex digits>", ...}}`, one CRC-32
  per tensor over its dtype and shape as the header writes them (`F32[384,1536]`) followed by its data bytes;
- `peft_diffprune.metadata_crc32`: the CRC-32 of every other metadata entry (the table above included), so that a
  damaged header is told apart from a damaged tensor.

The tensor data is not touched, so any safetensors reader (and every older `peft_diffprune`) reads a sealed file as
before. On load, `verify_file` recomputes the checksums from the bytes on disk before any tensor reaches a model and
raises [`AdapterChecksumError`] naming the file and the first tensor that differs. Files without these entries
(saved before checksums existed, or rewritten by other tools) are loaded unchecked.

CRC-32 (zlib's, about 2 GB/s here, twice SHA-256's speed) is the right check for accidental damage: it detects every
single-bit error, every burst of up to 32 bits and any odd number of flipped bits; it is no protection against
deliberate tampering, which no unsigned checksum is.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


#: Metadata key of the per-tensor checksum table.
CHECKSUMS_KEY = "peft_diffprune.checksums"
#: Metadata key of the checksum of every other metadata entry.
METADATA_CRC_KEY = "peft_diffprune.metadata_crc32"
_ALGORITHM = "crc32"
_HEADER_LENGTH_BYTES = 8
_ALIGNMENT = 8
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}

_FIX = (
    "The file is damaged (an interrupted download or copy, or a disk error): download or copy the adapter again, or "
    "save it again from the model that made it."
)


class AdapterChecksumError(ValueError):
    """A saved adapter file does not match the checksums recorded when it was saved."""


def _read_header(path: Path, data: bytes | memoryview) -> tuple[dict, int]:
    """The parsed safetensors header and the offset of the tensor data; a clear error if it cannot be parsed."""
    try:
        (length,) = struct.unpack("<Q", data[:_HEADER_LENGTH_BYTES])
        if _HEADER_LENGTH_BYTES + length > len(data):
            raise ValueError(f"header length {length} exceeds the file's {len(data)} bytes")
        header = json.loads(bytes(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length]))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        for key, info in header.items():
            if key != "__metadata__" and not (isinstance(info, dict) and info.keys() >= _TENSOR_FIELDS):
                raise ValueError(f"the header entry {key!r} is not a tensor's dtype, shape and data offsets")
    except (struct.error, UnicodeDecodeError, ValueError) as error:
        raise AdapterChecksumError(f"{path} is not a readable safetensors file ({error}). {_FIX}") from error
    return header, _HEADER_LENGTH_BYTES + length


def _tensor_crc(info: dict, data: memoryview, start: int) -> str:
    begin, end = (start + offset for offset in info["data_offsets"])
    # dtype and shape as the header writes them (compact JSON): `F16[113566]`, `F32[384,1536]`
    record = (info["dtype"] + json.dumps(info["shape"], separators=(",", ":"))).encode()
    return f"{zlib.crc32(data[begin:end], zlib.crc32(record)):08x}"


def _metadata_crc(metadata: dict) -> str:
    entries = {key: value for key, value in metadata.items() if key != METADATA_CRC_KEY}
    return f"{zlib.crc32(json.dumps(entries, sort_keys=True).encode()):08x}"


@contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """The file's bytes, memory-mapped: checking a 181 MB gated checkpoint copies nothing."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                yield view
            finally:
                view.release()


def seal_file(path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Add the checksum entries (and `metadata`) to the header of the safetensors file at `path`, in place.

    The tensor data is copied byte for byte behind the new header; the file is replaced atomically.
    """
    path = Path(path)
    with _mapped(path) as data:
        header, start = _read_header(path, data)
        tensors = {key: info for key, info in header.items() if key != "__metadata__"}
        new_metadata = {**header.get("__metadata__", {}), **(metadata or {})}
        checksums = {key: _tensor_crc(info, data, start) for key, info in sorted(tensors.items())}
        new_metadata[CHECKSUMS_KEY] = json.dumps({"algorithm": _ALGORITHM, "tensors": checksums}, sort_keys=True)
        new_metadata[METADATA_CRC_KEY] = _metadata_crc(new_metadata)
        encoded = json.dumps({"__metadata__": new_metadata, **tensors}, separators=(",", ":")).encode()
        # as safetensors writes it: padded with spaces so that the tensor data stays 8-byte aligned
        encoded += b" " * (-len(encoded) % _ALIGNMENT)
        staging = path.with_name(f".{path.name}.sealing")
        with open(staging, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            out.write(data[start:])
            out.flush()
            os.fsync(out.fileno())
    os.replace(staging, path)


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (empty if it has none)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_LENGTH_BYTES)
        (length,) = struct.unpack("<Q", head) if len(head) == _HEADER_LENGTH_BYTES else (0,)
        header, _ = _read_header(path, head + handle.read(length))
    return header.get("__metadata__", {}) or {}


def verify_file(path: str | os.PathLike) -> bool:
    """Check every tensor of a sealed safetensors file against its recorded checksum.

    Returns False for a file without checksums (nothing to check), True when all match, and raises
    [`AdapterChecksumError`] naming the file and the damaged tensor (or header) otherwise.
    """
    path = Path(path)
    with _mapped(path) as data:
        header, start = _read_header(path, data)
        metadata = header.pop("__metadata__", None) or {}
        recorded = {key for key in (CHECKSUMS_KEY, METADATA_CRC_KEY) if key in metadata}
        if not recorded:
            return False
        if len(recorded) < 2 or metadata[METADATA_CRC_KEY] != _metadata_crc(metadata):
            raise AdapterChecksumError(
                f"The header of {path} is damaged: its metadata does not match the checksum recorded when it was "
                f"saved. {_FIX}"
            )
        try:
            table = json.loads(metadata[CHECKSUMS_KEY])
            algorithm, checksums = table["algorithm"], table["tensors"]
        except (ValueError, KeyError, TypeError) as error:
            raise AdapterChecksumError(f"The checksum table of {path} cannot be read ({error}). {_FIX}") from error
        if algorithm != _ALGORITHM:
            raise AdapterChecksumError(
                f"{path} records checksums of kind {algorithm!r}, but this peft_diffprune knows only "
                f"{_ALGORITHM!r}: upgrade peft_diffprune (pip install -U peft_diffprune) to load it."
            )
        unlisted = sorted(set(header) - set(checksums))
        if unlisted:
            raise AdapterChecksumError(
                f"{path} holds a tensor {unlisted[0]!r} that was not in the file when it was saved (its name in the "
                f"header is damaged). {_FIX}"
            )
        missing = sorted(set(checksums) - set(header))
        if missing:
            raise AdapterChecksumError(f"{path} lacks the tensor {missing[0]!r} it was saved with. {_FIX}")
        try:
            end = max((start + info["data_offsets"][1] for info in header.values()), default=start)
            actual = {key: _tensor_crc(header[key], data, start) for key in sorted(header)}
        except (KeyError, TypeError, IndexError) as error:
            raise AdapterChecksumError(
                f"The tensor table in the header of {path} is damaged ({error!r}). {_FIX}"
            ) from error
        if end != len(data):
            raise AdapterChecksumError(
                f"{path} has {len(data)} bytes, but its tensors end at byte {end}: the file is truncated or has "
                f"bytes appended. {_FIX}"
            )
        for key, checksum in actual.items():
            if checksum != checksums[key]:
                raise AdapterChecksumError(
                    f"Tensor {key!r} of {path} fails its checksum: its bytes differ from those saved. {_FIX}"
                )
    return True
