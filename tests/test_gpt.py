from __future__ import annotations

import time

import pytest
import torch

from mergevq_core.models.gpt import GPT, GPTConfig, gpt_l, gpt_tiny
from mergevq_core.models.kv_cache import KVCache
from mergevq_core.nn.rope import apply_rope, grid_positions, rope_2d

N = 16  # 4 x 4 grid


def tiny_model(factorized: tuple[int, ...] = ()) -> GPT:
    torch.manual_seed(0)
    model = GPT(gpt_tiny(vocab_size=64, max_len=N, factorized=factorized)).eval()
    with torch.no_grad():
        for head in model.heads:  # zero-initialised heads would make every logit comparison trivial
            head.weight.normal_(std=0.5)
    return model


# ------------------------------------------------------------------ rope
def test_rope_preserves_norm_and_identity() -> None:
    x = torch.randn(2, 3, 5, 16)
    rows, cols = torch.randint(0, 9, (5,)), torch.randint(0, 9, (5,))
    cos, sin = rope_2d(16, rows, cols)
    assert cos.shape == sin.shape == (5, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(apply_rope(x, torch.ones(5, 8), torch.zeros(5, 8)), x)


@pytest.mark.parametrize("shift", [(0, 0), (3, 0), (0, 5), (2, -4)])
def test_rope_relative_position(shift: tuple[int, int]) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(p1: tuple[int, int], p2: tuple[int, int]) -> torch.Tensor:
        cq, sq = rope_2d(16, torch.tensor([p1[0]]), torch.tensor([p1[1]]))
        ck, sk = rope_2d(16, torch.tensor([p2[0]]), torch.tensor([p2[1]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    dr, dc = shift
    base = score((1 + dr, 2 + dc), (1, 2))
    for r, c in [(0, 0), (4, 7), (10, 3)]:
        torch.testing.assert_close(score((r + dr, c + dc), (r, c)), base, atol=1e-5, rtol=1e-5)
    # rows and columns rotate different pairs: a row shift is not a column shift
    if dr != dc:
        assert not torch.allclose(score((dr, dc), (0, 0)), score((dc, dr), (0, 0)), atol=1e-4)


def test_grid_positions() -> None:
    rows, cols = grid_positions(16)
    assert rows.tolist()[:6] == [0, 0, 0, 0, 1, 1] and cols.tolist()[:6] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError):
        grid_positions(15)


# ------------------------------------------------------------------ config
def test_config_validation() -> None:
    assert GPTConfig(vocab_size=64, max_len=16, dim=1024).hidden == 2816
    with pytest.raises(ValueError):
        GPTConfig(vocab_size=64, max_len=16, dim=30, heads=4)
    with pytest.raises(ValueError):
        GPTConfig(vocab_size=64, max_len=16, factorized=(3, 4))
    with pytest.raises(ValueError):
        GPTConfig(vocab_size=64, max_len=16, dropout=1.0)


# ------------------------------------------------------------------ trunk with a KV cache = one causal pass
def inputs(model: GPT, B: int, L: int):
    x = torch.randn(B, L, model.cfg.dim)
    rows, cols = grid_positions(N)
    cos, sin = model.rope(rows[:L], cols[:L])
    return x, cos, sin


@pytest.mark.parametrize("static", [False, True])
def test_cached_chunks_equal_one_pass(static: bool) -> None:
    model = tiny_model()
    B, L = 2, 9
    x, cos, sin = inputs(model, B, L)
    with torch.no_grad():
        full = model.trunk(x, cos, sin)
        cache = model.new_cache(B, 12, static=static)
        outs = []
        for a, b in [(0, 3), (3, 4), (4, 7), (7, 8), (8, 9)]:  # prefill, single steps and a parallel chunk
            cache.begin(b - a)
            outs.append(model.trunk(x[:, a:b], cos[a:b], sin[a:b], cache=cache))
            cache.end()
    assert cache.used == L and cache.live().tolist() == [L, L]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_freed_slots_match_a_masked_pass() -> None:
    model = tiny_model()
    B, L = 2, 7
    x, cos, sin = inputs(model, B, L)
    # sample 0 forgets token 1 after step 3 and writes token 4 into its slot; sample 1 keeps everything
    mask = torch.ones(B, L, L).tril().bool()
    mask[0, 4:, 1] = False
    with torch.no_grad():
        full = model.trunk(x, cos, sin, mask)
        cache = model.new_cache(B, L)
        outs = []
        for t in range(L):
            slots = None  # tokens 0..3: contiguous
            if t == 4:
                cache.free(torch.tensor([1, -1]))
                slots = torch.tensor([1, cache.used])  # sample 0 reuses the freed slot
            elif t > 4:
                slots = torch.tensor([cache.used, cache.used])
            cache.begin(1, slots)
            outs.append(model.trunk(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache=cache))
            cache.end()
    assert cache.live().tolist() == [L - 1, L]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_bounds_truncate_and_reset() -> None:
    cache = KVCache(1, 1, 1, 3, 4)
    k = torch.randn(1, 1, 2, 4)
    cache.begin(2)
    k_all, _, mask = cache.update(0, k, k)
    cache.end()
    assert k_all.shape == (1, 1, 2, 4) and k_all.data_ptr() == cache.k.data_ptr() and mask is None  # a view
    with pytest.raises(ValueError):
        cache.begin(2)
    with pytest.raises(RuntimeError):
        cache.update(0, k, k)
    cache.truncate(1)
    assert cache.used == 1 and cache.live().tolist() == [1]
    cache.reset()
    assert cache.used == 0 and cache.nbytes() == 2 * 3 * 4 * 4


def test_split_join_ids() -> None:
    model = tiny_model((3, 3))
    ids = torch.arange(64)
    lo, hi = model.split_ids(ids)
    assert torch.equal(lo, ids % 8) and torch.equal(hi, ids // 8)
    assert torch.equal(model.join_ids((lo, hi)), ids)


# ------------------------------------------------------------------ training sanity
@pytest.mark.parametrize("factorized", [(), (3, 3)])
def test_loss_decreases(factorized: tuple[int, ...]) -> None:
    from mergevq_core.generators import build_generator

    torch.manual_seed(0)
    gen = build_generator("llamagen", gpt_tiny(vocab_size=64, max_len=N, factorized=factorized, factor_depth=len(factorized) // 2))
    model = gen.gpt
    ids, labels = torch.randint(0, 64, (4, N)), torch.tensor([0, 1, 2, 10])
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.loss(gen.teacher_logits(ids, labels, torch.full((4,), N)), ids, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_gpt_l_param_count() -> None:
    start = time.perf_counter()
    with torch.device("meta"):
        model = GPT(gpt_l(vocab_size=2**18, max_len=256, factorized=(6, 12), factor_depth=2))
        independent = GPT(gpt_l(vocab_size=2**18, max_len=256, factorized=(6, 12)))
    assert time.perf_counter() - start < 5.0
    # LlamaGen-L blocks + (64 + 4096)-row embeddings and heads + the release's two intra-position blocks: 343.6M
    assert model.num_params() == 343_571_456, model.num_params()
    assert model.num_params() - independent.num_params() == 2 * 12_847_104 + 1024  # two blocks and their norm
