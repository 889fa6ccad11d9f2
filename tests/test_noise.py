"""Per-sample sampling noise (`generators.noise`): the hash, its statistics, its independence from the batch, the
Gumbel-max draw, RandAR's order, and batch invariance of whole generations."""

from __future__ import annotations

import math

import pytest
import torch

from mergevq_core.generators import RandAR, SampleNoise, SamplingSettings, draw_from
from mergevq_core.generators.noise import ORDER_STREAM, mix64, sub_token_stream, to_unit

from .test_generators import HEADS, make

M64 = (1 << 64) - 1


def ref_mix(x: int) -> int:
    """splitmix64's finaliser on Python ints (unsigned 64-bit)."""
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_bits(seed: int, index: int, stream: int, step: int, elem: int) -> int:
    """The documented key schedule in plain Python: an independent check of wrapping and logical shifts."""
    from mergevq_core.generators import noise as nz

    u = lambda v: v & M64  # noqa: E731
    h = ref_mix(index * u(nz._INDEX_K) + seed * u(nz._SEED_K))
    h = ref_mix(h + stream * u(nz._STREAM_K) + u(nz._GOLDEN))
    h = ref_mix(h + step * u(nz._STEP_K) + u(nz._GOLDEN))
    return ref_mix(h + elem * u(nz._ELEM_K))


def test_hash_matches_a_python_reference():
    x = torch.tensor([0, 1, -1, 2**62, -(2**63), 123456789], dtype=torch.int64)
    assert [v & M64 for v in mix64(x).tolist()] == [ref_mix(v) for v in x.tolist()]
    noise = SampleNoise(7, torch.tensor([0, 5, 2**40]))
    got = noise.bits(3, 11, (4,)).tolist()
    want = [[ref_bits(7, i, 3, 11, e) for e in range(4)] for i in (0, 5, 2**40)]
    assert [[v & M64 for v in row] for row in got] == want


def test_uniform_is_open_and_roughly_uniform():
    u = SampleNoise.arange(0, 64).uniform(1, 0, (4096,))
    assert u.shape == (64, 4096) and u.dtype == torch.float32
    assert bool((u > 0).all() and (u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert float((hist - 1 / 16).abs().max()) < 0.005
    ends = to_unit(torch.tensor([0, -1], dtype=torch.int64))  # all-zero and all-one bits: the extremes
    assert ends.tolist() == [2.0**-24, 1 - 2.0**-24] and bool((ends > 0).all() and (ends < 1).all())
    gum = SampleNoise.arange(1, 64).gumbel(1, 0, (4096,))
    assert bool(torch.isfinite(gum).all()) and abs(float(gum.mean()) - 0.5772) < 0.02
    assert abs(float(gum.var()) - math.pi**2 / 6) < 0.05


def test_streams_steps_indices_and_seeds_are_decorrelated():
    base = SampleNoise.arange(0, 256)
    a = base.uniform(1, 3, (512,)).flatten()
    others = {
        "stream": base.uniform(2, 3, (512,)), "step": base.uniform(1, 4, (512,)),
        "index": SampleNoise.arange(0, 256, start=1).uniform(1, 3, (512,)),
        "seed": SampleNoise.arange(1, 256).uniform(1, 3, (512,)),
        "element": torch.roll(base.uniform(1, 3, (512,)), 1, dims=1),
    }
    for name, b in others.items():
        b = b.flatten()
        assert not torch.equal(a, b), name
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(corr) < 0.01, (name, corr)


def test_values_depend_on_the_sample_not_the_batch():
    full = SampleNoise(3, torch.arange(8))
    ref = full.gumbel(sub_token_stream(0), 5, (3, 7))
    assert ref.shape == (8, 3, 7)
    shuffled = SampleNoise(3, torch.tensor([6, 2, 40, 2]))  # other rows, other order, a repeat, an outsider
    got = shuffled.gumbel(sub_token_stream(0), 5, (3, 7))
    assert torch.equal(got[0], ref[6]) and torch.equal(got[1], ref[2]) and torch.equal(got[3], ref[2])
    assert torch.equal(full.select(torch.tensor([4, 1])).uniform(2, 1), full.uniform(2, 1)[[4, 1]])
    assert torch.equal(full[2:5].uniform(2, 1, (9,)), full.uniform(2, 1, (9,))[2:5])
    # a tensor step (what a compiled step would pass) gives what the int gives
    assert torch.equal(full.bits(1, torch.tensor(5), (6,)), full.bits(1, 5, (6,)))
    assert torch.equal(full.bits(1, torch.full((8,), 5), (6,)), full.bits(1, 5, (6,)))
    assert len(full) == 8 and full.index.dtype == torch.int64
    with pytest.raises(ValueError):
        SampleNoise(0, torch.zeros(2, 2, dtype=torch.long))


# ------------------------------------------------------------------ drawing
def test_gumbel_max_draws_from_the_filtered_softmax():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03]))
    rows = 40000
    noise = SampleNoise.arange(0, rows)
    ids = draw_from(logits.expand(rows, -1), noise, 1, 0)
    freq = torch.bincount(ids, minlength=5).float() / rows
    torch.testing.assert_close(freq, logits.exp(), atol=0.01, rtol=0)
    # top-k 2 then temperature 0.5: p ∝ (0.4², 0.3²)
    ids = draw_from(logits.expand(rows, -1), noise, 1, 0, temperature=0.5, top_k=2)
    freq = torch.bincount(ids, minlength=5).float() / rows
    torch.testing.assert_close(freq, torch.tensor([16 / 25, 9 / 25, 0, 0, 0]), atol=0.01, rtol=0)
    assert draw_from(logits[None], SampleNoise.arange(0, 1), 1, 0, temperature=0).tolist() == [0]
    with pytest.raises(ValueError, match="noise has 1 rows for 2 rows"):
        draw_from(logits.expand(2, -1), SampleNoise.arange(0, 1), 1, 0)


