"""Token shards: writing, resuming, reading back and collating."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader

from mergevq_core.data import ShardWriter, TokenShards, collate_tokens, sha256_file
from mergevq_core.errors import DataError

N = 16
GRID = 4
CODEBOOK = 1024
NUM_ITEMS = 10
SHARD = 4
KS = [1, 4, 9, 16]  # perfect squares, as the sampled-K mode produces
HASH = "ab" * 32


def _writer(out: Path, **kw: Any) -> ShardWriter:
    args: dict[str, Any] = dict(
        tokenizer_info={"checkpoint": "runs/tok/checkpoints/step_0000100", "hash": HASH, "config": {"merge": {"keep": 16}}},
        codebook_size=CODEBOOK, n_tokens=N, grid=GRID, tokens_mode="sample", keep=None,
        dataset_info={"source": "shapes", "split": "train"}, num_items=NUM_ITEMS, shard_size=SHARD,
    )
    args.update(kw)
    return ShardWriter(out, **args)


def _items(n: int = NUM_ITEMS, ks: list[int] = KS) -> list[dict[str, Any]]:
    """Reference items: K from `ks`, ids in [0, CODEBOOK), assign covering [0, K)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for j in range(n):
        k = ks[j % len(ks)]
        assign = torch.randint(0, k, (N,), generator=g)
        assign[:k] = torch.arange(k)  # every merged token owns at least one position (K <= N here)
        out.append({
            "ids": torch.randint(0, CODEBOOK, (k,), generator=g), "assign": assign, "k": k,
            "label": j % 3 - 1, "index": 100 + j,
        })
    return out


def _write_shard(w: ShardWriter, i: int, items: list[dict[str, Any]]) -> None:
    rng = w.item_range(i)
    sel = [items[j] for j in rng]
    w.write(
        i, [it["ids"] for it in sel], torch.stack([it["assign"] for it in sel]),
        torch.tensor([it["label"] for it in sel]), torch.tensor([it["index"] for it in sel]),
    )


def _check_equal(ds: TokenShards, items: list[dict[str, Any]]) -> None:
    assert len(ds) == len(items)
    for j, ref in enumerate(items):
        got = ds[j]
        assert got["ids"].dtype == torch.long and got["assign"].dtype == torch.long
        assert torch.equal(got["ids"], ref["ids"])
        assert torch.equal(got["assign"], ref["assign"])
        assert got["k"] == ref["k"] and got["label"] == ref["label"] and got["index"] == ref["index"]


def test_round_trip_three_shards(tmp_path: Path) -> None:
    items = _items()
    w = _writer(tmp_path)
    assert w.pending() == [0, 1, 2]
    assert [list(w.item_range(i)) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for i in w.pending():
        _write_shard(w, i, items)
    w.finish()

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["kind"] == "token-shards" and manifest["format_version"] == 2
    assert manifest["shards"] == {
        "00000": {"file": "shard_00000.safetensors", "count": 4},
        "00001": {"file": "shard_00001.safetensors", "count": 4},
        "00002": {"file": "shard_00002.safetensors", "count": 2},
    }
    assert manifest["tokens"] == {"mode": "sample", "keep": None} and manifest["num_items"] == NUM_ITEMS

    raw = load_file(str(tmp_path / "shard_00000.safetensors"))
    assert raw["assign"].dtype == torch.int16 and raw["ids"].dtype == torch.int32 and raw["k"].dtype == torch.int32
    assert raw["k"].shape == (4, 1) and raw["assign"].shape == (4, 1, N)  # one view per item
    assert raw["label"].dtype == torch.int64 and raw["index"].dtype == torch.int64
    assert raw["ids"].numel() == sum(KS)

    ds = TokenShards(tmp_path, cache_shards=1)
    _check_equal(ds, items)
    assert ds[-1]["index"] == items[-1]["index"]
    with pytest.raises(IndexError):
        ds[NUM_ITEMS]
    assert ds.codebook_size == CODEBOOK and ds.n_tokens == N and ds.tokenizer_hash == HASH and ds.grid == GRID
    assert ds.manifest["dataset"] == {"source": "shapes", "split": "train"}
    assert len(ds._cache) == 1  # LRU keeps only what it was told to
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives: no cached shards
    assert len(clone._cache) == 0 and torch.equal(clone[5]["ids"], items[5]["ids"])

    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_tokens, num_workers=0))
    assert batches[0]["ids"].shape == (4, max(KS)) and batches[-1]["assign"].shape == (2, N)


def test_int32_assign_when_k_is_large(tmp_path: Path) -> None:
    ids = [torch.arange(40000) % CODEBOOK]
    assign = torch.full((1, N), 39999)
    w = _writer(tmp_path, num_items=1)
    w.write(0, ids, assign, torch.tensor([5]), torch.tensor([0]))
    w.finish()
    assert load_file(str(tmp_path / "shard_00000.safetensors"))["assign"].dtype == torch.int32
    got = TokenShards(tmp_path)[0]
    assert torch.equal(got["ids"], ids[0]) and torch.equal(got["assign"], assign[0]) and got["k"] == 40000


