import math

import pytest
import torch
import torch.nn.functional as F

from mergevq_core.tome import (
    KeepSampler,
    bipartite_match,
    canonical_assign,
    canonical_order,
    initial_assign,
    is_perfect_square,
    keep_candidates,
    layer_cap,
    max_merges,
    merge,
    merge_schedule,
    merge_wavg,
    proportional_attention_bias,
    source_matrix,
    track_assign,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run_layers(b: int, n: int, c: int, schedule: list[int], seed: int = 0):
    """Merge loop with random features; yields (plan, x, size, assign) per layer."""
    g = _gen(seed)
    x = torch.randn(b, n + 1, c, generator=g)
    size = None
    assign = initial_assign(b, n)
    for r in schedule:
        metric = x + 0.1 * torch.randn(x.shape, generator=g)
        plan = bipartite_match(metric, r)
        x, size = merge_wavg(plan, x, size)
        assign = track_assign(plan, assign)
        yield plan, x, size, assign


# ---------------------------------------------------------------- matching


def test_sizes_partition_and_cls_protected():
    b, n, c = 3, 64, 16
    schedule = merge_schedule(n, 16, 4)
    t = n + 1
    for plan, x, size, assign in _run_layers(b, n, c, schedule):
        t -= plan.r
        assert x.shape == (b, t, c) and size.shape == (b, t, 1)
        torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((b,), float(n + 1)))
        assert torch.all(size[:, 0] == 1.0)
        assert torch.all(plan.new_index[:, 0] == 0)
        assert torch.all(assign >= 1) and torch.all(assign < t)
        s = source_matrix(assign, t)  # (B, T, N)
        torch.testing.assert_close(s.sum(dim=1), torch.ones(b, n))
        torch.testing.assert_close(s.sum(dim=2)[:, 1:], size[:, 1:, 0])
    assert t == 16 + 1


def test_track_assign_matches_source_propagation():
    b, n, c = 2, 16, 8
    s = torch.eye(n + 1).expand(b, n + 1, n + 1).clone()  # (B, T, T_orig)
    for plan, _, _, assign in _run_layers(b, n, c, [5, 3, 2], seed=1):
        s = merge(plan, s, "amax")
        assert torch.equal(s[:, :, 1:].argmax(dim=1), assign)
        assert torch.all(s.sum(dim=1) == 1)


def test_new_index_order():
    g = _gen(2)
    metric = torch.randn(2, 11, 4, generator=g)
    plan = bipartite_match(metric, 3)
    n_unm = 6 - 3
    # B tokens (odd positions) keep their order after the unmerged A tokens.
    assert torch.equal(plan.new_index[:, 1::2], n_unm + torch.arange(5).expand(2, 5))
    a_new = plan.new_index[:, ::2]
    for row in a_new:
        kept = row[row < n_unm]
        assert torch.equal(kept, torch.arange(n_unm))
        assert int((row >= n_unm).sum()) == 3


def test_merge_wavg_matches_bruteforce_and_grads():
    g = _gen(3)
    b, t, c = 2, 9, 5
    x = torch.randn(b, t, c, generator=g, requires_grad=True)
    size = torch.randint(1, 4, (b, t, 1), generator=g).float()
    plan = bipartite_match(torch.randn(b, t, c, generator=g), 3)
    out, new_size = merge_wavg(plan, x, size)
    for bi in range(b):
        for k in range(plan.t_out):
            members = [i for i in range(t) if int(plan.new_index[bi, i]) == k]
            w = sum(float(size[bi, i, 0]) for i in members)
            ref = sum(x[bi, i] * float(size[bi, i, 0]) for i in members) / w
            torch.testing.assert_close(out[bi, k], ref)
            assert float(new_size[bi, k, 0]) == w
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_merge_differentiable(reduce):
    x = torch.randn(2, 7, 3, requires_grad=True)
    plan = bipartite_match(x.detach(), 2)
    merge(plan, x, reduce).pow(2).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_identity_and_cap():
    x = torch.randn(2, 9, 4)
    plan = bipartite_match(x, 0)
    assert plan.r == 0 and plan.t_out == 9
    assert torch.equal(merge(plan, x), x)
    capped = bipartite_match(x, 100)
    assert capped.r == (9 - 1) // 2 == max_merges(9)
    assert torch.all(capped.new_index[:, 0] == 0)
    free = bipartite_match(x, 100, protect_cls=False)
    assert free.r == max_merges(9, protect_cls=False) == 5
    assert bipartite_match(torch.randn(1, 1, 4), 3).r == 0
    with pytest.raises(ValueError):
        bipartite_match(x, -1)


