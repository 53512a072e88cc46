"""Compact encoding of the kept positions of a sparse diff (Elias-Fano).

A sparse diff of one tensor with `n` entries keeps `k` sorted flat positions. Elias-Fano stores each position's
`L = floor(log2(n / k))` low bits verbatim and its high bits as a unary-coded bit vector, which costs at most
`2 + log2(n / k)` bits per position, within two bits of the information bound `log2(C(n, k)) / k`. At the paper's
0.5% density that is about 9.6 bits, against 32 for an int32 index.

The code ends with a CRC-32 of the bytes before it, so that a flipped bit cannot decode to a different but valid
set of positions. The encoded size depends only on `(n, k)`, so a layer can allocate the buffer before loading (as
PEFT and transformers loaders require) and the buffer itself is the state that is saved and loaded. Decoding
validates the code: a buffer that is corrupt, truncated, unsorted, out of range or has duplicate positions raises.
"""

from __future__ import annotations

import zlib

import torch


_CRC_BYTES = 4


_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def _low_bits(n: int, k: int) -> int:
    """`L = floor(log2(n / k))`, the number of low bits stored verbatim per position."""
    return (n // k).bit_length() - 1 if k else 0


def _sizes(n: int, k: int) -> tuple[int, int, int]:
    low = _low_bits(n, k)
    low_bytes = (k * low + 7) // 8
    upper_bits = k + ((n - 1) >> low) + 1
    return low, low_bytes, (upper_bits + 7) // 8


def encoded_size(n: int, k: int) -> int:
    """Bytes of the Elias-Fano code of `k` positions out of `n`."""
    _, low_bytes, upper_bytes = _sizes(n, k)
    return low_bytes + upper_bytes + _CRC_BYTES


def _crc(body: torch.Tensor) -> torch.Tensor:
    value = zlib.crc32(body.cpu().numpy().tobytes())
    return torch.tensor(list(value.to_bytes(_CRC_BYTES, "little")), dtype=torch.uint8, device=body.device)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool/0-1 tensor into uint8, most significant bit first (numpy's packbits order)."""
    padded = torch.zeros((bits.numel() + 7) // 8 * 8, dtype=torch.uint8, device=bits.device)
    padded[: bits.numel()] = bits.to(torch.uint8)
    return (padded.view(-1, 8) << _BIT_SHIFTS.to(bits.device)).sum(1, dtype=torch.int32).to(torch.uint8)


def _unpack(data: torch.Tensor) -> torch.Tensor:
    return ((data.unsqueeze(1) >> _BIT_SHIFTS.to(data.device)) & 1).view(-1)


def encode_positions(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Elias-Fano code (uint8) of strictly increasing flat positions in `[0, n)`."""
    positions = positions.to(torch.int64)
    k = positions.numel()
    if k and (positions[0] < 0 or positions[-1] >= n or (k > 1 and (positions.diff() <= 0).any())):
        raise ValueError(f"positions must be strictly increasing and in [0, {n}).")
    low, _, upper_bytes = _sizes(n, k)
    shifts = torch.arange(low - 1, -1, -1, device=positions.device)
    low_bits = ((positions.unsqueeze(1) >> shifts) & 1).view(-1)
    upper = torch.zeros(upper_bytes * 8, dtype=torch.bool, device=positions.device)
    upper[(positions >> low) + torch.arange(k, device=positions.device)] = True
    body = torch.cat([_pack(low_bits), _pack(upper)])
    return torch.cat([body, _crc(body)])


def decode_positions(code: torch.Tensor, n: int, k: int, what: str = "sparse diff") -> torch.Tensor:
    """Decode and validate an Elias-Fano code; returns int64 positions. `what` names the tensor in errors."""
    low, low_bytes, upper_bytes = _sizes(n, k)
    if code.dtype != torch.uint8 or code.numel() != encoded_size(n, k):
        raise ValueError(
            f"The position code of {what} has {code.numel()} {code.dtype} entries, expected "
            f"{encoded_size(n, k)} uint8 for {k} positions out of {n}: the adapter file is corrupt or was "
            "made for a different base model."
        )
    body = code[:-_CRC_BYTES]
    if not torch.equal(_crc(body), code[-_CRC_BYTES:]):
        raise ValueError(
            f"The position code of {what} fails its checksum: the adapter file is corrupt or incomplete (were its "
            "weights loaded?)."
        )
    upper_set = _unpack(body[low_bytes:]).nonzero().squeeze(1)
    if upper_set.numel() != k:
        raise ValueError(
            f"The position code of {what} holds {upper_set.numel()} positions, expected {k}: the adapter file is "
            "corrupt or incomplete (were its weights loaded?)."
        )
    high = upper_set - torch.arange(k, device=code.device)
    positions = high << low
    if low:
        weights = torch.ones(low, dtype=torch.int64, device=code.device) << torch.arange(
            low - 1, -1, -1, device=code.device
        )
        low_values = _unpack(body[:low_bytes])[: k * low].view(k, low).to(torch.int64) @ weights
        positions = positions | low_values
    if k and positions[-1] >= n:
        raise ValueError(f"{what} has a kept position {int(positions[-1])} outside its {n} entries: corrupt file.")
    if k > 1 and (positions.diff() <= 0).any():
        raise ValueError(f"{what} has duplicate kept positions: the adapter file is corrupt.")
    return positions
