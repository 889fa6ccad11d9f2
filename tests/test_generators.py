"""Stage-2 generators: the MergeAR invariants (reference/ar-generation.md §3.4), RandAR teacher forcing versus
step-by-step decoding, the Eq. 12 mask, caches and sampling."""

from __future__ import annotations

import pytest
import torch

from mergevq_core.errors import ConfigError
from mergevq_core.generators import (
    GENERATORS, SampleNoise, SamplingSettings, analytic_peak_slots, build_generator, default_steps, filter_logits,
    first_occurrence, group_by_id, mergear_mask, plain_peak_slots, randar_schedule, sample_from,
)
from mergevq_core.models.gpt import gpt_tiny

N = 16  # 4 × 4 grid
HEADS = [((), 0), ((3, 3), 0), ((3, 3), 1)]  # plain, independent sub-token heads, intra-position transformer


def make(name: str, factorized=(), factor_depth=0, **opts):
    torch.manual_seed(0)
    g = build_generator(name, gpt_tiny(64, N, factorized, factor_depth), **opts).eval()
    with torch.no_grad():
        for head in g.gpt.heads:  # zero-initialised heads would make every comparison trivial
            head.weight.normal_(std=0.5)
    return g


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def forced(g, targets, record):
    """A pick function that feeds `targets` (B, T) in order and records every logit it is shown."""
    def pick(t, i, logits, decoded=None):
        record[(t, i)] = logits.clone()
        return g.gpt.split_ids(targets[:, t])[i]
    return pick