def test_canonical_order_invariants():
    b, n, keep = 4, 64, 16
    *_, (plan, x, size, assign) = _run_layers(b, n, 8, merge_schedule(n, keep, 6), seed=4)
    perm, canon = canonical_order(assign, keep)
    assert perm.shape == (b, keep) and canon.shape == (b, n)
    for bi in range(b):
        assert sorted(perm[bi].tolist()) == list(range(keep))
        assert sorted(set(canon[bi].tolist())) == list(range(keep))
        assert int(canon[bi, 0]) == 0
        first = [canon[bi].tolist().index(k) for k in range(keep)]
        assert first == sorted(first)
        # slot k holds current token perm[k] (offset 1 for cls)
        assert torch.equal(perm[bi][canon[bi]] + 1, assign[bi])


def test_proportional_attention_bias():
    assert proportional_attention_bias(None) is None
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = proportional_attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.log(torch.tensor([1.0, 2.0, 4.0])))


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "n, keep, expected",
    [
        (1024, 256, [101, 90, 84, 78, 72, 66, 61, 55, 49, 43, 37, 32]),
        (256, 144, [12, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 5]),
        (256, 64, [29, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]),
        (256, 36, [25, 26, 24, 23, 21, 19, 18, 16, 14, 13, 11, 10]),
    ],
)
def test_linear_schedule_exact(n, keep, expected):
    assert merge_schedule(n, keep, 12) == expected


