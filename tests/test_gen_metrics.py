"""Streamed gFID / IS / precision-recall (`mergevq evaluate`): equal to the in-memory way and to torch-fidelity,
readers that never hold all images, statistics files (ours and ADM's reference batch), and torchrun's split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from mergevq_core.dist import DistInfo
from mergevq_core.errors import ConfigError, DataError
from mergevq_core.eval.gen_metrics import (
    evaluate_samples, gfid, inception_features, inception_score, load_reference, precision_recall_of,
    reference_stats, stats_of,
)
from mergevq_core.eval.image_sources import NpzImages, TensorImages, open_images_source
from mergevq_core.eval.streaming import feature_stats, merge_stats, part_range

from .conftest import ROOT

CPU = torch.device("cpu")
N = 4  # samples and reference images (k + 1 for precision / recall): Inception on CPU costs ~0.4 s an image
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Inception on 2 threads of a shared 2-core machine runs several times slower than on 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_reference("shapes", 32, N, seed=1)  # uint8 (N, 3, 32, 32), standing in for generated samples


@pytest.fixture(scope="module")
def samples_npz(images, tmp_path_factory):
    """The layout `generate` writes today: `images` (N, H, W, 3) and `labels`."""
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, images=nhwc(images), labels=np.arange(N))
    return path


@pytest.fixture(scope="module")
def ref_npz(tmp_path_factory):
    return tmp_path_factory.mktemp("ref") / "ref.npz"


@pytest.fixture(scope="module")
def evaluated(samples_npz, ref_npz, inception_stand_in):
    """Samples against N `shapes` images, whose statistics are saved on the way (--save-stats)."""
    res = evaluate_samples(samples_npz, "shapes", weights=inception_stand_in, device="cpu", save_stats=ref_npz)
    assert res.saved_stats == str(ref_npz)
    return res


# ----------------------------------------------------------------------------- readers


def test_npz_reader_yields_bounded_chunks(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (2000, 16, 16, 3), dtype=np.uint8)  # 1.5 MB
    np.savez(tmp_path / "adm.npz", arr_0=x, labels=np.zeros(2000, dtype=np.int64))
    src = NpzImages(tmp_path / "adm.npz")
    assert (src.count, src.size, src.key, src.stored) == (2000, 16, "arr_0", True)
    tracemalloc.start()
    sizes, rows = [], []
    for chunk in src.batches(0, 2000, 64):
        sizes.append(chunk.shape[0])
        rows.append(chunk[:, :, 0, 0].clone())  # keep a corner pixel per image, not the images
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert max(sizes) == 64 and sum(sizes) == 2000 and peak < 300_000  # one chunk is 48 KB, all images 1.5 MB
    assert torch.equal(torch.cat(rows), torch.from_numpy(x[:, 0, 0, :]))
    # a rank's share, from the middle of the file; a compressed member and the legacy key read the same rows
    part = torch.cat(list(src.batches(700, 1301, 64)))
    assert torch.equal(part, torch.from_numpy(x[700:1301]).permute(0, 3, 1, 2))
    np.savez_compressed(tmp_path / "z.npz", images=x)
    z = NpzImages(tmp_path / "z.npz")
    assert z.key == "images" and not z.stored and torch.equal(torch.cat(list(z.batches(700, 1301, 100))), part)


def test_folder_and_shapes_sources(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for i, sub in enumerate(["", "a", "a/b", "c", "c"]):
        (tmp_path / "imgs" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / sub / f"{i}.png")
    folder = open_images_source(tmp_path / "imgs")  # recursive; side: the first image's shorter one
    assert (folder.count, folder.size) == (5, 40)
    chunks = list(open_images_source(tmp_path / "imgs", size=32).batches(0, 5, 2))
    assert [c.shape for c in chunks] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)] and chunks[0].dtype == torch.uint8
    shapes = open_images_source("shapes", size=32, count=5, seed=3)
    assert torch.equal(torch.cat(list(shapes.batches(0, 5, 2))), load_reference("shapes", 32, 5, seed=3))


def test_bad_samples_files_name_the_file(tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"f\.npz: 'arr_0' must be C-order uint8"):
        NpzImages(tmp_path / "f.npz")
    np.savez(tmp_path / "none.npz", mu=np.zeros(3))
    with pytest.raises(DataError, match=r"none\.npz holds no images"):
        open_images_source(tmp_path / "none.npz")
    with pytest.raises(DataError, match="samples file not found"):
        open_images_source(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"cannot read .*junk\.npz"):
        NpzImages(tmp_path / "junk.npz")
    with pytest.raises(ConfigError, match="--size"):
        evaluate_samples(None, "shapes", save_stats=tmp_path / "r.npz", device="cpu")


def test_part_range_splits_every_row_once():
    for count in (0, 1, 7, 50_000):
        for world in (1, 2, 3, 8):
            parts = [part_range(count, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


# ----------------------------------------------------------------------------- metrics


def test_streamed_metrics_equal_the_in_memory_way(evaluated, images, inception_stand_in):
    old = gfid(images, "shapes", inception_stand_in, CPU, 0)
    assert evaluated.fid == pytest.approx(old["fid"], abs=1e-3)
    assert (evaluated.samples, evaluated.reference_images) == (N, old["reference_images"])
    assert evaluated.inception_score == pytest.approx(inception_score(images, inception_stand_in, CPU))
    assert 0 <= evaluated.precision <= 1 and 0 <= evaluated.recall <= 1 and evaluated.notes == []
    assert set(evaluated.to_json()) >= {"fid", "inception_score", "precision", "recall", "samples", "reference",
                                        "reference_images", "weights", "wall_s"}


def test_two_part_split_reduces_to_one_pass(images, inception_stand_in):
    images = images[:3]
    src = TensorImages(images)
    parts = [feature_stats(src, inception_stand_in, CPU, logits=True, dist=DistInfo(r, 2, r, CPU)) for r in (0, 1)]
    assert [p.count for p in parts] == [1, 2]
    merged = merge_stats(parts)
    whole = inception_features(images, inception_stand_in, CPU, features=("2048", "logits_unbiased"))
    assert merged.count == 3
    torch.testing.assert_close(merged.features, whole["2048"].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.logits, whole["logits_unbiased"].float(), rtol=1e-4, atol=1e-5)
    ref = stats_of(whole["2048"])
    np.testing.assert_allclose(merged.mu, ref["mu"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(merged.sigma, ref["sigma"], rtol=1e-4, atol=1e-7)


def _naive_prc(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 by definition: a point's ball reaches its k-th nearest other point."""
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    r_fake, r_real = np.sort(d(fake, fake), 1)[:, k], np.sort(d(real, real), 1)[:, k]
    return float((d(fake, real) <= r_real[None]).any(1).mean()), float((d(real, fake) <= r_fake[None]).any(1).mean())


