"""Tests for the Elias-Fano code of kept positions (`peft_diffprune.diff_pruning.encoding`).

The reference encoder in `_sparse_helpers.raw_elias_fano` is written from the format description, so the package's
codes are checked bit for bit against an independent implementation, and it can write the invalid codes (duplicate,
decreasing, out-of-range positions) a corrupt file would hold.
"""

import math

import pytest
import torch
from _sparse_helpers import low_bits, low_part_bytes, raw_elias_fano

from peft_diffprune.diff_pruning.encoding import decode_positions, encode_positions, encoded_size


def random_positions(n: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].sort().values


CASES = [
    pytest.param(1, 1, id="n1-k1"),
    pytest.param(7, 1, id="n7-k1"),
    pytest.param(8, 8, id="full-byte"),
    pytest.param(13, 13, id="dense-all"),
    pytest.param(64, 2, id="n64-k2"),
    pytest.param(400, 19, id="n400-k19"),
    pytest.param(1000, 999, id="all-but-one"),
    pytest.param(4096, 20, id="n4096-k20"),
    pytest.param(30_000, 150, id="half-percent"),
    pytest.param(1_000_003, 5, id="prime-n-few"),
]


class TestRoundTrip:
    @pytest.mark.parametrize("n, k", CASES)
    def test_decode_inverts_encode(self, n, k):
        positions = random_positions(n, k, seed=n + k)
        code = encode_positions(positions, n)
        assert code.dtype == torch.uint8 and code.dim() == 1
        decoded = decode_positions(code, n, k)
        assert decoded.dtype == torch.int64
        assert torch.equal(decoded, positions)

    @pytest.mark.parametrize("n, k", CASES)
    def test_code_matches_reference_encoder_bit_for_bit(self, n, k):
        positions = random_positions(n, k, seed=2 * n + k)
        assert torch.equal(encode_positions(positions, n), raw_elias_fano(positions.tolist(), n))

    @pytest.mark.parametrize("n", [1, 2, 9, 255, 256, 257])
    def test_extreme_positions(self, n):
        # first and last entries, and every entry
        for positions in ([0], [n - 1], sorted({0, n - 1}), list(range(n))):
            code = encode_positions(torch.tensor(positions), n)
            assert decode_positions(code, n, len(positions)).tolist() == positions

    def test_empty(self):
        code = encode_positions(torch.empty(0, dtype=torch.int64), 10)
        assert code.numel() == encoded_size(10, 0)
        assert decode_positions(code, 10, 0).numel() == 0

    def test_int32_input_is_accepted(self):
        positions = torch.tensor([3, 17, 90], dtype=torch.int32)
        assert decode_positions(encode_positions(positions, 100), 100, 3).tolist() == [3, 17, 90]


class TestSize:
    @pytest.mark.parametrize("n, k", CASES)
    def test_size_depends_only_on_n_and_k(self, n, k):
        # layers allocate the buffer before loading: any k positions out of n must fit exactly
        sizes = {encode_positions(random_positions(n, k, seed), n).numel() for seed in range(3)}
        low = low_bits(n, k)
        # low part + unary high part, each padded to bytes, + a 4-byte CRC-32
        expected = (k * low + 7) // 8 + (k + ((n - 1) >> low) + 1 + 7) // 8 + 4
        assert sizes == {encoded_size(n, k)} == {expected}

    @pytest.mark.parametrize("n, k", CASES)
    def test_at_most_two_plus_log2_bits_per_position(self, n, k):
        # the documented bound, plus the one stop bit, the padding of the two parts to whole bytes and the CRC
        bits = 8 * encoded_size(n, k)
        assert bits <= k * (2 + math.log2(n / k)) + 1 + 14 + 32

    def test_half_percent_density_costs_under_ten_bits(self):
        n = 1_000_000
        k = round(0.005 * n)
        bits_per_position = 8 * encoded_size(n, k) / k
        # log2(200) + 2 = 9.64; an int32 index costs 32
        assert 9.0 < bits_per_position < 9.7