@pytest.mark.parametrize("kind", ["linear", "square"])
@pytest.mark.parametrize("n", [16, 64, 100, 256, 1024])
@pytest.mark.parametrize("depth", [1, 2, 4, 8, 12])
def test_schedule_sum_and_caps(kind, n, depth):
    for keep in sorted({n, n - 1, n // 2, n // 3, n // 4, 36, 16, 4, 2, 1}):
        if not 1 <= keep <= n:
            continue
        try:
            sched = merge_schedule(n, keep, depth, kind)
        except ValueError:
            # only allowed when even greedy max merging can't reach keep
            t = n
            for _ in range(depth):
                t -= layer_cap(t)
            assert t > keep
            continue
        assert len(sched) == depth and sum(sched) == n - keep
        t = n
        for r in sched:
            assert 0 <= r <= layer_cap(t)
            t -= r
        assert t == keep


def test_schedule_edge_cases():
    assert merge_schedule(256, 256, 12) == [0] * 12
    assert merge_schedule(256, 256, 12, "square") == [0] * 12
    assert merge_schedule(256, 1, 8) == [128, 64, 32, 16, 8, 4, 2, 1]
    with pytest.raises(ValueError):
        merge_schedule(256, 1, 7)
    with pytest.raises(ValueError):
        merge_schedule(256, 300, 12)
    with pytest.raises(ValueError):
        merge_schedule(256, 64, 12, "cubic")


def test_square_schedule_decreasing():
    sched = merge_schedule(1024, 256, 12, "square")
    assert sum(sched) == 768
    assert all(a >= b for a, b in zip(sched, sched[1:]))


# ---------------------------------------------------------------- keep sampler


def test_keep_candidates_gaussian():
    cands, probs = keep_candidates(144, 256, "gaussian", 6)
    assert cands == [121, 144, 169, 196, 225, 256]
    assert [round(p, 3) for p in probs] == [0.118, 0.668, 0.118, 0.032, 0.032, 0.032]
    assert math.isclose(sum(probs), 1.0)


def test_keep_candidates_exponential_and_fixed():
    cands, probs = keep_candidates(144, 1024, "exponential", 4)
    assert cands == [144, 169, 196, 225]
    w = [2 * math.exp(-2 * i) + 0.1 for i in range(4)]
    assert probs == pytest.approx([v / sum(w) for v in w])
    cands, probs = keep_candidates(144, 196, "exponential", 6)
    assert cands == [144, 169, 196] and math.isclose(sum(probs), 1.0)
    assert keep_candidates(64, 256, "fixed", 6) == ([64], [1.0])
    assert keep_candidates(1, 256, "gaussian", 3)[0] == [1, 4]  # 0 dropped
    with pytest.raises(ValueError):
        keep_candidates(150, 256, "gaussian", 6)
    with pytest.raises(ValueError):
        keep_candidates(144, 256, "uniform", 6)
    assert is_perfect_square(256) and not is_perfect_square(255) and not is_perfect_square(-4)


def test_keep_sampler_reproducible():
    sampler = KeepSampler(144, 256)
    assert sampler.candidates == [121, 144, 169, 196, 225, 256]

    def draw(seed: int) -> list[int]:
        g = _gen(seed)
        return [sampler.sample(g) for _ in range(64)]

    a, b, other = draw(0), draw(0), draw(1)
    assert a == b and a != other
    assert set(a) <= set(sampler.candidates)
    assert sampler.schedule_for(a[0], 12) == merge_schedule(256, a[0], 12)


def test_keep_candidates_respect_the_reachable_minimum():
    from mergevq_core.tome import KeepSampler

    ks, ps = keep_candidates(16, 64, "gaussian", 4, min_keep=16)
    assert ks == [16, 25, 36] and abs(sum(ps) - 1) < 1e-9
    gen = torch.Generator().manual_seed(0)
    assert min(KeepSampler(16, 64, "gaussian", 4, min_keep=16).sample(gen) for _ in range(200)) == 16


def _is_canonical(assign, k):
    """Slot 0 at n = 0, slots first appear in increasing order, all K used."""
    for row in assign.tolist():
        seen = -1
        for a in row:
            if a > seen + 1:
                return False
            seen = max(seen, a)
        if seen != k - 1:
            return False
    return True


def test_canonical_assign_is_the_exact_constrained_maximum():
    import itertools

    g = torch.Generator().manual_seed(0)
    n, k = 6, 3
    scores = torch.randn(40, n, k, generator=g).log_softmax(-1)
    got = canonical_assign(scores)
    assert _is_canonical(got, k)
    valid = [c for c in itertools.product(range(k), repeat=n) if _is_canonical(torch.tensor([c]), k)]
    table = torch.tensor(valid)  # (V, N)
    for b in range(scores.shape[0]):
        totals = scores[b].gather(1, table.T).sum(0)  # (V,)
        best = float(totals.max())
        mine = float(scores[b].gather(1, got[b][:, None]).sum())
        assert mine == pytest.approx(best, abs=1e-5)


def test_canonical_assign_keeps_a_valid_argmax_and_fixes_an_invalid_one():
    n, k = 64, 36
    true = torch.randint(0, k, (3, n), generator=torch.Generator().manual_seed(1))
    true[:, :k] = torch.arange(k)  # every slot opened in order, then any slot: a canonical assign
    scores = F.one_hot(true, k).float() * 5.0
    assert torch.equal(canonical_assign(scores.log_softmax(-1)), true)  # the argmax is canonical: kept
    noisy = scores + torch.randn(scores.shape, generator=torch.Generator().manual_seed(2)) * 3.0
    assert not _is_canonical(noisy.argmax(-1), k)
    assert _is_canonical(canonical_assign(noisy.log_softmax(-1)), k)
    # K = N leaves one choice: the identity
    assert torch.equal(canonical_assign(torch.randn(2, 9, 9)), torch.arange(9).expand(2, 9))
    with pytest.raises(ValueError, match="cannot all be used"):
        canonical_assign(torch.randn(1, 4, 5))
