import math

import pytest
import torch

from mergevq_core.quant import (
    LFQ,
    bit_log_probs,
    codebook_entropy,
    codebook_probs,
    codes_to_indices,
    entropy_of,
    indices_to_codes,
    per_sample_entropy,
)


def all_codes(d: int) -> torch.Tensor:
    """(2^D, D) float64 code table in LSB-first index order, built independently."""
    idx = torch.arange(2**d)
    bits = torch.stack([(idx // 2**k) % 2 for k in range(d)], dim=-1)
    return bits.double() * 2 - 1


def brute_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, 2^D) explicit softmax of 2<z, c>/τ over the enumerated codebook."""
    codes = all_codes(z.shape[-1]).to(z.dtype)
    return torch.softmax(2 * z.reshape(-1, z.shape[-1]) @ codes.T / temperature, dim=-1)


def brute_h(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def sample_z(d: int, n: int, temperature: float, seed: int = 0) -> torch.Tensor:
    # scale with τ so the soft assignment is non-degenerate
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * temperature * 0.5).requires_grad_()


# ----------------------------------------------------------------- indices / codes


@pytest.mark.parametrize("d", [1, 3, 8, 18])
def test_roundtrip_random(d: int) -> None:
    z = torch.randn(4, 7, d)
    q = torch.where(z > 0, 1.0, -1.0)
    idx = codes_to_indices(q)
    assert idx.shape == (4, 7) and idx.dtype == torch.int64
    assert (idx >= 0).all() and (idx < 2**d).all()
    assert torch.equal(indices_to_codes(idx, d), q)


@pytest.mark.parametrize("d", [1, 4, 7])
def test_roundtrip_all_codes(d: int) -> None:
    idx = torch.arange(2**d)
    codes = indices_to_codes(idx, d)
    assert torch.equal(codes, all_codes(d).float())
    assert torch.equal(codes_to_indices(codes), idx)


def test_bit_order_lsb_first_and_zero_is_negative() -> None:
    d = 6
    lfq = LFQ(d)
    for k in range(d):
        z = -torch.ones(1, 1, d)
        z[..., k] = 0.3
        assert lfq(z, compute_entropy=False).indices.item() == 2**k
    out = lfq(torch.zeros(2, 3, d), compute_entropy=False)
    assert (out.quantized == -1).all() and (out.indices == 0).all()
    assert lfq.codebook_size == 64
    assert torch.equal(lfq.indices_to_codes(torch.tensor([5])), torch.tensor([[1.0, -1, 1, -1, -1, -1]]))
    assert lfq.codes_to_indices(torch.tensor([1.0, -1, 1, -1, -1, -1])).item() == 5


def test_quantized_values_and_straight_through() -> None:
    lfq = LFQ(5)
    z = torch.randn(2, 9, 5, requires_grad=True)
    out = lfq(z, compute_entropy=False)
    assert out.quantized.shape == z.shape
    assert set(out.quantized.detach().unique().tolist()) <= {-1.0, 1.0}
    w = torch.randn_like(z)
    (g,) = torch.autograd.grad((out.quantized * w).sum(), z)
    assert torch.equal(g, w)


def test_commit_loss_value_and_grad() -> None:
    z = torch.tensor([[[0.5, -2.0], [0.0, 1.5]]], requires_grad=True)
    out = LFQ(2)(z, compute_entropy=False)
    q = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])
    assert torch.allclose(out.commit_loss, ((z - q) ** 2).mean())
    assert math.isclose(out.commit_loss.item(), (0.25 + 1.0 + 1.0 + 0.25) / 4)
    (g,) = torch.autograd.grad(out.commit_loss, z)
    assert torch.allclose(g, 2 * (z - q) / 4)


def test_entropy_terms_combination_and_skip() -> None:
    lfq = LFQ(6, temperature=0.1, sample_entropy_weight=0.7, codebook_entropy_weight=1.3)
    z = torch.randn(3, 10, 6) * 0.05
    out = lfq(z)
    assert torch.allclose(out.sample_entropy, per_sample_entropy(z, 0.1))
    assert torch.allclose(out.codebook_entropy, codebook_entropy(z, 0.1))
    assert torch.allclose(out.entropy_loss, 0.7 * out.sample_entropy - 1.3 * out.codebook_entropy)
    off = lfq(z, compute_entropy=False)
    for t in (off.sample_entropy, off.codebook_entropy, off.entropy_loss):
        assert t.shape == () and t.item() == 0.0
    assert torch.equal(off.indices, out.indices)


# ----------------------------------------------------------------- entropy


def test_bit_log_probs_normalised_and_stable() -> None:
    z = torch.tensor([-1e3, -1.0, 0.0, 1e-3, 1.0, 1e3])
    logp1, logp0 = bit_log_probs(z, 100.0)
    assert torch.isfinite(logp1).all() and torch.isfinite(logp0).all()
    assert torch.allclose(logp1.exp() + logp0.exp(), torch.ones_like(z))
    assert torch.allclose(logp1.exp(), torch.sigmoid(400 * z))


@pytest.mark.parametrize("d", [4, 6])
@pytest.mark.parametrize("temperature", [1.0, 0.1, 0.01])
def test_per_sample_entropy_brute_force(d: int, temperature: float) -> None:
    z = sample_z(d, 33, temperature)
    expected = brute_h(brute_probs(z, temperature)).mean()
    got = per_sample_entropy(z, temperature)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    g_got, = torch.autograd.grad(got, z)
    g_exp, = torch.autograd.grad(expected, z)
    assert torch.allclose(g_got, g_exp, rtol=1e-8, atol=1e-10)


def test_per_sample_entropy_saturation_no_nan() -> None:
    z = (torch.randn(64, 8) * 10).requires_grad_()
    h = per_sample_entropy(z, 0.01)
    (g,) = torch.autograd.grad(h, z)
    assert torch.isfinite(h) and torch.isfinite(g).all() and h.item() >= 0


@pytest.mark.parametrize("d", [5, 6])
@pytest.mark.parametrize("chunk", [4096, 7])
def test_codebook_probs_brute_force(d: int, chunk: int) -> None:
    z = sample_z(d, 50, 0.1)
    got = codebook_probs(z.reshape(5, 10, d), 0.1, chunk=chunk)
    expected = brute_probs(z, 0.1).mean(0)
    assert got.shape == (2**d,)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-14)
    assert math.isclose(got.sum().item(), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("d", [5, 6])
@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_codebook_entropy_and_grad_brute_force(d: int, temperature: float) -> None:
    z = sample_z(d, 40, temperature, seed=d)
    expected = brute_h(brute_probs(z, temperature).mean(0))
    g_exp, = torch.autograd.grad(expected, z)
    for chunk in (4096, 6):
        got = codebook_entropy(z, temperature, chunk=chunk)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
        g_got, = torch.autograd.grad(got, z)
        assert torch.allclose(g_got, g_exp, rtol=1e-8, atol=1e-10)


def test_codebook_entropy_groups() -> None:
    d, groups, t = 6, 2, 0.1
    z = sample_z(d, 30, t, seed=3)
    got = codebook_entropy(z, t, groups=groups, chunk=8)
    expected = sum(brute_h(brute_probs(zg, t).mean(0)) for zg in z.split(d // groups, dim=-1))
    assert torch.allclose(got, expected, rtol=1e-10)
    assert got.item() >= codebook_entropy(z, t).item() - 1e-10  # sum of marginals ≥ joint
    g_got, = torch.autograd.grad(got, z)
    g_exp, = torch.autograd.grad(expected, z)
    assert torch.allclose(g_got, g_exp, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError):
        codebook_entropy(z, t, groups=4)


def test_codebook_entropy_saturated_grad_finite() -> None:
    # τ=0.01 with unit-scale z: most avg_p entries underflow to exactly 0
    z = torch.randn(2, 16, 10, requires_grad=True)
    h = codebook_entropy(z, 0.01)
    (g,) = torch.autograd.grad(h, z)
    assert torch.isfinite(h) and torch.isfinite(g).all()
    # H(mixture of 32 tokens) ≤ log 32 + mean per-token entropy
    assert 0 <= h.item() <= math.log(32) + per_sample_entropy(z, 0.01).item() + 1e-5


def test_entropy_of_zero_entries() -> None:
    p = torch.tensor([0.5, 0.5, 0.0, 0.0], requires_grad=True)
    h = entropy_of(p)
    (g,) = torch.autograd.grad(h, p)
    assert math.isclose(h.item(), math.log(2), rel_tol=1e-6)
    assert torch.isfinite(g).all() and (g[2:] == 0).all()


def test_codebook_entropy_d18_bounded() -> None:
    d = 18
    z = (torch.randn(2, 256, d) * 0.01).requires_grad_()
    h = codebook_entropy(z, 0.01, chunk=128)  # its time and memory: `mergevq benchmark lfq`
    (g,) = torch.autograd.grad(h, z)
    assert 0 <= h.item() <= d * math.log(2) + 1e-4
    assert torch.isfinite(g).all()
    with torch.no_grad():
        assert torch.allclose(h, codebook_entropy(z, 0.01, chunk=4096), rtol=1e-4)
        assert math.isclose(codebook_probs(z, 0.01).sum().item(), 1.0, rel_tol=1e-4)
    lfq = LFQ(d)
    out = lfq(z)
    assert out.indices.shape == (2, 256) and out.indices.max() < lfq.codebook_size
