"""Data layer: robust decoding, datasets, views, sampler, build_dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergevq_core.config import config_from_dict
from mergevq_core.data import (
    SHAPE_CLASSES, ImageFolder, PhotosDataset, ResumableSampler, ShapesDataset, TokenizerViews, build_dataset,
    list_images, load_rgb, photo_paths, pil_to_tensor, render_shape,
)
from mergevq_core.data.views import recon_view, student_view, teacher_view
from mergevq_core.errors import DataError


def _px(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def _noise_jpeg(path: Path, size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=95)
    return path.read_bytes()


def _save_rgb(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ----------------------------------------------------------------------------- decoding


def test_load_rgb_modes(tmp_path):
    Image.new("L", (5, 4), 100).save(tmp_path / "gray.png")
    assert _px(load_rgb(tmp_path / "gray.png")) == (100, 100, 100)

    a16 = np.array([[0, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "gray16.png")
    img = load_rgb(tmp_path / "gray16.png")
    assert [_px(img, (x, 0))[0] for x in range(3)] == [0, 255, 128]

    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    img = load_rgb(tmp_path / "rgba.png")
    assert _px(img, (0, 0)) == (10, 20, 30) and _px(img, (1, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 1))
    pal.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=1)
    img = load_rgb(tmp_path / "pal.png")
    assert _px(img, (0, 0)) == (200, 0, 0) and _px(img, (1, 0)) == (255, 255, 255)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = _px(load_rgb(tmp_path / "cmyk.jpg"), (4, 4))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta/yellow full → red

    _save_rgb(tmp_path / "odd.bmp", (1, 2, 3), size=(37, 23))
    img = load_rgb(tmp_path / "odd.bmp")
    assert img.size == (37, 23) and _px(img) == (1, 2, 3)

    _save_rgb(tmp_path / "one.png", (9, 8, 7), size=(1, 1))
    img = load_rgb(tmp_path / "one.png")
    assert img.size == (1, 1) and _px(img) == (9, 8, 7)
    t = pil_to_tensor(img)
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32 and -1 <= t.min() <= t.max() <= 1

    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    r, g, b = _px(load_rgb(tmp_path / "anim.gif"))
    assert r > 200 and b < 50


def test_load_rgb_errors(tmp_path):
    (tmp_path / "junk.png").write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    data = _noise_jpeg(tmp_path / "full.jpg")
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("junk.png", "half.jpg", "empty.jpg", "missing.png"):
        with pytest.raises(DataError, match="cannot read image"):
            load_rgb(tmp_path / name)
    assert load_rgb(tmp_path / "full.jpg").size == (64, 64)


def test_list_images_layouts(tmp_path):
    with pytest.raises(DataError, match="data folder not found.*data.root"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "empty")
    flat = tmp_path / "flat"
    for name in ("b.PNG", "a.jpg", "notes.txt", ".hidden.png"):
        _save_rgb(flat / name, (0, 0, 0)) if name != "notes.txt" else (flat / name).write_text("x")
    paths, labels, classes = list_images(flat)
    assert [p.name for p in paths] == ["a.jpg", "b.PNG"] and labels == [-1, -1] and classes == []


def test_image_folder_skips_corrupt(tmp_path, caplog):
    root = tmp_path / "train"
    _save_rgb(root / "cat" / "1.png", (255, 0, 0))
    _save_rgb(root / "cat" / "sub" / "2.png", (255, 0, 0))
    _save_rgb(root / "dog" / "1.png", (0, 0, 255))
    bad = root / "dog" / "0_bad.png"
    bad.write_bytes(b"not an image at all")
    ds = ImageFolder(root)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped == {bad}
    assert sum("0_bad.png" in r.getMessage() for r in caplog.records) == 1
    for s in samples:
        img, label = s["image"], s["label"]
        red = bool(img[0].mean() > 0.9)
        assert img.shape == (3, 16, 20) and label == (0 if red else 1)
    assert [s["index"] for s in samples] == [0, 1, 2, 3]

    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="readable"):
        ImageFolder(tmp_path / "allbad")[0]


def test_image_folder_view_randomness(tmp_path):
    _save_rgb(tmp_path / "f" / "a.png", (0, 0, 0), size=(40, 30))

    def view(img, g):
        return {"image": pil_to_tensor(img), "r": torch.rand(1, generator=g)}

    ds = ImageFolder(tmp_path / "f", view=view, seed=3)
    a, b = ds[0]["r"], ds[0]["r"]
    ds.set_epoch(1)
    assert torch.equal(a, b) and not torch.equal(a, ds[0]["r"])


# ----------------------------------------------------------------------------- built-in datasets


def test_shapes_dataset():
    ds = ShapesDataset(32, length=40, seed=0)
    assert torch.equal(ds[7]["image"], ds[7]["image"])
    assert torch.equal(ds[7]["image"], ShapesDataset(32, length=40, seed=0)[7]["image"])
    assert not torch.equal(ds[7]["image"], ShapesDataset(32, length=40, seed=1)[7]["image"])
    val = ShapesDataset(32, length=40, seed=0, split="val")
    assert not torch.equal(ds[7]["image"], val[7]["image"])
    assert sorted({ds[i]["label"] for i in range(len(ds))}) == list(range(10)) and len(SHAPE_CLASSES) == 10
    for size in (16, 33, 64):
        x = ShapesDataset(size)[3]["image"]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05  # not a flat image

    # per-class mean images differ: classes are visually distinct on average
    g = torch.Generator().manual_seed(0)
    gray = torch.stack([
        torch.stack([render_shape(c, 32, g).mean(0) for _ in range(16)]) for c in range(10)
    ])  # (10, 16, 32, 32)
    feats = torch.fft.fft2(gray).abs().mean(1).flatten(1)  # translation-invariant spectra, (10, 1024)
    d = torch.cdist(feats, feats)
    assert d[~torch.eye(10, dtype=torch.bool)].min() > 0


def test_photos():
    paths = photo_paths()
    assert len(paths) >= 5 and all(p.is_file() for p in paths)
    ds = PhotosDataset()
    s = ds[0]
    assert s["label"] == -1 and s["image"].shape[0] == 3 and -1 <= s["image"].min() <= s["image"].max() <= 1
    gray = next(i for i, p in enumerate(paths) if p.name == "camera.png")
    assert ds[gray]["image"].shape[0] == 3


# ----------------------------------------------------------------------------- views


@pytest.mark.parametrize("kind", ["pil", "tensor"])
def test_views(kind):
    if kind == "pil":
        a = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
        img = Image.fromarray(a)
    else:
        img = render_shape(2, 40, torch.Generator().manual_seed(0))
    views = TokenizerViews(size=32, teacher_size=28, student_size=24, train=True, align=True)
    out = views(img, torch.Generator().manual_seed(5))
    assert set(out) == {"image", "teacher", "student"}
    assert out["image"].shape == (3, 32, 32) and out["teacher"].shape == (3, 28, 28) and out["student"].shape == (3, 24, 24)
    for k in ("image", "student"):
        assert out[k].dtype == torch.float32 and out[k].min() >= -1 and out[k].max() <= 1
    again = views(img, torch.Generator().manual_seed(5))
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = [views(img, torch.Generator().manual_seed(s))["student"] for s in range(6, 9)]
    assert any(not torch.equal(out["student"], o) for o in other)
    plain = TokenizerViews(size=32, train=False, align=False)(img, torch.Generator())
    assert set(plain) == {"image"}
    assert torch.equal(plain["image"], recon_view(img, 32, torch.Generator().manual_seed(1), train=False))


def test_teacher_view_normalised():
    photo = load_rgb(photo_paths()[0])
    g = torch.Generator().manual_seed(0)
    t = teacher_view(photo, 64, g)
    assert t.shape == (3, 64, 64) and abs(float(t.mean())) < 1.0 and t.min() < 0 < t.max()
    s = student_view(photo, 48, g)
    assert s.shape == (3, 48, 48)
    r = recon_view(photo, 40, g)
    assert r.shape == (3, 40, 40) and -1 <= r.min() <= r.max() <= 1


# ----------------------------------------------------------------------------- sampler


def test_sampler_ranks_cover_epoch():
    ranks = [list(ResumableSampler(40, batch_size=4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 20
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(40))
    s = ResumableSampler(43, batch_size=4, world_size=2, rank=1, drop_last=False)
    assert len(s) == 22 and s.batches_per_epoch == 6


def test_sampler_resume_and_orders():
    s = ResumableSampler(50, batch_size=4, seed=7)
    assert s.batches_per_epoch == 12 and len(s) == 48
    e0, e1 = list(s), s.epoch_indices(1)
    assert e0 != e1 and sorted(e0) != e0
    assert e0 == list(ResumableSampler(50, batch_size=4, seed=7)) != list(ResumableSampler(50, batch_size=4, seed=8))
    s.set_position(1, 5)
    assert list(s) == e1[20:] and len(s) == 28 and s.state() == {"epoch": 1, "batches_done": 5}
    s.set_position(0, 0)
    s.advance(13)  # one epoch and one batch
    assert s.state() == {"epoch": 1, "batches_done": 1}
    r = ResumableSampler(50, batch_size=4, seed=7)
    r.load_state(s.state())
    assert list(r) == e1[4:]
    with pytest.raises(DataError):
        ResumableSampler(6, batch_size=4, world_size=2)


# ----------------------------------------------------------------------------- build_dataset


def _cfg(**data):
    return config_from_dict({"model": {"image_size": 32}, "merge": {"keep": 16}, "data": data})


def test_build_dataset_shapes():
    cfg = _cfg(source="shapes", teacher_size=28, student_size=28)
    tr, va = build_dataset(cfg, "train", align=True), build_dataset(cfg, "val", align=False)
    a, b = tr[0], va[0]
    assert set(a) == {"image", "teacher", "student", "label", "index"} and set(b) == {"image", "label", "index"}
    assert a["image"].shape == (3, 32, 32) and a["teacher"].shape == (3, 28, 28)
    assert not torch.equal(a["image"], b["image"])
    batch = torch.utils.data.default_collate([tr[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == [0, 1, 2, 3]


def test_build_dataset_imagefolder(tmp_path):
    for c in range(3):
        for i in range(10):
            _save_rgb(tmp_path / "train" / f"c{c}" / f"{i}.png", (c * 100, i * 20, 0), size=(40, 36))
    cfg = _cfg(source="imagefolder", root=str(tmp_path / "train"))
    tr, va = build_dataset(cfg, "train", align=False), build_dataset(cfg, "val", align=False)
    assert len(va) == 8 and len(tr) == 22
    assert not set(tr.paths) & set(va.paths) and len(set(tr.paths) | set(va.paths)) == 30
    assert build_dataset(cfg, "val", align=False).paths == va.paths  # deterministic
    assert tr.classes == va.classes == ["c0", "c1", "c2"]
    s = tr[0]
    assert s["image"].shape == (3, 32, 32) and s["label"] == int(tr.paths[0].parent.name[1])

    with pytest.raises(DataError, match="data.root"):
        build_dataset(_cfg(source="imagefolder"), "train", align=False)
    with pytest.raises(DataError, match="data.root"):
        build_dataset(_cfg(source="imagefolder", root=str(tmp_path / "missing")), "train", align=False)