def test_resume_keeps_finished_shards_and_ignores_tmp(tmp_path: Path) -> None:
    items = _items()
    w = _writer(tmp_path)
    _write_shard(w, 0, items)
    _write_shard(w, 1, items)
    # a run killed while writing shard 2 leaves only a temporary file
    stale = tmp_path / ".shard_00002.safetensors.x1y2z3.tmp"
    stale.write_bytes(b"half a shard")
    before = (tmp_path / "shard_00000.safetensors").read_bytes()

    w2 = _writer(tmp_path)
    assert w2.pending() == [2]
    assert not stale.exists()
    assert (tmp_path / "shard_00000.safetensors").read_bytes() == before
    _write_shard(w2, 2, items)
    w2.finish()
    _check_equal(TokenShards(tmp_path), items)
    assert _writer(tmp_path).pending() == []


def test_resume_drops_shard_whose_file_is_gone(tmp_path: Path) -> None:
    items = _items()
    w = _writer(tmp_path)
    _write_shard(w, 0, items)
    _write_shard(w, 1, items)
    (tmp_path / "shard_00001.safetensors").unlink()
    assert _writer(tmp_path).pending() == [1, 2]


def test_resume_refuses_other_tokenizer_or_settings(tmp_path: Path) -> None:
    items = _items()
    w = _writer(tmp_path)
    _write_shard(w, 0, items)
    other = {"checkpoint": "x", "hash": "cd" * 32, "config": {}}
    with pytest.raises(DataError, match="another tokenizer") as e:
        _writer(tmp_path, tokenizer_info=other)
    assert "\n" not in str(e.value) and "abababababab" in str(e.value)
    with pytest.raises(DataError, match="shard_size"):
        _writer(tmp_path, shard_size=5)
    with pytest.raises(DataError, match="num_items"):
        _writer(tmp_path, num_items=11)
    with pytest.raises(DataError, match="mode"):
        _writer(tmp_path, tokens_mode="fixed", keep=16)
    # the refused writers left the folder as it was
    assert _writer(tmp_path).pending() == [1, 2]


def test_reader_refuses_incomplete_or_missing(tmp_path: Path) -> None:
    items = _items()
    w = _writer(tmp_path / "part")
    for i in w.pending():
        _write_shard(w, i, items)  # all written but finish() not called
    with pytest.raises(DataError, match="incomplete"):
        TokenShards(tmp_path / "part")
    with pytest.raises(DataError, match="manifest"):
        TokenShards(tmp_path / "nothing")
    w.finish()
    (tmp_path / "part" / "shard_00001.safetensors").unlink()
    with pytest.raises(DataError, match="missing"):
        TokenShards(tmp_path / "part")


