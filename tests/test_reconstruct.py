"""`reconstruct` and `tokenize` on a tiny checkpoint trained in the fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergevq_core import api
from mergevq_core.errors import CheckpointError, ConfigError, DataError
from mergevq_core.shipped import shipped_path

from .conftest import FAST_TRAIN, ROOT


@pytest.fixture(scope="session")
def run(tiny_tokenizer_run):
    return tiny_tokenizer_run


@pytest.fixture(scope="session")
def mixed(tmp_path_factory):
    """PNG, JPEG, grayscale, RGBA, 16-bit and odd-sized files in one folder."""
    d = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)).save(d / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8), "L").save(d / "gray.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(d / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (34, 34), dtype=np.uint16)).save(d / "deep16.png")
    return d


def test_reconstruct_mixed_folder_and_photos(run, mixed, tmp_path):
    res = api.reconstruct([mixed], ckpt=run, tokens=[16, 64], out=tmp_path / "r", photos=True, device="cpu")
    n = 5 + len({r.path for r in res.images if "skimage" in r.path})
    assert len(res.images) == 2 * n and n > 10
    for r in res.images:
        assert os.path.isfile(r.output) and np.isfinite(r.psnr) and -1 <= r.ssim <= 1
    assert set(res.mean) == {16, 64} and all(0 < m["codebook_usage"] <= 1 for m in res.mean.values())
    assert os.path.isfile(res.plot)
    w, h = Image.open(res.images[0].output).size
    assert w > 2.5 * h  # original | reconstruction | merge map


def test_source_predicted_reports_the_gap(run, mixed, tmp_path):
    res = api.reconstruct([mixed], ckpt=run, tokens=[16], source="predicted", out=tmp_path / "p", device="cpu")
    m = res.mean[16]
    assert m["gap_db"] == pytest.approx(m["psnr_gt_source"] - m["psnr"])


def test_newest_run_is_used_and_a_missing_one_is_explained(run, mixed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tokenizer run here: the shipped one
    res = api.reconstruct([mixed / "rgb.png"], out=tmp_path / "x", device="cpu")
    assert Path(res.ckpt) == shipped_path("tokenizer")
    (tmp_path / "runs").mkdir()
    os.symlink(run, tmp_path / "runs" / "tiny-1")
    res = api.reconstruct([mixed / "rgb.png"], out=tmp_path / "y", device="cpu")
    assert res.ckpt.startswith("runs/tiny-1/checkpoints/")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mergevq_cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_json_and_one_line_errors(run, mixed, tmp_path):
    res = _cli("reconstruct", str(mixed / "rgb.png"), "--ckpt", str(run), "--tokens", "16", "--out", str(tmp_path / "c"),
               "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    assert obj["ckpt"] and obj["images"][0]["tokens"] == 16 and {"psnr", "ssim"} <= set(obj["mean"]["16"])
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for args, needle in [
        ([str(corrupt)], "cannot read image"),
        ([str(tmp_path / "missing.png")], "no such file or folder"),
        ([str(mixed / "rgb.png"), "--tokens", "20"], "perfect square"),
        ([str(mixed / "rgb.png"), "--tokens", "100"], "perfect square"),
        ([str(mixed / "rgb.png"), "--save", "-1"], "--save -1"),
    ]:
        r = _cli("reconstruct", *args, "--ckpt", str(run), "--out", str(tmp_path / "e"), "--device", "cpu")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], r.stderr


def test_rfid_with_a_local_stand_in_extractor(run, mixed, tmp_path, inception_stand_in, one_thread):
    res = api.reconstruct([mixed], ckpt=run, tokens=[16], out=tmp_path / "f", fid=True,
                          inception_weights=str(inception_stand_in), device="cpu")
    assert res.mean[16]["rfid"] >= 0


# ----------------------------------------------------------------------------- streamed at scale

N_FILES = 24  # the folder of the picture tests; rFID runs on a folder of N_FID (Inception: ~0.3 s an image on CPU)
N_FID = 12
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """Inception on 2 threads of a shared 2-core machine runs several times slower than on 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _shapes_pngs(folder, n):
    from mergevq_core.data.sources import open_images
    from mergevq_core.eval.fid import to_uint8

    ds, _ = open_images("shapes", 32, split="val", length=n)
    for i in range(n):
        Image.fromarray(to_uint8(ds[i]["image"]).permute(1, 2, 0).numpy()).save(folder / f"s{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """N_FILES 32-px PNGs of the built-in shapes."""
    return _shapes_pngs(tmp_path_factory.mktemp("shapes"), N_FILES)


@pytest.fixture(scope="module")
def fid_folder(tmp_path_factory):
    return _shapes_pngs(tmp_path_factory.mktemp("shapes-fid"), N_FID)


@pytest.fixture(scope="module")
def fid_run(run, fid_folder, inception_stand_in, tmp_path_factory):
    """rFID at K = 16 over `fid_folder`, in one process, with an empty cache."""
    cache = tmp_path_factory.mktemp("fid-cache")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = api.reconstruct([fid_folder], ckpt=run, tokens=[16], out=tmp_path_factory.mktemp("fid-out"), fid=True,
                              inception_weights=str(inception_stand_in), cache=cache, save=0, device="cpu")
    finally:
        torch.set_num_threads(before)
    return res, cache


def test_streamed_rfid_equals_the_in_memory_computation(run, fid_folder, fid_run, inception_stand_in, one_thread):
    from mergevq_core.eval.fid import frechet_distance, to_uint8
    from mergevq_core.eval.reconstruct import collect_images, load_images

    res, _ = fid_run
    assert res.count == N_FID and res.fid_reference_cached is False and res.images == []
    tok, _ = api.load_tokenizer(run, "cpu")
    images = load_images(collect_images([fid_folder]), tok.cfg.model.image_size)
    with torch.no_grad():
        enc = tok.encode(images, tokens=16)
        recon = tok.decode(enc.ids, enc.assign).float().clamp(-1, 1)
    expected = frechet_distance(to_uint8(images), to_uint8(recon), inception_stand_in, torch.device("cpu"))
    assert res.mean[16]["rfid"] == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_a_second_run_reuses_the_cached_originals(run, fid_folder, fid_run, inception_stand_in, tmp_path,
                                                  monkeypatch, one_thread):
    from mergevq_core.eval.streaming import StatsAccumulator

    first, cache = fid_run
    assert len(list((cache / "recon-fid").glob("*.npz"))) == 1
    fed, add = [], StatsAccumulator.add
    monkeypatch.setattr(StatsAccumulator, "add", lambda self, x: (fed.append(len(x)), add(self, x))[1])
    again = api.reconstruct([fid_folder], ckpt=run, tokens=[16], out=tmp_path / "again", fid=True,
                            inception_weights=str(inception_stand_in), cache=cache, save=0, device="cpu")
    assert again.fid_reference_cached is True and again.to_json()["fid_reference_cached"] is True
    assert sum(fed) == N_FID  # the reconstructions only: no Inception pass over the originals
    assert again.mean[16]["rfid"] == pytest.approx(first.mean[16]["rfid"], rel=1e-9, abs=1e-9)


def test_save_n_pictures_and_every_image_in_per_image_jsonl(run, shapes_folder, tmp_path):
    from mergevq_core.eval.reconstruct import collect_images

    out = tmp_path / "s"
    res = api.reconstruct([shapes_folder], ckpt=run, tokens=[16, 64], out=out, save=3, batch=5, device="cpu")
    for k in (16, 64):
        assert len(list(out.glob(f"*_k{k}.png"))) == 3
    assert res.count == N_FILES and len(res.images) == 3 * 2 and all(os.path.isfile(r.output) for r in res.images)
    rows = [json.loads(line) for line in open(res.per_image)]
    files = [str(f) for f in collect_images([shapes_folder])]
    assert [(r["path"], r["tokens"]) for r in rows] == [(f, k) for f in files for k in (16, 64)]  # image order
    assert [r for r in rows if "output" in r] == [r.to_json() for r in res.images]
    for k in (16, 64):
        for key in ("psnr", "ssim"):
            assert res.mean[k][key] == pytest.approx(np.mean([r[key] for r in rows if r["tokens"] == k]), rel=1e-9)
    assert not list(out.glob(".per_image.*")) and os.path.isfile(res.plot)
    none = api.reconstruct([shapes_folder], ckpt=run, tokens=[16], out=tmp_path / "n", save=0, device="cpu")
    assert none.images == [] and not list((tmp_path / "n").glob("*.png"))
    assert len(open(none.per_image).readlines()) == N_FILES
    for kw, needle in [({"save": 3, "save_all": True}, "--save-all"), ({"workers": -1}, "--workers -1")]:
        with pytest.raises(ConfigError, match=needle):
            api.reconstruct([shapes_folder], ckpt=run, out=tmp_path / "x", device="cpu", **kw)


def test_an_unreadable_file_read_by_a_worker_is_one_data_error(run, shapes_folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"^cannot read image .*bad\.png") as e:
        api.reconstruct([shapes_folder, bad], ckpt=run, tokens=[16], out=tmp_path / "w", workers=1, save=0,
                        device="cpu")
    assert "\n" not in str(e.value)


def test_two_torchrun_ranks_give_the_one_process_metrics(run, fid_folder, fid_run, inception_stand_in, tmp_path):
    one, _ = fid_run
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
           "-m", "mergevq_cli", "reconstruct", str(fid_folder), "--ckpt", str(run), "--tokens", "16", "--fid",
           "--inception-weights", str(inception_stand_in), "--cache", str(tmp_path / "cache"), "--save", "7",
           "--workers", "1", "--out", str(out), "--device", "cpu", "--json"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    obj = json.loads(res.stdout)  # only rank 0 prints
    assert obj["count"] == N_FID and obj["fid_reference_cached"] is False
    got, want = obj["mean"]["16"], one.mean[16]
    for key in ("psnr", "ssim", "codebook_usage"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    assert got["rfid"] == pytest.approx(want["rfid"], rel=1e-4, abs=1e-4)
    rows = [json.loads(line) for line in open(obj["per_image"])]
    ref = [json.loads(line) for line in open(one.per_image)]
    assert [r["path"] for r in rows] == [r["path"] for r in ref]  # the ranks' parts merged in image order
    assert [r["psnr"] for r in rows] == pytest.approx([r["psnr"] for r in ref], abs=1e-4)
    assert len(obj["images"]) == 7 == len(list(out.glob("*_k16.png")))  # rank 0 holds 6: both ranks saved
    assert [r["path"] for r in obj["images"]] == [r["path"] for r in ref[:7]]


def test_tokenize_then_decode_equals_reconstruct_bit_for_bit(run, mixed, tmp_path):
    from mergevq_core.data.codes import TokenShards
    from mergevq_core.eval.reconstruct import collect_images, load_images

    api.tokenize(mixed, tmp_path / "tok", ckpt=run, tokens=16, views="center", device="cpu", batch=1, shard_size=2)
    shards = TokenShards(tmp_path / "tok")
    tok, _ = api.load_tokenizer(run, "cpu")
    files = collect_images([mixed])
    images = load_images(files, tok.cfg.model.image_size)
    assert len(shards) == len(files)
    with torch.no_grad():
        for i in range(len(files)):
            item = shards[i]
            enc = tok.encode(images[i : i + 1], tokens=16)
            assert torch.equal(item["ids"], enc.ids[0]) and torch.equal(item["assign"], enc.assign[0])
            assert torch.equal(tok.decode(item["ids"][None], item["assign"][None]), tok.decode(enc.ids, enc.assign))


def test_tokenize_views_are_the_crops_and_mirrors(run, mixed, tmp_path):
    """Ten-crop at crop range 1.25: every stored view is the tokenizer's encoding of that crop; K drawn per view."""
    from mergevq_core.data.codes import TokenShards
    from mergevq_core.data.images import load_rgb
    from mergevq_core.data.views import TokenizeViews
    from mergevq_core.eval.reconstruct import collect_images

    api.tokenize(mixed, tmp_path / "tok", ckpt=run, tokens_sample=True, crop_range=1.25, device="cpu", batch=1,
                 shard_size=2)
    shards = TokenShards(tmp_path / "tok")
    tok, _ = api.load_tokenizer(run, "cpu")
    make = TokenizeViews(tok.cfg.model.image_size, "ten-crop", 1.25)
    assert shards.num_views == 10 and shards.views == make.describe()
    files = collect_images([mixed])
    ks = set()
    with torch.no_grad():
        for i, f in enumerate(files):
            views = make.signed(make(load_rgb(f))["views"])
            assert torch.equal(views[5], views[0].flip(-1)) and not torch.equal(views[1], views[0])
            for v in range(10):
                item = shards.get(i, v)
                enc = tok.encode(views[v : v + 1], tokens=item["k"])
                assert torch.equal(item["ids"], enc.ids[0]) and torch.equal(item["assign"], enc.assign[0]), (f, v)
                ks.add(item["k"])
    assert len(ks) > 1


def _shard_bytes(folder):
    """Every shard's tensors (as bytes) and header (safetensors writes its header keys in no fixed order)."""
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.glob("shard_*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out[p.name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())})
    return out


def test_tokenize_workers_and_two_torchrun_ranks_write_the_same_shards(run, tmp_path):
    one = api.tokenize("shapes", tmp_path / "one", ckpt=run, tokens_sample=True, limit=10, device="cpu", batch=16,
                       shard_size=3)
    assert one.views == 10 and one.encoded == 10
    api.tokenize("shapes", tmp_path / "w", ckpt=run, tokens_sample=True, limit=10, device="cpu", batch=16,
                 shard_size=3, workers=2)
    want = _shard_bytes(tmp_path / "one")
    assert len(want) == 4 and _shard_bytes(tmp_path / "w") == want

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29543",
           "-m", "mergevq_cli", "tokenize", "shapes", "--ckpt", str(run), "--tokens-sample", "--limit", "10",
           "--batch", "16", "--shard-size", "3", "--workers", "1", "--out", str(out), "--device", "cpu", "--json"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    obj = json.loads(res.stdout)  # only rank 0 prints
    assert obj["processes"] == 2 and obj["encoded"] == 10 and obj["skipped_shards"] == 0
    assert _shard_bytes(out) == want
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "one", out))
    assert m2["complete"] is True and m2["shards"] == m1["shards"]