def grouped_ids(B: int, seed: int = 0) -> torch.Tensor:
    """Raster ids with many duplicates, like an expanded merged grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (B, N), generator=g) * 7  # 5 distinct values, spread over the vocabulary


# ------------------------------------------------------------------ Eq. 12
def test_mask_matches_figure_6():
    # Fig. 6a: 9 tokens, representatives P1 P1 P3 P3 P5 P5 P5 P8 (1-based); the figure's w = 2 previous tokens is
    # w = 3 here (our w counts the query itself).
    groups = torch.tensor([[1, 1, 3, 3, 5, 5, 5, 8, 9, 9]])  # a 10th position so x_1..x_9 are all inputs
    rep = first_occurrence(groups)
    m = mergear_mask(rep, window=3, prefix=2)[0]  # (2 + 9, 2 + 9)
    sees = lambda i: [j + 1 for j in range(9) if m[2 + i - 1, 2 + j]]  # 1-based image positions
    assert sees(5) == [1, 3, 4, 5]
    assert sees(9) == [1, 3, 5, 7, 8, 9]
    assert m[:, :2].sum(1).tolist() == [1] + [2] * 10  # the prefix is always visible (causally)
    assert m.diagonal().all()  # never an empty row


def test_first_occurrence_and_grouping_round_trip():
    full = grouped_ids(3)
    rep = first_occurrence(full)
    brute = torch.tensor([[not (full[b, :j] == full[b, j]).any() for j in range(N)] for b in range(3)])
    assert torch.equal(rep, brute)
    merged, k, assign = group_by_id(full)
    assert torch.equal(k, rep.sum(1))
    assert torch.equal(merged.gather(1, assign), full)
    first_pos = [[int((full[b] == merged[b, i]).nonzero()[0]) for i in range(int(k[b]))] for b in range(3)]
    assert all(p == sorted(p) for p in first_pos)  # canonical order: by first raster position


# ------------------------------------------------------------------ MergeAR
@pytest.mark.parametrize("factorized, factor_depth", HEADS)
def test_mergear_steps_equal_teacher_forcing_under_eq12(factorized, factor_depth):
    g = make("mergear", factorized, factor_depth, window=3)
    full, labels, k = grouped_ids(3), torch.tensor([1, 2, 10]), torch.tensor([4, 9, 16])
    with torch.no_grad():
        tf = as_tuple(g.teacher_logits(full, labels, k, g.train_mask(full)))
    rec = {}
    ids, stats = g.decode(labels, k, forced(g, full, rec), cache="mergear")
    assert torch.equal(ids, full)
    for (t, i), logits in rec.items():
        torch.testing.assert_close(logits, tf[i][:, t], atol=2e-5, rtol=1e-5)
    assert stats["allocated_slots"] < 2 + N - 1  # slots really were freed and reused


def test_mergear_live_kv_bound():
    g = make("mergear", window=3)
    full, labels = grouped_ids(4, seed=3), torch.tensor([0, 1, 2, 3])
    _, stats = g.decode(labels, 9, forced(g, full, {}), cache="mergear")
    live, distinct = stats["live_history"], torch.tensor(stats["distinct_ids"])  # (N, B), (B,)
    assert bool((live <= 2 + 3 + distinct[None]).all())  # prefix + w + distinct ids, at every step
    assert torch.equal(live.max(0).values, analytic_peak_slots(first_occurrence(full), 3, 2))


@pytest.mark.parametrize("guided", [False, True])
def test_mergear_with_full_window_equals_plain_decoding(guided):
    g = make("mergear", (3, 3), 1, window=N)
    labels = torch.tensor([3, 7])
    settings = SamplingSettings(cfg=2.0 if guided else 1.0, top_k=20)
    out = {}
    for cache in ("mergear", "sliced", "static"):
        out[cache], _ = g.decode(labels, 9, settings.picker(N, SampleNoise.arange(5, 2)), guided=guided, cache=cache)
    assert torch.equal(out["mergear"], out["sliced"]) and torch.equal(out["sliced"], out["static"])


def test_same_seed_same_samples_and_generate_outputs():
    g = make("mergear", window=5)
    pick = lambda: SamplingSettings(temperature=1.0).picker(N, SampleNoise.arange(1, 2))
    a = g.sample(torch.tensor([1, 2]), 9, pick())
    b = g.sample(torch.tensor([1, 2]), 9, pick())
    assert torch.equal(a.ids, b.ids) and torch.equal(a.assign, b.assign)
    assert a.assign.shape == (2, N) and bool((a.assign < a.k[:, None]).all())
    assert a.stats["peak_live_slots"] <= 2 + 5 + max(a.stats["distinct_ids"])


# ------------------------------------------------------------------ LlamaGen
@pytest.mark.parametrize("factorized, factor_depth", HEADS)
def test_llamagen_steps_equal_teacher_forcing(factorized, factor_depth):
    g = make("llamagen", factorized, factor_depth)
    full, labels = torch.randint(0, 64, (2, N)), torch.tensor([4, 10])
    with torch.no_grad():
        tf = as_tuple(g.teacher_logits(full, labels, torch.tensor([N, N])))
    for cache in ("sliced", "static"):
        rec = {}
        g.decode(labels, N, forced(g, full, rec), cache=cache)
        for (t, i), logits in rec.items():
            torch.testing.assert_close(logits, tf[i][:, t], atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ RandAR
@pytest.mark.parametrize("factorized, factor_depth", HEADS)
def test_randar_teacher_forcing_equals_step_by_step(factorized, factor_depth):
    g = make("randar", factorized, factor_depth)
    B, K = 2, 9
    ids, k, labels = torch.randint(0, 64, (B, K)), torch.full((B,), K), torch.tensor([3, 10])
    order = g.random_order(k, K, torch.Generator().manual_seed(1))
    with torch.no_grad():
        tf, targets = g.teacher_logits(ids, k, labels, order)
    tf = as_tuple(tf)
    rec = {}
    out, stats = g.decode(labels, K, order, forced(g, ids.gather(1, order), rec))
    assert torch.equal(out, ids) and stats["forward_passes"] == K
    for (t, i), logits in rec.items():
        torch.testing.assert_close(logits, tf[i][:, t], atol=2e-5, rtol=1e-5)


def test_randar_padding_and_parallel_schedule():
    g = make("randar")
    ids = torch.randint(0, 64, (2, 9))
    ids[1, 4:] = -1
    k = torch.tensor([9, 4])
    order = g.random_order(k, 9, torch.Generator().manual_seed(2))
    assert sorted(order[1, :4].tolist()) == [0, 1, 2, 3] and order[1, 4:].tolist() == [4, 5, 6, 7, 8]
    _, targets = g.teacher_logits(ids, k, torch.tensor([0, 1]), order)
    assert (targets[1, 4:] == -100).all() and (targets[0] >= 0).all()
    # the first sample's logits do not depend on the second sample's padding
    ids2 = ids.clone()
    ids2[1, :4] = torch.randint(0, 64, (4,))
    with torch.no_grad():
        a, _ = g.teacher_logits(ids, k, torch.tensor([0, 1]), order)
        b, _ = g.teacher_logits(ids2, k, torch.tensor([0, 1]), order)
    torch.testing.assert_close(a[0], b[0])
    noise = SampleNoise.arange(0, 3)
    res = g.sample(torch.tensor([1, 2, 3]), 16, SamplingSettings().picker(16, noise), steps=6, noise=noise)
    assert res.ids.shape == (3, 16) and res.assign is None and res.stats["forward_passes"] == 6
    assert sum(res.stats["schedule"]) == 16


def test_randar_schedule():
    counts = randar_schedule(256, 88)
    assert len(counts) == 88 and sum(counts) == 256 and min(counts) >= 1
    assert counts[:24] == [1] * 24 and counts[24] == 2  # RandAR's cosine schedule starts one token at a time
    assert sum(randar_schedule(144, 64)) == 144 and randar_schedule(5, 10) == [1] * 5


# ------------------------------------------------------------------ sampling
def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits)).any()
    assert sample_from(logits, temperature=0).tolist() == [0]


def test_cfg_scale_one_is_conditional_and_schedule():
    from mergevq_core.generators import cfg_scale_at, guide

    cond, uncond = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 1.0), cond)
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 0.0), uncond)
    # RandAR's 1 + (s - 1)·decoded/N: unguided before the first token, 1 + 3·9/10 = 3.7 before the last of 10
    assert cfg_scale_at(4.0, "linear", 0, 10) == 1.0 and cfg_scale_at(4.0, "linear", 9, 10) == pytest.approx(3.7)
    assert cfg_scale_at(4.0, "constant", 0, 10) == 4.0
    with pytest.raises(ValueError):
        SamplingSettings(cfg_schedule="cosine")


def test_fast_forward_reaches_the_step_by_step_cache_state():
    from mergevq_core.generators.raster import RasterDecoder

    full, labels = grouped_ids(3, seed=4), torch.tensor([1, 2, 3])
    for name, cache in (("llamagen", "sliced"), ("mergear", "mergear")):
        g = make(name, window=3) if name == "mergear" else make(name)
        ref_rec, ff_rec = {}, {}
        _, ref = g.decode(labels, 9, forced(g, full, ref_rec), cache=cache)
        dec = RasterDecoder(g, labels, 9, cache=cache)
        dec.prefill(forced(g, full, ff_rec))
        dec.fast_forward(full[:, :10], forced(g, full, ff_rec))
        for t in range(10, N - 1):
            dec.step(t, forced(g, full, ff_rec))
        assert torch.equal(dec.ids, full)
        st = dec.stats()
        # the same live slots at every step after the jump, and the same peak
        torch.testing.assert_close(st["live_history"][2:], ref["live_history"][11:], rtol=0, atol=0)  # steps T..N-2
        if cache == "sliced":  # the plain cache holds exactly the teacher-forced keys: identical logits
            for t in range(10, N):
                torch.testing.assert_close(ff_rec[(t, 0)], ref_rec[(t, 0)], atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ the one interface
@pytest.mark.parametrize("name", list(GENERATORS))
def test_sample_through_the_interface(name):
    """Every generator samples through the same call; what the pipeline derives from it matches the samples."""
    g = make(name, window=3) if name == "mergear" else make(name)
    k = g.check_k(9)
    steps = g.check_steps(None, k)
    labels = torch.tensor([1, 2, 3])
    per_batch = []
    for seed in (0, 1):
        noise = SampleNoise.arange(seed, 3)
        pick = SamplingSettings(top_k=20).picker(g.seq_len(k), noise)
        res = g.sample(labels, k, pick, steps=steps, noise=noise)
        per_batch.append(res.stats)
        assert (res.assign is None) == g.needs_source_recovery
        if res.assign is not None:  # raster: the source re-expands the merged ids to N raster ids, K of them distinct
            full = res.ids.gather(1, res.assign)
            assert res.assign.shape == (3, N) and torch.equal(res.k, (res.ids >= 0).sum(1))
            assert torch.equal(first_occurrence(full).sum(1), res.k)
            assert res.stats["distinct_ids"] == res.k.tolist()
        else:
            assert res.ids.shape == (3, k) and res.k.tolist() == [k] * 3
    summary = g.summarize_stats(per_batch)
    expected_passes = {"llamagen": N, "mergear": N, "randar": default_steps(9)}[name]
    assert summary["forward_passes_per_batch"] == expected_passes
    if name == "mergear":
        distinct = [d for s in per_batch for d in s["distinct_ids"]]
        assert summary["peak_cache_slots"] == max(s["live_history"].max().item() for s in per_batch)
        assert summary["plain_cache_slots"] == plain_peak_slots(N, 2) == 2 + N - 1
        assert (summary["distinct_ids_min"], summary["distinct_ids_max"]) == (min(distinct), max(distinct))
        assert summary["distinct_ids"] == pytest.approx(sum(distinct) / 6) and summary["window"] == 3
    else:
        assert set(summary) == {"forward_passes_per_batch"}


def test_interface_answers_what_callers_used_to_ask_by_name():
    llama, merge, rand = make("llamagen"), make("mergear"), make("randar")
    assert [g.seq_len(9) for g in (llama, merge, rand)] == [N, N, 9]
    assert [g.train_sequence_len for g in (llama, merge, rand)] == [N, N + 1, 2 * N]
    # the sequence each one really trains on
    batch = {"ids": torch.randint(0, 64, (2, 4)), "k": torch.tensor([4, 3]), "label": torch.tensor([0, 1]),
             "assign": torch.tensor([[0, 0, 1, 1] * 2 + [2, 2, 3, 3] * 2, [0, 0, 1, 1] * 2 + [2, 2, 2, 2] * 2])}
    batch["ids"][1, 3] = -1
    assert [g.targets_count(batch) for g in (llama, merge, rand)] == [2 * N, 2 * N, 7]
    for g in (llama, merge):
        _, targets = g.training_logits(batch)
        assert targets.numel() == g.targets_count(batch)
    _, targets = rand.training_logits(batch, torch.Generator().manual_seed(0))
    assert int((targets != -100).sum()) == rand.targets_count(batch)
    # K: mergear and randar are told K (a square up to N), llamagen only reports it
    assert merge.check_k(None) == rand.check_k(None) == llama.check_k(None) == N
    assert llama.check_k(10) == 10 and llama.reference_k(10, 4) == 4 and merge.reference_k(9, 4) == 9
    for g in (merge, rand):
        for bad in (0, 10, 25):
            with pytest.raises(ConfigError, match=f"^--tokens {bad}: K must be a perfect square up to N={N}$"):
                g.check_k(bad)
    # steps: randar's default and range; the raster generators ignore them
    assert rand.check_steps(None, 9) == default_steps(9) and rand.check_steps(9, 9) == 9
    with pytest.raises(ConfigError, match=r"^--steps 10: randar decodes K=9 tokens in 1\.\.9 steps$"):
        rand.check_steps(10, 9)
    assert llama.check_steps(None, 9) is None and merge.check_steps(50, 9) == 50
    assert [g.needs_source_recovery for g in (llama, merge, rand)] == [False, False, True]