def test_write_checks_shapes(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    ids = [torch.zeros(4, dtype=torch.long)] * 4
    good = dict(assign=torch.zeros(4, N, dtype=torch.long), labels=torch.zeros(4), indices=torch.arange(4))
    with pytest.raises(ValueError):
        w.write(0, ids[:3], **good)
    with pytest.raises(ValueError):
        w.write(0, ids, **{**good, "assign": torch.full((4, N), 4)})  # assign must stay below K
    with pytest.raises(ValueError):
        w.write(0, [torch.full((4,), CODEBOOK)] * 4, **good)
    with pytest.raises(RuntimeError):
        w.finish()


def test_collate_pads_with_minus_one() -> None:
    items = [
        {"ids": torch.tensor([3, 1, 4, 1]), "assign": torch.zeros(N, dtype=torch.long), "k": 4, "label": 2, "index": 7},
        {"ids": torch.tensor([9]), "assign": torch.zeros(N, dtype=torch.long), "k": 1, "label": -1, "index": 8},
    ]
    b: dict[str, Tensor] = collate_tokens(items)
    assert b["ids"].tolist() == [[3, 1, 4, 1], [9, -1, -1, -1]]
    assert b["k"].tolist() == [4, 1] and b["label"].tolist() == [2, -1] and b["index"].tolist() == [7, 8]
    assert b["assign"].shape == (2, N) and all(t.dtype == torch.long for t in b.values())


def test_sha256_file(tmp_path: Path) -> None:
    import hashlib

    p = tmp_path / "w.bin"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    assert sha256_file(p, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    with pytest.raises(DataError):
        sha256_file(tmp_path / "absent.bin")


# ---------------------------------------------------------------------------- several views per item

V = 3


def _view_items(n: int = NUM_ITEMS) -> list[list[dict[str, Any]]]:
    """n items of V views each, every view with its own K."""
    flat = _items(n * V, ks=[1, 4, 9, 16, 9])
    return [[{**flat[j * V + v], "label": j % 3, "index": 200 + j} for v in range(V)] for j in range(n)]


def _write_views(w: ShardWriter, i: int, items: list[list[dict[str, Any]]]) -> None:
    sel = [items[j] for j in w.item_range(i)]
    w.write(i, [view["ids"] for it in sel for view in it],
            torch.stack([torch.stack([view["assign"] for view in it]) for it in sel]),
            torch.tensor([it[0]["label"] for it in sel]), torch.tensor([it[0]["index"] for it in sel]))


def test_views_round_trip_and_epoch_views(tmp_path: Path) -> None:
    from mergevq_core.data.codes import EpochViews

    items = _view_items()
    views = {"mode": "synthetic", "count": V, "crop_range": 1.0}
    w = _writer(tmp_path, views=views)
    for i in w.pending():
        _write_views(w, i, items)
    w.finish()
    raw = load_file(str(tmp_path / "shard_00001.safetensors"))
    assert raw["k"].shape == (4, V) and raw["assign"].shape == (4, V, N)

    ds = TokenShards(tmp_path)
    assert ds.num_views == V and ds.views == views
    for j, it in enumerate(items):
        for v in range(V):
            got = ds.get(j, v)
            assert torch.equal(got["ids"], it[v]["ids"]) and torch.equal(got["assign"], it[v]["assign"])
            assert got["k"] == it[v]["k"] and got["view"] == v and got["label"] == it[0]["label"]
        assert torch.equal(ds[j]["ids"], it[0]["ids"])  # indexing gives the centre view
    with pytest.raises(IndexError):
        ds.get(0, V)
    assert sum(ds.k_counts().values()) == NUM_ITEMS * V

    ev = EpochViews(ds, range(2, NUM_ITEMS), seed=7)
    drawn = []
    for epoch in range(4):
        ev.set_epoch(epoch)
        drawn.append([ev.view_of(i) for i in range(2, NUM_ITEMS)])
        for j in range(len(ev)):  # each item comes back in the view drawn for it
            assert torch.equal(ev[j]["ids"], items[j + 2][drawn[-1][j]]["ids"])
    assert len({tuple(d) for d in drawn}) > 1 and {v for d in drawn for v in d} == set(range(V))
    again = EpochViews(ds, range(2, NUM_ITEMS), seed=7)
    again.set_epoch(2)
    assert [again.view_of(i) for i in range(2, NUM_ITEMS)] == drawn[2]  # a pure function: resume draws the same
    other = EpochViews(ds, range(2, NUM_ITEMS), seed=8)
    assert [[other.view_of(i, e) for i in range(2, NUM_ITEMS)] for e in range(4)] != drawn

    with pytest.raises(DataError, match="views"):  # another view count cannot resume this folder
        _writer(tmp_path, views={**views, "count": 2})


def test_format_one_folders_are_still_read(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    items = _items(4)
    k = torch.tensor([it["k"] for it in items], dtype=torch.int32)
    save_file({"ids": torch.cat([it["ids"] for it in items]).int(), "k": k,
               "assign": torch.stack([it["assign"] for it in items]).short(),
               "label": torch.tensor([it["label"] for it in items]), "index": torch.tensor([it["index"] for it in items])},
              str(tmp_path / "shard_00000.safetensors"))
    manifest = {"format_version": 1, "kind": "token-shards", "tokenizer": {"checkpoint": "", "hash": HASH, "config": {}},
                "codebook_size": CODEBOOK, "n_tokens": N, "grid": GRID, "tokens": {"mode": "sample", "keep": None},
                "dataset": {}, "shard_size": 4, "num_items": 4,
                "shards": {"00000": {"file": "shard_00000.safetensors", "count": 4}}, "complete": True}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ds = TokenShards(tmp_path)
    assert ds.num_views == 1 and ds.views["mode"] == "center"
    _check_equal(ds, items)


def test_shards_written_by_other_ranks_are_adopted(tmp_path: Path) -> None:
    """Rank 1 writes shard files only; a run killed before rank 0 recorded them keeps them on resume, but a shard
    file of another tokenizer is written again."""
    items = _items()
    owner = _writer(tmp_path)
    follower = _writer(tmp_path, owner=False)
    _write_shard(owner, 0, items)
    _write_shard(follower, 1, items)
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"].keys() == {"00000"}
    _writer(tmp_path / "elsewhere", tokenizer_info={"hash": "cd" * 32})  # a stranger's shard 2 lands here
    stranger = _writer(tmp_path / "elsewhere", tokenizer_info={"hash": "cd" * 32})
    _write_shard(stranger, 2, items)
    (tmp_path / "elsewhere" / "shard_00002.safetensors").rename(tmp_path / "shard_00002.safetensors")

    resumed = _writer(tmp_path)
    assert resumed.pending() == [2]
    _write_shard(resumed, 2, items)
    resumed.finish()
    _check_equal(TokenShards(tmp_path), items)
    with pytest.raises(DataError, match="rank 0"):
        _writer(tmp_path / "new", owner=False)