def test_tokenize_resumes_and_refuses_another_tokenizer(run, tmp_path, monkeypatch):
    from mergevq_core.data import codes, shard_writer

    full = api.tokenize("shapes", tmp_path / "full", ckpt=run, tokens_sample=True, limit=10, device="cpu", shard_size=4)
    real_write, calls = shard_writer.ShardWriter.write, {"n": 0}

    def dies_after_one(self, *a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_write(self, *a, **k)

    monkeypatch.setattr(shard_writer.ShardWriter, "write", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        api.tokenize("shapes", tmp_path / "part", ckpt=run, tokens_sample=True, limit=10, device="cpu", shard_size=4)
    monkeypatch.setattr(shard_writer.ShardWriter, "write", real_write)
    with pytest.raises(DataError, match="incomplete"):
        codes.TokenShards(tmp_path / "part")
    again = api.tokenize("shapes", tmp_path / "part", ckpt=run, tokens_sample=True, limit=10, device="cpu", shard_size=4)
    assert again.skipped_shards == 1 and again.encoded == 10 - 4 and full.encoded == 10
    a, b = codes.TokenShards(tmp_path / "full"), codes.TokenShards(tmp_path / "part")
    for i in range(10):
        assert all(torch.equal(torch.as_tensor(a[i][key]), torch.as_tensor(b[i][key])) for key in ("ids", "assign", "k", "label"))
    assert len({a[i]["k"] for i in range(10)}) > 1  # K drawn per image

    other = tmp_path / "other"
    api.train_tokenizer(ROOT / "recipes/tiny.yaml", FAST_TRAIN, out=other, max_steps=1, device="cpu", seed=5)
    with pytest.raises(DataError, match="another tokenizer"):
        api.tokenize("shapes", tmp_path / "full", ckpt=other, tokens_sample=True, limit=10, device="cpu", shard_size=4)


def test_bad_tokens_for_tokenize(run, tmp_path):
    with pytest.raises(ConfigError, match="perfect square"):
        api.tokenize("shapes", tmp_path / "t", ckpt=run, tokens=50, limit=4, device="cpu")
