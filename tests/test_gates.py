"""Tests for the hard-concrete gates and the expected-L0 penalty (`peft_diffprune.diff_pruning.gates`).

The distribution checks sample many gates and compare frequencies with probabilities derived here from the definition
`z = min(1, max(0, sigmoid(logit(u) + alpha) * (r - l) + l))`, `u ~ U(0, 1)`, with a tolerance of five binomial
standard deviations.
"""

import math
import multiprocessing
import threading

import numpy as np
import pytest
import torch

from peft_diffprune.diff_pruning import gates
from peft_diffprune.diff_pruning.gates import (
    NOISE_EPS,
    deterministic_gate,
    expected_l0,
    hard_concrete_delta,
    hard_concrete_delta_and_penalty,
    prob_gate_one,
    prob_gate_zero,
    sample_gate_from_noise,
    sample_group_gate,
)


PAPER_STRETCH = (-1.5, 1.5)
# Louizos et al.'s stretch: not symmetric about 0, so the expected-L0 shift log(-l / r) is not 0
LOUIZOS_STRETCH = (-0.1, 1.1)
STRETCHES = [pytest.param(PAPER_STRETCH, id="paper-stretch"), pytest.param(LOUIZOS_STRETCH, id="louizos-stretch")]
NUM_SAMPLES = 200_000
SIGMAS = 5.0


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def prob_s_below(threshold: float, alpha: float) -> float:
    """P(sigmoid(logit(u) + alpha) <= threshold) = P(u <= sigmoid(logit(threshold) - alpha))."""
    return sigmoid(logit(threshold) - alpha)


def prob_z_at_most(c: float, alpha: float, stretch: tuple[float, float]) -> float:
    """P(z <= c) for c in [0, 1): z <= c exactly when the unstretched sample s is <= (c - l) / (r - l)."""
    left, right = stretch
    return prob_s_below((c - left) / (right - left), alpha)


def assert_frequency(observed: float, probability: float, num_samples: int) -> None:
    std = math.sqrt(probability * (1 - probability) / num_samples)
    assert abs(observed - probability) <= SIGMAS * std + 1e-12, (observed, probability, std)


def sampled_gates(alpha: float, stretch: tuple[float, float], num_samples: int = NUM_SAMPLES) -> torch.Tensor:
    """Gates drawn through the training path: with `w = 1` the sampled diff is the gate itself."""
    torch.manual_seed(0)
    w = torch.ones(num_samples)
    return hard_concrete_delta(w, torch.full((num_samples,), alpha), stretch)


class TestSampling:
    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_sample_gate_from_noise_matches_formula(self, stretch):
        left, right = stretch
        alpha = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.0, 5.0], dtype=torch.float64)
        noise = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.9, 1.0], dtype=torch.float64)

        gate = sample_gate_from_noise(alpha, noise, stretch)

        for a, u, z in zip(alpha.tolist(), noise.tolist(), gate.tolist(), strict=True):
            u = min(max(u, NOISE_EPS), 1 - NOISE_EPS)  # the authors' clamp
            stretched = sigmoid(math.log(u) - math.log(1 - u) + a) * (right - left) + left
            assert z == pytest.approx(min(1.0, max(0.0, stretched)), abs=1e-12)

    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_training_sample_equals_reference_for_same_noise(self, stretch):
        alpha = torch.linspace(-4, 6, 5000)
        torch.manual_seed(7)
        delta = hard_concrete_delta(torch.ones_like(alpha), alpha, stretch)
        torch.manual_seed(7)
        noise = torch.rand(alpha.shape, dtype=torch.float32)

        reference = sample_gate_from_noise(alpha, noise, stretch)

        torch.testing.assert_close(delta, reference, rtol=1e-5, atol=1e-6)
        # the comparison covers both atoms and the continuous part
        assert (reference == 0).any() and (reference == 1).any() and ((reference > 0) & (reference < 1)).any()

    def test_fresh_noise_on_every_call(self):
        alpha = torch.zeros(1000)
        first = hard_concrete_delta(torch.ones_like(alpha), alpha, PAPER_STRETCH)
        second = hard_concrete_delta(torch.ones_like(alpha), alpha, PAPER_STRETCH)
        assert not torch.equal(first, second)

    @pytest.mark.parametrize("alpha", [-2.0, 0.0, 1.0, 5.0])
    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_atoms_match_hard_concrete_distribution(self, alpha, stretch):
        left, right = stretch
        z = sampled_gates(alpha, stretch)

        p_zero = prob_s_below(-left / (right - left), alpha)
        p_one = 1 - prob_s_below((1 - left) / (right - left), alpha)
        assert prob_gate_zero(torch.tensor(alpha), stretch).item() == pytest.approx(p_zero, rel=1e-6)
        assert prob_gate_one(torch.tensor(alpha), stretch).item() == pytest.approx(p_one, rel=1e-6)
        assert_frequency((z == 0).double().mean().item(), p_zero, NUM_SAMPLES)
        assert_frequency((z == 1).double().mean().item(), p_one, NUM_SAMPLES)
        assert z.min() >= 0 and z.max() <= 1

    @pytest.mark.parametrize("alpha", [-2.0, 1.0])
    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_continuous_part_matches_cdf(self, alpha, stretch):
        z = sampled_gates(alpha, stretch)
        for c in (0.1, 0.25, 0.5, 0.75, 0.9):
            assert_frequency((z <= c).double().mean().item(), prob_z_at_most(c, alpha, stretch), NUM_SAMPLES)

    def test_group_gate_sample_equals_reference_for_same_noise(self):
        group_alpha = torch.tensor([-1.0, 0.3, 4.0])
        torch.manual_seed(3)
        sampled = sample_group_gate(group_alpha, PAPER_STRETCH)
        torch.manual_seed(3)
        noise = torch.rand(group_alpha.shape)
        torch.testing.assert_close(sampled, sample_gate_from_noise(group_alpha, noise, PAPER_STRETCH))