@pytest.mark.parametrize("m, r, k", [(40, 30, 3), (17, 50, 3), (25, 25, 5)])
def test_precision_recall_equal_torch_fidelity_on_features(m, r, k):
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(m)
    fake, real = torch.randn(m, 8, generator=g, dtype=torch.float64) + 0.7, torch.randn(r, 8, generator=g, dtype=torch.float64)
    p, rec = precision_recall_of(fake, real, k, batch=7)  # distance blocks smaller than the sets
    assert 0 <= p <= 1 and 0 <= rec <= 1 and 0 < p + rec < 2
    for save_ram in (True, False):
        tf = prc_features_to_metric(fake, real, prc_neighborhood=k, prc_batch_size=10_000, save_cpu_ram=save_ram,
                                    verbose=False)
        assert (p, rec) == (tf["precision"], tf["recall"])
    assert (p, rec) == pytest.approx(_naive_prc(fake.numpy(), real.numpy(), k))


def test_precision_recall_equal_torch_fidelity_on_images(evaluated, images, inception_stand_in):
    import torch_fidelity

    from mergevq_core.eval.fid import _UInt8Images

    tf = torch_fidelity.calculate_metrics(
        input1=_UInt8Images(images), input2=_UInt8Images(load_reference("shapes", 32, N, seed=0)), prc=True,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=str(inception_stand_in), cuda=False, batch_size=64, cache=False, verbose=False)
    assert (evaluated.precision, evaluated.recall) == pytest.approx((tf["precision"], tf["recall"]), abs=1e-9)