class TestEncodeValidation:
    @pytest.mark.parametrize(
        "positions",
        [
            pytest.param([3, 3], id="duplicate"),
            pytest.param([5, 2], id="decreasing"),
            pytest.param([-1, 4], id="negative"),
            pytest.param([4, 10], id="equal-to-n"),
            pytest.param([4, 11], id="above-n"),
        ],
    )
    def test_invalid_positions_raise(self, positions):
        with pytest.raises(ValueError, match="strictly increasing"):
            encode_positions(torch.tensor(positions), 10)


class TestDecodeValidation:
    N, K = 400, 19

    def valid(self) -> list[int]:
        return random_positions(self.N, self.K, seed=0).tolist()

    def test_reference_code_of_valid_positions_decodes(self):
        positions = self.valid()
        assert decode_positions(raw_elias_fano(positions, self.N), self.N, self.K).tolist() == positions

    @pytest.mark.parametrize("delta", [-1, 1])
    def test_wrong_length_raises(self, delta):
        code = raw_elias_fano(self.valid(), self.N)
        wrong = torch.cat([code, torch.zeros(1, dtype=torch.uint8)]) if delta > 0 else code[:-1]
        with pytest.raises(ValueError, match="corrupt or was made for a different base model"):
            decode_positions(wrong, self.N, self.K, what="the diff of 'layer.weight'")

    def test_wrong_dtype_raises(self):
        code = raw_elias_fano(self.valid(), self.N).to(torch.int32)
        with pytest.raises(ValueError, match="uint8"):
            decode_positions(code, self.N, self.K)

    def test_all_zero_code_raises(self):
        # what a layer holds when its weights were never loaded
        with pytest.raises(ValueError, match="fails its checksum"):
            decode_positions(torch.zeros(encoded_size(self.N, self.K), dtype=torch.uint8), self.N, self.K)

    def test_every_single_bit_flip_in_the_unary_part_raises(self):
        # a flip there changes the number of set bits, which must equal k
        code = raw_elias_fano(self.valid(), self.N)
        start = low_part_bytes(self.N, self.K)
        for index in range(start, code.numel()):
            for bit in range(8):
                corrupt = code.clone()
                corrupt[index] ^= 1 << bit
                with pytest.raises(ValueError, match="corrupt"):
                    decode_positions(corrupt, self.N, self.K)

    def test_duplicate_positions_raise(self):
        positions = self.valid()
        positions[5] = positions[4]
        code = raw_elias_fano(positions, self.N)
        assert code.numel() == encoded_size(self.N, self.K)
        with pytest.raises(ValueError, match="duplicate"):
            decode_positions(code, self.N, self.K, what="the diff of 'x.weight'")

    def test_decreasing_within_a_bucket_raises(self):
        # same high part, low parts in decreasing order: representable in the code, invalid as a position list
        positions = [1, 53, 50, 350]
        low = low_bits(self.N, len(positions))
        assert 53 >> low == 50 >> low
        with pytest.raises(ValueError, match="duplicate"):
            decode_positions(raw_elias_fano(positions, self.N), self.N, len(positions))

    @pytest.mark.parametrize("last", [400, 401, 403])
    def test_out_of_range_raises(self, last):
        positions = self.valid()
        positions[-1] = last
        code = raw_elias_fano(positions, self.N)
        assert code.numel() == encoded_size(self.N, self.K)  # the padding leaves room for such a code
        with pytest.raises(ValueError, match=f"kept position {last} outside its 400 entries"):
            decode_positions(code, self.N, self.K)

    def test_code_for_a_larger_tensor_raises(self):
        # the same number of bytes, written for a tensor with one more entry: its last position does not exist here
        n_larger = next(
            m for m in range(self.N + 1, 2 * self.N) if encoded_size(m, self.K) == encoded_size(self.N, self.K)
        )
        code = encode_positions(torch.arange(n_larger - self.K, n_larger), n_larger)
        with pytest.raises(ValueError, match="outside its 400 entries"):
            decode_positions(code, self.N, self.K)

    def test_error_names_the_tensor(self):
        with pytest.raises(ValueError, match="bert.pooler.dense.weight"):
            decode_positions(torch.zeros(3, dtype=torch.uint8), self.N, self.K, what="bert.pooler.dense.weight")