def _draw_in_child(queue) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(5)
    queue.put(gates._uniform_noise(torch.zeros(50, 101)).sum().item())


class TestNoise:
    """CPU noise of at least `THREADED_NOISE_MIN` entries is drawn in chunks of `NOISE_CHUNK` over threads; these
    tests shrink both so that small tensors take that path."""

    @pytest.fixture
    def small_chunks(self, monkeypatch):
        monkeypatch.setattr(gates, "THREADED_NOISE_MIN", 1000)
        monkeypatch.setattr(gates, "NOISE_CHUNK", 777)

    def test_a_seed_gives_the_same_noise_at_any_number_of_threads(self, small_chunks):
        alpha = torch.zeros(50, 101)  # 5,050 entries: 7 chunks
        threads = torch.get_num_threads()
        draws = []
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                torch.manual_seed(5)
                draws.append(gates._uniform_noise(alpha))
        finally:
            torch.set_num_threads(threads)
        assert draws[0].dtype == torch.float32 and draws[0].shape == alpha.shape
        assert all(torch.equal(draws[0], draw) for draw in draws[1:])
        # the threads of an earlier count are let go, not kept beside the new ones
        try:
            for count in (2, 3) * 4:
                torch.set_num_threads(count)
                gates._uniform_noise(alpha)
        finally:
            torch.set_num_threads(threads)
        assert sum(t.name.startswith("diffprune-noise") for t in threading.enumerate()) <= 3
        # torch's seed drives it, the stream moves on, and each chunk draws numbers of its own
        torch.manual_seed(6)
        assert not torch.equal(gates._uniform_noise(alpha), draws[0])
        torch.manual_seed(5)
        gates._uniform_noise(alpha)
        assert not torch.equal(gates._uniform_noise(alpha), draws[0])
        flat = draws[0].view(-1)
        assert not torch.equal(flat[:777], flat[777:1554])
        # what a user reproduces it from: one seed from torch's generator, chunk c from PCG64 seeded (seed, c)
        torch.manual_seed(5)
        seed = int(torch.randint(1 << 62, (1,)))
        chunk = np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, 2)))).random(777, dtype=np.float32)
        assert torch.equal(flat[2 * 777 : 3 * 777], torch.from_numpy(chunk))

    def test_threaded_noise_is_uniform_and_uncorrelated(self):
        torch.manual_seed(0)
        count = 2 * gates.NOISE_CHUNK + 12_345  # three chunks at the library's sizes
        u = gates._uniform_noise(torch.empty(count)).double()
        assert u.min() >= 0 and u.max() < 1
        bins = 100
        expected = count / bins
        histogram = torch.histc(u, bins=bins, min=0, max=1)
        assert (histogram - expected).abs().max() <= SIGMAS * math.sqrt(expected * (1 - 1 / bins))
        centred = u - 0.5
        for lag in (1, 2, gates.NOISE_CHUNK):  # neighbours, and the same offset in the next chunk
            correlation = (centred[:-lag] * centred[lag:]).mean() / centred.var()
            assert abs(correlation.item()) <= SIGMAS / math.sqrt(count - lag)

    def test_the_noise_threads_are_made_again_in_a_forked_child(self, small_chunks):
        # a forked child inherits the parent's thread pool object but none of its threads
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            torch.manual_seed(5)
            expected = gates._uniform_noise(torch.zeros(50, 101)).sum().item()
        finally:
            torch.set_num_threads(threads)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_draw_in_child, args=(queue,))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0
        assert queue.get(timeout=5) == expected


