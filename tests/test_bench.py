"""`mergevq benchmark kv-cache`: forced redundancy, measured vs analytic KV memory, the CLI's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mergevq_cli.app import app
from mergevq_core.bench.kvcache import bench_kv_cache, forced_ids
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
        assert r.ms_per_token_p10 <= r.ms_per_token_median <= r.ms_per_token_p90
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


def test_tokenizer_and_ar_benchmarks_report_every_row():
    from mergevq_core.bench.models import bench_ar, bench_tokenizer

    rows, env = bench_tokenizer(recipe="recipes/tiny.yaml", tokens=[16, 64], batch=2, runs=10, warmups=3, device="cpu")
    assert [r["tokens"] for r in rows] == [16, 64] and env["N"] == 64
    assert all(r["encode_img_per_s"] > 0 and r["decode_img_per_s"] > 0 for r in rows)
    assert rows[0]["encode_gmacs"] < rows[1]["encode_gmacs"]  # fewer tokens, fewer MACs
    rows, env = bench_ar("recipes/ar/tiny.yaml", batch=2, runs=10, warmups=3, device="cpu")
    assert [r["generator"] for r in rows] == ["llamagen", "mergear", "randar"] and env["K"] == 36
    assert all(r["train_tokens_per_s"] > 0 and r["sample_tokens_per_s"] > 0 for r in rows)
    assert rows[2]["tokens_per_image"] == 36 and rows[2]["steps"] < 36
