"""`mergevq benchmark kv-cache`: forced redundancy, measured vs analytic KV memory, the CLI's outputs."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from typer.testing import CliRunner

from mergevq_cli.app import app
from mergevq_core.bench.kvcache import bench_kv_cache, forced_ids
from mergevq_core.bench.timing import quantiles
from mergevq_core.generators import first_occurrence


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.44, 0.75, 0.9])
def test_forced_redundancy_gives_the_share_asked_for(rho):
    ids = forced_ids(3, 256, rho, 4096, torch.Generator().manual_seed(0))
    dup_share = 1 - first_occurrence(ids).float().mean(1)
    assert torch.allclose(dup_share, torch.full((3,), round(rho * 256) / 256))
    # repeats copy a raster-previous or upper neighbour, so groups are spatially compact
    rep = first_occurrence(ids)
    for b in range(3):
        for t in (~rep[b]).nonzero()[:, 0].tolist():
            assert ids[b, t] in (ids[b, t - 1], ids[b, t - 16] if t >= 16 else -1)


def test_measured_kv_bytes_equal_the_analytic_count():
    rows, env = bench_kv_cache([64], [1, 3], [0.0, 0.5, 0.75], runs=10, warmups=3, segment=4)
    assert {r.cache for r in rows} == {"static", "sliced", "mergear"} and len(rows) == 2 * 5
    for r in rows:
        assert r.kv_bytes_measured == r.kv_bytes_peak, r
        # the reported figures are those of the timed runs, and the runs are real timings
        timed_runs = r.ms_per_token_runs
        assert len(timed_runs) == 10 and min(timed_runs) > 0 and len(set(timed_runs)) > 1
        assert min(timed_runs) <= r.ms_per_token_median <= max(timed_runs)
        assert r.ms_per_token_median == pytest.approx(statistics.median(timed_runs), rel=1e-12)
        q = quantiles(timed_runs)
        assert (r.ms_per_token_p10, r.ms_per_token_p90) == pytest.approx((q["p10"], q["p90"]), rel=1e-12)
        assert r.tokens_per_s == pytest.approx(r.batch / (r.ms_per_token_median / 1e3), rel=1e-9)
    heavy = [r for r in rows if r.cache == "mergear" and r.redundancy == 0.75]
    assert all(r.peak_slots <= 2 + r.window + 16 for r in heavy)  # prefix + w + K (K = 16 of 64)
    assert all(r.memory_saving_vs_sliced > 2 for r in heavy)
    none = [r for r in rows if r.cache == "mergear" and r.redundancy == 0.0]
    assert all(r.memory_saving_vs_sliced == 1.0 for r in none)  # nothing to evict
    assert env["device"] == "cpu"


def test_cli_json_table_and_plot(tmp_path):
    res = CliRunner().invoke(app, ["benchmark", "kv-cache", "--n", "16", "--batch", "2", "--redundancy", "0.5",
                                   "--segment", "0", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    for key in ("cache", "n", "batch", "redundancy", "kv_bytes_peak", "ms_per_token_median", "tokens_per_s"):
        assert all(key in r for r in rows)
    assert [r["cache"] for r in rows] == ["static", "sliced", "mergear"]
    assert (tmp_path / "kv_cache.png").is_file() and (tmp_path / "kv_cache.json").is_file()
    bad = CliRunner().invoke(app, ["benchmark", "kv-cache", "--n", "15"])
    assert bad.exit_code != 0


def fake_timer(monkeypatch, module):
    """Replace `timed` in a benchmark module: fn still runs, and the n-th call takes a known, distinct time."""
    calls: list[float] = []

    def timed(fn, device):
        fn()
        calls.append(0.001 * (1 + (len(calls) * 7) % 11))  # 1..11 ms, not monotone: medians differ per group
        return calls[-1]

    monkeypatch.setattr(module, "timed", timed)
    return calls


def test_tokenizer_and_ar_benchmarks_report_every_row(monkeypatch):
    from mergevq_core.bench import models
    from mergevq_core.bench.models import bench_ar, bench_tokenizer

    calls = fake_timer(monkeypatch, models)
    rows, env = bench_tokenizer(recipe="recipes/tiny.yaml", tokens=[16, 64], batch=2, runs=10, warmups=3, device="cpu")
    assert [r["tokens"] for r in rows] == [16, 64] and env["N"] == 64 and len(calls) == 2 * 2 * 10
    for i, r in enumerate(rows):  # per K: 10 timed encodes, then 10 timed decodes
        enc, dec = calls[20 * i: 20 * i + 10], calls[20 * i + 10: 20 * i + 20]
        assert r["encode_img_per_s"] == pytest.approx(2 / statistics.median(enc))
        assert r["decode_img_per_s"] == pytest.approx(2 / statistics.median(dec))
        assert r["encode_ms_p10_p90"] == pytest.approx([quantiles(enc)["p10"] * 1e3, quantiles(enc)["p90"] * 1e3])
    assert rows[0]["encode_gmacs"] < rows[1]["encode_gmacs"]  # fewer tokens, fewer MACs
    calls.clear()
    rows, env = bench_ar("recipes/ar/tiny.yaml", batch=2, runs=10, warmups=3, device="cpu")
    assert [r["generator"] for r in rows] == ["llamagen", "mergear", "randar"] and env["K"] == 36
    assert len(calls) == 3 * (10 + 3)  # per generator: 10 training steps, then 3 sampling calls
    for i, r in enumerate(rows):
        train, sample = calls[13 * i: 13 * i + 10], calls[13 * i + 10: 13 * i + 13]
        seq = r["tokens_per_image"]
        assert r["train_tokens_per_s"] == pytest.approx(2 * seq / statistics.median(train))
        assert r["sample_tokens_per_s"] == pytest.approx(2 * seq / statistics.median(sample))
        assert r["sample_images_per_s"] == pytest.approx(2 / statistics.median(sample))
    assert [r["tokens_per_image"] for r in rows] == [env["N"], env["N"], 36]
    assert [r["steps"] for r in rows] == [env["N"], env["N"], 15]  # raster: one pass per token; randar: 0.34·36 + 3


def test_lfq_entropy_benchmark_reports_its_runs(tmp_path):
    import statistics

    res = CliRunner().invoke(app, ["benchmark", "lfq", "--dim", "8", "--tokens", "16", "--chunk", "4,64", "--runs", "3",
                                   "--budget", "1e-9", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["chunk"] for r in rows] == [4, 64] and all(r["codes"] == 256 for r in rows)
    for r in rows:
        assert len(r["runs_s"]) == 3 and r["median_s"] == statistics.median(r["runs_s"])
        assert r["within_budget"] is False  # no real run takes a nanosecond
    assert json.loads((tmp_path / "lfq.json").read_text())["rows"] == rows
    bad = CliRunner().invoke(app, ["benchmark", "lfq", "--chunk", "0"])
    assert bad.exit_code != 0