class TestGradients:
    @pytest.mark.parametrize("structured", [False, True], ids=["unstructured", "structured"])
    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_gradients_equal_reference_autograd(self, structured, stretch):
        generator = torch.Generator().manual_seed(0)
        w0 = torch.randn(64, 33, generator=generator)
        alpha0 = torch.empty(64, 33).uniform_(-3.0, 6.0, generator=generator)
        upstream = torch.randn(64, 33, generator=generator)

        def grads(use_reference: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
            w = w0.clone().requires_grad_()
            alpha = alpha0.clone().requires_grad_()
            group = torch.tensor(0.7, requires_grad=True) if structured else None
            torch.manual_seed(11)
            if use_reference:
                z = sample_gate_from_noise(alpha, torch.rand(alpha.shape, dtype=torch.float32), stretch)
                delta = z * w if group is None else z * w * group
            else:
                delta = hard_concrete_delta(w, alpha, stretch, group)
            (delta * upstream).sum().backward()
            return w.grad, alpha.grad, None if group is None else group.grad, delta.detach()

        w_grad, alpha_grad, group_grad, delta = grads(use_reference=False)
        ref_w_grad, ref_alpha_grad, ref_group_grad, ref_delta = grads(use_reference=True)

        torch.testing.assert_close(delta, ref_delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w_grad, ref_w_grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alpha_grad, ref_alpha_grad, rtol=1e-5, atol=1e-6)
        if structured:
            torch.testing.assert_close(group_grad, ref_group_grad, rtol=1e-5, atol=1e-5)
        # gates stuck at an atom pass no gradient to alpha; the others do
        assert (ref_alpha_grad == 0).any() and (ref_alpha_grad != 0).any()

    @pytest.mark.parametrize("threaded", [False, True], ids=["one-draw", "threaded-chunks"])
    @pytest.mark.parametrize("rows", [False, True], ids=["all-rows", "some-rows"])
    def test_backward_draws_the_forwards_gate_again(self, rows, threaded, monkeypatch):
        # no gate is kept for backward: it is drawn again from the generator state of the forward, bit for bit, even
        # when other draws happen in between, and backward leaves the random stream where it was
        monkeypatch.setattr(gates, "_redraw", True)  # gates.set_redraw_gates(True)
        if threaded:  # noise drawn in chunks over threads (what large CPU tensors take)
            monkeypatch.setattr(gates, "THREADED_NOISE_MIN", 1000)
            monkeypatch.setattr(gates, "NOISE_CHUNK", 500)
        drawn = []
        noise = gates._uniform_noise  # the gates' one source of noise, fused or eager
        monkeypatch.setattr(gates, "_uniform_noise", lambda a: drawn.append(noise(a)) or drawn[-1].clone())
        w = torch.randn(64, 33).requires_grad_()
        alpha = torch.empty(64, 33).uniform_(-3.0, 6.0).requires_grad_()
        index = torch.tensor([3, 5, 40]) if rows else None
        torch.manual_seed(11)
        delta, _ = hard_concrete_delta_and_penalty(w, alpha, PAPER_STRETCH, rows=index)
        torch.rand(1000)  # draws between forward and backward
        before_backward = torch.get_rng_state()
        delta.sum().backward()
        assert torch.equal(torch.get_rng_state(), before_backward)
        forward_noise, backward_noise = drawn
        assert torch.equal(forward_noise, backward_noise)
        # and the gradients are those of the gate the forward used
        used = slice(None) if index is None else index
        forward_gate = delta.detach() / w.detach()[used]
        expected = torch.zeros_like(w)
        expected[used] = forward_gate
        torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=0)
        gate = sample_gate_from_noise(alpha.detach()[used], forward_noise, PAPER_STRETCH)
        torch.testing.assert_close(forward_gate, gate, rtol=1e-6, atol=1e-6)

    def test_only_w_requires_grad(self):
        w = torch.randn(10, requires_grad=True)
        alpha = torch.full((10,), 5.0)
        torch.manual_seed(0)
        delta = hard_concrete_delta(w, alpha, PAPER_STRETCH)
        delta.sum().backward()
        torch.testing.assert_close(w.grad, delta.detach() / w.detach())


