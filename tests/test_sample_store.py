"""The samples folder: shards written atomically, resumed, refused under other settings, finished by streaming."""

from __future__ import annotations

import numpy as np
import pytest

from mergevq_core.errors import ConfigError, DataError
from mergevq_core.sample_store import SampleStore, write_npz_streaming


def _fill(store: SampleStore, shards: list[int]) -> None:
    for s in shards:
        r = store.shard_range(s)
        images = (np.arange(len(r) * 12, dtype=np.int64).reshape(len(r), 2, 2, 3) + 7 * s).astype(np.uint8)
        store.write(s, images, np.asarray(r) % 3, seed=5, stats=[{"forward_passes": s, "tensor_like": object()}])


def test_finish_streams_the_shards_into_the_adm_layout(tmp_path):
    store = SampleStore(tmp_path / "o", {"cfg": 2.0}, total=10, shard_size=4)
    assert store.num_shards == 3 and list(store.shard_range(2)) == [8, 9]
    assert store.pending(0, 2) == [0, 2] and store.pending(1, 2) == [1]  # shards s ≡ rank (mod world)
    _fill(store, [0, 1, 2])
    with np.load(store.finish()) as z:
        images, labels = z["arr_0"], z["labels"]
    expected = np.concatenate([store.read(s)["images"] for s in range(3)])
    assert images.dtype == np.uint8 and images.shape == (10, 2, 2, 3) and np.array_equal(images, expected)
    assert labels.tolist() == [i % 3 for i in range(10)]
    shard = store.read(1)
    assert shard["index"].tolist() == [4, 5, 6, 7] and shard["seed"].tolist() == [5] * 4
    assert [st["forward_passes"] for st in store.stats()] == [0, 1, 2]  # what JSON cannot hold is left out
    assert "tensor_like" not in store.stats()[0]


def test_resume_keeps_finished_shards_and_refuses_other_settings(tmp_path):
    store = SampleStore(tmp_path / "o", {"cfg": 2.0, "seed": 0}, total=10, shard_size=4)
    _fill(store, [0])
    again = SampleStore(tmp_path / "o", {"cfg": 2.0, "seed": 0}, total=10, shard_size=4)
    assert again.pending() == [1, 2] and not again.complete()
    with pytest.raises(DataError, match="missing"):
        again.finish()
    with pytest.raises(ConfigError, match=r"other settings \(seed: 0 → 1\)"):
        SampleStore(tmp_path / "o", {"cfg": 2.0, "seed": 1}, total=10, shard_size=4)
    with pytest.raises(ConfigError, match=r"other settings \(total: 10 → 12\)"):
        SampleStore(tmp_path / "o", {"cfg": 2.0, "seed": 0}, total=12, shard_size=4)


def test_streamed_npz_reads_like_savez_and_checks_its_size(tmp_path):
    a = np.arange(60, dtype=np.uint8).reshape(5, 4, 3)
    write_npz_streaming(tmp_path / "x.npz", {"arr_0": (a.shape, np.uint8, iter([a[:2], a[2:]]))})
    with np.load(tmp_path / "x.npz") as z:
        assert np.array_equal(z["arr_0"], a)
    with pytest.raises(ValueError, match="expected"):
        write_npz_streaming(tmp_path / "y.npz", {"arr_0": (a.shape, np.uint8, iter([a[:2]]))})
    assert not (tmp_path / "y.npz").exists() and not list(tmp_path.glob(".y.npz*"))
