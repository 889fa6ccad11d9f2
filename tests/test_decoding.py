"""Raster decoding as the device runs it: no host reads in the decode loop, one static-shape step that
`torch.compile(fullgraph=True)` takes whole and that gives the eager ids, and MergeAR's capacity redo."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mergevq_core.generators import SampleNoise, SamplingSettings, first_occurrence
from mergevq_core.generators.raster import RasterDecoder

from .test_generators import N, as_tuple, forced, grouped_ids, make


@contextlib.contextmanager
def no_host_reads():
    """Any tensor read on the host (.item(), .tolist(), bool(), int(), float()) inside the block fails."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"the decode loop read a tensor on the host: Tensor.{name}")
        return f

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_the_guard_catches_a_host_read():
    with pytest.raises(AssertionError, match="tolist"), no_host_reads():
        torch.zeros(2).tolist()
    assert torch.zeros(2).tolist() == [0.0, 0.0]  # restored


@pytest.mark.parametrize("name, cache", [("mergear", "mergear"), ("llamagen", "sliced")])
@pytest.mark.parametrize("guided", [False, True])
def test_decode_loop_never_reads_the_device(name, cache, guided):
    g = make(name, (3, 3), 1, window=3) if name == "mergear" else make(name)
    labels = torch.tensor([1, 2, 3])
    pick = SamplingSettings(cfg=2.0 if guided else 1.0, top_k=20).picker(N, SampleNoise.arange(3, 3))
    ref, _ = g.decode(labels, 9, pick, guided=guided, cache=cache)
    dec = RasterDecoder(g, labels, 9, guided, cache)
    with torch.no_grad():
        dec.prefill(pick)
        with no_host_reads():
            for t in range(N - 1):
                dec.step(t, pick)
    assert torch.equal(dec.ids, ref) and not dec.overflowed


def test_mergear_capacity_overflow_is_flagged_and_decoded_again():
    g = make("mergear", window=1)
    full = torch.arange(2 * N).view(2, N) * 3 % 64  # every position a new id: N distinct per image
    labels = torch.tensor([1, 2])
    small = RasterDecoder(g, labels, 1, cache="mergear", capacity=6)
    with torch.no_grad():
        small.prefill(forced(g, full, {}))
        for t in range(N - 1):
            small.step(t, forced(g, full, {}))
    assert small.overflowed  # 2 + 16 slots were needed
    # decode() sizes the cache for K = 1 (too small here), notices and decodes again with a full-length cache
    rec = {}
    ids, stats = g.decode(labels, 1, forced(g, full, rec), cache="mergear")
    with torch.no_grad():
        tf = as_tuple(g.teacher_logits(full, labels, torch.tensor([1, 1]), g.train_mask(full)))
    assert torch.equal(ids, full) and stats["peak_live_slots"] == 2 + N - 1
    for (t, i), logits in rec.items():
        torch.testing.assert_close(logits, tf[i][:, t], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name, cache", [("mergear", "mergear"), ("llamagen", "sliced")])
def test_compiled_step_is_one_graph_and_gives_the_eager_ids(name, cache):
    """fullgraph=True fails on any graph break (a host read among them); a second batch reuses the graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = make(name, window=3) if name == "mergear" else make(name)
    settings = SamplingSettings(cfg=2.0, top_k=20)
    for seed, labels in ((5, torch.tensor([1, 2, 3])), (6, torch.tensor([4, 5, 6]))):
        noise = lambda: SampleNoise.arange(seed, 3)
        eager, st_e = g.decode(labels, 9, settings.picker(N, noise()), guided=True, cache=cache)
        dec = RasterDecoder(g, labels, 9, True, cache, compiled=True, compile_options={"backend": "eager"})
        pick = settings.picker(N, noise())
        with torch.no_grad():
            dec.prefill(pick)
            for t in range(N - 1):
                dec.step(t, pick)
        assert torch.equal(dec.ids, eager)
        if cache == "mergear":  # the same Position Cache: the same live slots at every step
            assert torch.equal(dec.stats()["live_history"], st_e["live_history"])
            assert torch.equal(dec.pos.rep, first_occurrence(eager))
    assert counters["stats"]["unique_graphs"] == 1