# ----------------------------------------------------------------------------- references, CLI, torchrun


def test_saved_and_adm_references(evaluated, ref_npz, inception_stand_in, tmp_path):
    with np.load(ref_npz) as z:
        saved = {k: z[k] for k in z.files}
    assert saved["features"].shape == (N, 2048) and saved["features"].dtype == np.float32
    assert (int(saved["count"]), int(saved["size"])) == (N, 32)
    # ADM's reference batch: its mu / sigma are kept, its images give the features (reference-only mode)
    np.savez(tmp_path / "adm.npz", arr_0=nhwc(load_reference("shapes", 32, N)), mu=saved["mu"] + 1, sigma=saved["sigma"])
    res = evaluate_samples(None, tmp_path / "adm.npz", weights=inception_stand_in, device="cpu",
                           save_stats=tmp_path / "again.npz")
    assert res.fid is None and res.samples == 0 and res.reference_images == N
    with np.load(tmp_path / "again.npz") as z:
        np.testing.assert_array_equal(z["mu"], saved["mu"] + 1)
        np.testing.assert_array_equal(z["sigma"], saved["sigma"])
        np.testing.assert_allclose(z["features"], saved["features"], rtol=1e-5, atol=1e-6)
    # statistics alone (what save_fid_stats writes): FID only, precision / recall unavailable
    np.savez(tmp_path / "stats.npz", mu=saved["mu"], sigma=saved["sigma"])
    bare = reference_stats(tmp_path / "stats.npz", 32, N, inception_stand_in, CPU)
    assert bare.features is None and bare.images is None
    np.savez(tmp_path / "bad.npz", mu=saved["mu"][:10], sigma=saved["sigma"])
    with pytest.raises(DataError, match=r"bad\.npz: 'mu' must be \(2048,\)"):
        reference_stats(tmp_path / "bad.npz", 32, N, inception_stand_in, CPU)


def _check_cli_json(out: dict, evaluated) -> None:
    assert out["fid"] == pytest.approx(evaluated.fid, rel=1e-6) and out["samples"] == N
    assert (out["precision"], out["recall"]) == (evaluated.precision, evaluated.recall)
    assert out["inception_score"] == pytest.approx(evaluated.inception_score, rel=1e-5)


def test_cli_against_saved_statistics(evaluated, samples_npz, ref_npz, inception_stand_in, tmp_path):
    from typer.testing import CliRunner

    from mergevq_cli.app import app

    args = ["evaluate", str(samples_npz), "--ref", str(ref_npz), "--inception-weights", str(inception_stand_in),
            "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    _check_cli_json(json.loads(res.output), evaluated)
    bad = CliRunner().invoke(app, ["evaluate", str(tmp_path / "missing.npz"), "--ref", "shapes"])
    assert isinstance(bad.exception, DataError) and "missing.npz" in str(bad.exception)


def test_torchrun_ranks_split_the_samples(evaluated, samples_npz, ref_npz, inception_stand_in):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "mergevq_cli", "evaluate", str(samples_npz), "--ref", str(ref_npz), "--inception-weights",
           str(inception_stand_in), "--device", "cpu", "--json"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_cli_json(json.loads(res.stdout), evaluated)  # only rank 0 prints