class TestExpectedL0:
    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_closed_form(self, stretch):
        left, right = stretch
        alpha = torch.linspace(-6, 6, 101, dtype=torch.float64).reshape(1, 101)
        expected = sum(sigmoid(a - math.log(-left / right)) for a in alpha.flatten().tolist())

        value = expected_l0(alpha.float(), stretch)

        assert value.dtype == torch.float32 and value.dim() == 0
        assert value.item() == pytest.approx(expected, rel=1e-6)

    def test_paper_stretch_has_no_shift(self):
        alpha = torch.randn(50)
        torch.testing.assert_close(expected_l0(alpha, PAPER_STRETCH), torch.sigmoid(alpha).sum())
        # with Louizos et al.'s stretch the shift log(0.1 / 1.1) raises every open probability
        assert expected_l0(alpha, LOUIZOS_STRETCH) > expected_l0(alpha, PAPER_STRETCH)

    def test_alpha_init_gives_sigmoid_5_per_entry(self):
        alpha = torch.full((7, 13), 5.0)
        assert expected_l0(alpha, PAPER_STRETCH).item() == pytest.approx(91 * sigmoid(5.0), rel=1e-6)

    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_equals_monte_carlo_count_of_nonzero_gates(self, stretch):
        num_draws = 20_000
        alpha = torch.linspace(-3.0, 4.0, 40)
        torch.manual_seed(1)
        z = hard_concrete_delta(torch.ones(num_draws, 40), alpha.expand(num_draws, 40).contiguous(), stretch)

        p_open = 1 - prob_gate_zero(alpha.double(), stretch)
        std = math.sqrt((p_open * (1 - p_open)).sum().item() / num_draws)
        observed = (z != 0).double().sum(dim=1).mean().item()
        assert abs(observed - expected_l0(alpha, stretch).item()) <= SIGMAS * std

    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_structured_is_group_probability_times_sum(self, stretch):
        left, right = stretch
        shift = math.log(-left / right)
        alpha = torch.linspace(-2.0, 3.0, 30)
        group_alpha = torch.tensor(0.4)

        value = expected_l0(alpha, stretch, group_alpha)

        expected = sigmoid(0.4 - shift) * sum(sigmoid(a - shift) for a in alpha.tolist())
        assert value.item() == pytest.approx(expected, rel=1e-6)

    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_structured_equals_monte_carlo(self, stretch):
        num_draws = 20_000
        alpha = torch.linspace(-3.0, 4.0, 40)
        group_alpha = torch.tensor(0.5)
        torch.manual_seed(2)
        group = sample_group_gate(group_alpha.expand(num_draws, 1).contiguous(), stretch)
        z = hard_concrete_delta(torch.ones(num_draws, 40), alpha.expand(num_draws, 40).contiguous(), stretch) * group

        counts = (z != 0).double().sum(dim=1)
        std = counts.std().item() / math.sqrt(num_draws)
        assert abs(counts.mean().item() - expected_l0(alpha, stretch, group_alpha).item()) <= SIGMAS * std

    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_gradient_is_sigmoid_derivative(self, stretch):
        left, right = stretch
        shift = math.log(-left / right)
        alpha = torch.linspace(-5.0, 5.0, 21, requires_grad=True)
        group_alpha = torch.tensor(1.5, requires_grad=True)

        expected_l0(alpha, stretch).backward()
        s = torch.sigmoid(alpha.detach() - shift)
        torch.testing.assert_close(alpha.grad, s * (1 - s))

        alpha.grad = None
        expected_l0(alpha, stretch, group_alpha).backward()
        s_group = torch.sigmoid(group_alpha.detach() - shift)
        torch.testing.assert_close(alpha.grad, s * (1 - s) * s_group)
        torch.testing.assert_close(group_alpha.grad, s.sum() * s_group * (1 - s_group))

    def test_low_precision_alpha_gives_fp32_total(self):
        alpha = torch.full((4, 4), 5.0, dtype=torch.bfloat16, requires_grad=True)
        value = expected_l0(alpha, PAPER_STRETCH)
        value.backward()
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(16 * sigmoid(5.0), rel=1e-2)
        assert alpha.grad.dtype == torch.bfloat16 and (alpha.grad > 0).all()


class TestDeterministicGate:
    @pytest.mark.parametrize(
        "alpha, stretch, expected",
        [
            pytest.param(5.0, PAPER_STRETCH, 1.0, id="open"),
            pytest.param(-5.0, PAPER_STRETCH, 0.0, id="closed"),
            # 3 * sigmoid(0) - 1.5 = 0: with the paper's stretch a logit of 0 already closes the gate
            pytest.param(0.0, PAPER_STRETCH, 0.0, id="zero-logit-paper-stretch"),
            pytest.param(0.0, LOUIZOS_STRETCH, 0.5, id="zero-logit-louizos-stretch"),
            pytest.param(1.0, PAPER_STRETCH, 3 * sigmoid(1.0) - 1.5, id="inside"),
        ],
    )
    def test_values(self, alpha, stretch, expected):
        gate = deterministic_gate(torch.tensor(alpha, dtype=torch.float64), stretch)
        assert gate.item() == pytest.approx(expected, abs=1e-12)

    @pytest.mark.parametrize("stretch", STRETCHES)
    def test_formula_on_a_tensor(self, stretch):
        left, right = stretch
        alpha = torch.linspace(-6, 6, 49)
        expected = (torch.sigmoid(alpha) * (right - left) + left).clamp(0, 1)
        torch.testing.assert_close(deterministic_gate(alpha, stretch), expected)