def test_picker_draws_per_sample_and_copies_ids_to_both_cfg_halves():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)  # [cond (3); uncond (3)]
    settings = SamplingSettings(cfg=(2.0, 3.0), temperature=(1.0, 0.7), top_k=(0, 10))
    ids = settings.picker(10, SampleNoise.arange(4, 3))(2, 1, logits)
    assert ids.shape == (6,) and torch.equal(ids[:3], ids[3:])
    alone = settings.picker(10, SampleNoise(4, torch.tensor([1])))(2, 1, logits[[1, 4]])
    assert alone.tolist() == [int(ids[1])] * 2  # row 1 drawn alone gives what it gave in the batch
    plain = SamplingSettings().picker(10, SampleNoise.arange(4, 3))
    assert plain(0, 0, logits[:3]).shape == (3,)


# ------------------------------------------------------------------ RandAR's order
def test_randar_order_from_noise_and_training_path_unchanged():
    k = torch.tensor([9, 4, 9])
    order = RandAR.random_order(k, 9, SampleNoise.arange(0, 3))
    assert sorted(order[0].tolist()) == list(range(9)) and order[1, 4:].tolist() == [4, 5, 6, 7, 8]
    assert sorted(order[1, :4].tolist()) == [0, 1, 2, 3]
    keys = SampleNoise.arange(0, 3).uniform(ORDER_STREAM, 0, (9,))
    assert torch.equal(order[0], keys[0].argsort(stable=True))
    alone = RandAR.random_order(k[2:], 9, SampleNoise(0, torch.tensor([2])))
    assert torch.equal(alone[0], order[2])
    # training keeps drawing torch.rand from its generator, exactly as before
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = torch.rand(3, 9, generator=g2)
    want = torch.where(torch.arange(9)[None] >= k[:, None], 2.0 + torch.arange(9.0)[None], want).argsort(1)
    assert torch.equal(RandAR.random_order(k, 9, g1), want) and torch.equal(g1.get_state(), g2.get_state())


# ------------------------------------------------------------------ batch invariance of whole generations
def _generate(g, labels, start, settings, k, steps):
    noise = SampleNoise(11, torch.arange(start, start + len(labels)))
    res = g.sample(labels, k, settings.picker(g.seq_len(k), noise), settings.guided, steps=steps, noise=noise)
    return res.ids.gather(1, res.assign) if res.assign is not None else res.ids  # raster: the N ids


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", ["llamagen", "mergear", "randar"])
@pytest.mark.parametrize("factorized, factor_depth", [HEADS[0], HEADS[2]])
def test_samples_do_not_depend_on_the_batch(name, guided, factorized, factor_depth):
    """Samples 0..7 in one batch of 8 equal samples 0-2 and 3-7 made as batches of 3 and 5."""
    g = make(name, factorized, factor_depth, **({"window": 3} if name == "mergear" else {}))
    k = g.check_k(9)
    steps = g.check_steps(None, k)
    settings = SamplingSettings(cfg=2.5 if guided else 1.0, top_k=40, top_p=0.95)
    labels = torch.tensor([3, 7, 1, 0, 9, 3, 4, 2])
    with torch.no_grad():
        one = _generate(g, labels, 0, settings, k, steps)
        split = torch.cat([_generate(g, labels[:3], 0, settings, k, steps),
                           _generate(g, labels[3:], 3, settings, k, steps)])
    assert torch.equal(one, split), (one != split).nonzero().tolist()
    again = _generate(g, labels, 0, settings, k, steps)
    other_seed = SampleNoise(12, torch.arange(8))
    other = g.sample(labels, k, settings.picker(g.seq_len(k), other_seed), settings.guided, steps=steps,
                     noise=other_seed)
    other = other.ids.gather(1, other.assign) if other.assign is not None else other.ids
    assert torch.equal(one, again) and not torch.equal(one, other)
