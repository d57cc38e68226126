"""pipeline.data: exactly-once order, world-size independence, exact resume, flips, corrupt samples."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from pipeline.data import DataError, TrainLoader, iter_split
from support.datasets import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 23 train samples in shards of 5 (uneven last shard), 7 test samples
    return make_shards(tmp_path_factory.mktemp("d") / "shards", n_train=23, n_test=7, seed=0, shard_size=5)


def key_of(shards, split="train"):
    """{uint8 CHW bytes: key} and {key: uint8 CHW} of a split, via iter_split."""
    table, imgs = {}, {}
    for x, keys in iter_split(shards, split, 4, with_keys=True):
        for img, k in zip(x, keys):
            table[img.numpy().tobytes()] = k
            imgs[k] = img
    return table, imgs


def to_uint8(batch: torch.Tensor) -> torch.Tensor:
    return ((batch + 1) * 127.5).round().to(torch.uint8)


def keys_of_batch(batch, table, flip_ok=False):
    out = []
    for img in to_uint8(batch):
        k = table.get(img.numpy().tobytes())
        if k is None and flip_ok:
            k = table.get(img.flip(-1).numpy().tobytes())
        assert k is not None, "a batch image is not a stored sample"
        out.append(k)
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_float32_nchw_in_range_and_exact(shards):
    table, imgs = key_of(shards)
    loader = TrainLoader(shards, batch_size=4, rank=0, world_size=1, seed=0, random_flip=False,
                         num_workers=0, max_corrupt=0)
    b = next(loader)
    assert b.dtype == torch.float32 and b.shape == (4, 3, 32, 32)
    assert b.min() >= -1 and b.max() <= 1
    for x, k in zip(b, keys_of_batch(b, table)):
        torch.testing.assert_close(x, imgs[k].float() / 127.5 - 1, rtol=0, atol=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exactly_once_per_epoch_over_2_ranks(shards, num_workers):
    """2 ranks x `num_workers` workers, batch 3 -> G = 6 does not divide N = 23: batches straddle
    epochs, yet every sample appears exactly once in each window of N consecutive stream positions."""
    table, _ = key_of(shards)
    N = len(table)
    loaders = [TrainLoader(shards, batch_size=3, rank=r, world_size=2, seed=5, random_flip=False,
                           num_workers=num_workers) for r in range(2)]
    stream = []
    for _ in range(12):  # 12 global batches = 72 positions > 3 epochs
        for L in loaders:
            stream += keys_of_batch(next(L), table)
    for e in range(3):
        assert sorted(stream[e * N:(e + 1) * N]) == sorted(table.values()), f"epoch {e}"
    assert stream[:N] != stream[N:2 * N]  # a new permutation each epoch
    assert loaders[0].state_dict()["position"] == 72


def test_order_independent_of_world_size_and_workers(shards):
    table, _ = key_of(shards)
    one = TrainLoader(shards, batch_size=8, world_size=1, seed=3, num_workers=2)
    two = [TrainLoader(shards, batch_size=4, rank=r, world_size=2, seed=3, num_workers=w)
           for r, w in ((0, 0), (1, 1))]
    for _ in range(5):
        torch.testing.assert_close(next(one), torch.cat([next(L) for L in two]), rtol=0, atol=0)


def test_resume_continues_the_uninterrupted_stream(shards):
    ref = TrainLoader(shards, batch_size=4, rank=0, world_size=1, seed=9, num_workers=2)
    expected = take(ref, 12)
    first = TrainLoader(shards, batch_size=4, seed=9, num_workers=2)
    take(first, 5)  # the workers have prefetched past batch 5; the position must not count that
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as trainer_state.json does
    assert state["position"] == 20 and state["epoch"] == 0
    resumed = TrainLoader(shards, batch_size=4, seed=9, num_workers=0)
    resumed.load_state_dict(state)
    for a, b in zip(expected[5:], take(resumed, 7)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and with another world size: 2 ranks x 2 read the same global stream
    ranks = [TrainLoader(shards, batch_size=2, rank=r, world_size=2, seed=9, num_workers=1) for r in range(2)]
    for L in ranks:
        L.load_state_dict(state)
    for a in expected[5:9]:
        torch.testing.assert_close(a, torch.cat([next(L) for L in ranks]), rtol=0, atol=0)


def test_resume_rejects_other_data(shards, tmp_path):
    L = TrainLoader(shards, batch_size=4, seed=1, num_workers=0)
    with pytest.raises(DataError, match="for 99 samples"):
        L.load_state_dict({"position": 8, "num_samples": 99, "seed": 1})
    # Another data set of the same size, keys and layout (other images): refused too.
    n = L.num_samples
    other = make_shards(tmp_path / "other", n_train=n, n_test=7, seed=123, shard_size=5)
    O = TrainLoader(other, batch_size=4, seed=1, num_workers=0)
    assert O.num_samples == n and O.shards.key(0) == L.shards.key(0)
    state = json.loads(json.dumps(L.state_dict()))
    with pytest.raises(DataError, match=f"another data set of {n} samples"):
        O.load_state_dict(state)
    TrainLoader(shards, batch_size=4, seed=1, num_workers=0).load_state_dict(state)  # the same shards resume
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)  # the same data elsewhere (as fetched shards are) resumes
    TrainLoader(copy, batch_size=4, seed=1, num_workers=0).load_state_dict(state)
    del state["fingerprint"]  # a checkpoint from before the fingerprint
    O.load_state_dict(state)


def test_random_flip_is_per_sample_and_reproducible(shards):
    table, imgs = key_of(shards)
    flips = []
    L = TrainLoader(shards, batch_size=23, seed=4, random_flip=True, num_workers=0)
    for _ in range(2):
        b = next(L)
        for x, k in zip(to_uint8(b), keys_of_batch(b, table, flip_ok=True)):
            flipped = not torch.equal(x, imgs[k])
            if flipped:
                assert torch.equal(x, imgs[k].flip(-1))  # a horizontal mirror, nothing else
            flips.append(flipped)
    assert 10 < sum(flips) < 36  # about half of 46
    again = TrainLoader(shards, batch_size=23, seed=4, random_flip=True, num_workers=2)
    L2 = TrainLoader(shards, batch_size=23, seed=4, random_flip=True, num_workers=0)
    torch.testing.assert_close(next(again), next(L2), rtol=0, atol=0)
    off = TrainLoader(shards, batch_size=23, seed=4, random_flip=False, num_workers=0)
    assert all(k in table for k in (x.numpy().tobytes() for x in to_uint8(next(off))))


def test_order_is_the_seeded_permutation_of_each_epoch(shards):
    """The stream is pinned, not just exactly-once: epoch e visits the samples (manifest order) in
    numpy PCG64 default_rng([seed, e]).permutation(N) and mirrors sample i where
    default_rng([seed, e, 1]).integers(0, 2, N)[i] (pipeline.rng's docstring). A checkpoint of an
    earlier version resumes the same data only while this holds."""
    _, imgs = key_of(shards)
    keys = list(imgs)  # manifest order (iter_split)
    N, seed = len(keys), 11
    L = TrainLoader(shards, batch_size=N, seed=seed, random_flip=True, num_workers=0)
    for e in range(2):  # one batch = one epoch
        perm = np.random.default_rng([seed, e]).permutation(N)
        flips = np.random.default_rng([seed, e, 1]).integers(0, 2, N).astype(bool)
        want = torch.stack([imgs[keys[i]].flip(-1) if flips[i] else imgs[keys[i]] for i in perm])
        assert torch.equal(to_uint8(next(L)), want), f"epoch {e}"


def corrupt_member(shard_path, index=0):
    """Overwrite the data of one tar member with garbage of the same length; returns its key."""
    with tarfile.open(shard_path) as tar:
        m = [x for x in tar if x.isfile()][index]
    with open(shard_path, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"\x89PNG garbage" + bytes(m.size - 12))
    return m.name.rsplit(".", 1)[0]


def test_corrupt_sample_is_replaced_counted_and_capped(tmp_path):
    d = make_shards(tmp_path / "s", n_train=10, n_test=2, shard_size=5)
    key = corrupt_member(d / "train-000001.tar", 2)
    L = TrainLoader(d, batch_size=10, seed=0, num_workers=1, max_corrupt=1)
    b = next(L)
    assert b.shape == (10, 3, 32, 32) and torch.isfinite(b).all()
    assert L.skipped == 1 and list(L.corrupt) == [f"{d / 'train-000001.tar'}:{key}"]
    next(L)
    assert L.skipped == 2 and len(L.corrupt) == 1  # the same sample next epoch: one distinct corrupt
    strict = TrainLoader(d, batch_size=10, seed=0, num_workers=0, max_corrupt=0)
    with pytest.raises(DataError, match=rf"train-000001.tar: corrupt sample {key}"):
        next(strict)


def test_iter_split_each_sample_once_over_ranks(shards):
    _, imgs = key_of(shards, "test")
    assert len(imgs) == 7
    per_rank = [[k for _, keys in iter_split(shards, "test", 2, rank=r, world_size=3, with_keys=True)
                 for k in keys] for r in range(3)]
    assert [len(p) for p in per_rank] == [2, 2, 3]
    assert sum(per_rank, []) == list(imgs)  # no overlap, nothing missing, manifest order
    x = next(iter_split(shards, "test", 4))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)


def test_shard_glob_source(shards):
    L = TrainLoader(str(shards / "train-*.tar"), batch_size=4, num_workers=0)
    assert L.num_samples == 23
    with pytest.raises(DataError, match="no such"):
        TrainLoader(str(shards / "nope-*.tar"), batch_size=4)


def test_formats_and_decoders_give_identical_batches(tmp_path):
    """npy, PNG (Pillow or torchvision decoder) hold the same pixels; uint8 output = float before scaling."""
    kw = dict(n_train=9, n_test=1, seed=3, shard_size=4)
    npy = make_shards(tmp_path / "npy", fmt="npy", **kw)
    png = make_shards(tmp_path / "png", fmt="png", **kw)
    ref = next(TrainLoader(npy, batch_size=9, seed=2, num_workers=0))
    for decoder in ("pil", "torchvision"):
        torch.testing.assert_close(next(TrainLoader(png, batch_size=9, seed=2, num_workers=0, decoder=decoder)),
                                   ref, rtol=0, atol=0)
    u8 = next(TrainLoader(png, batch_size=9, seed=2, num_workers=1, dtype=torch.uint8))
    assert u8.dtype == torch.uint8
    torch.testing.assert_close(u8.float() / 127.5 - 1, ref, rtol=0, atol=0)


def _gloo_worker(rank, world, init_file, shards, out_dir, steps):
    # A forked child must not enter an OpenMP parallel region: the parent's OpenMP pool (used by
    # earlier tests) does not survive fork and the child would hang in its first parallel op.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    table, _ = key_of(shards)
    loader = TrainLoader(shards, batch_size=3, rank=rank, world_size=world, seed=11, random_flip=False,
                         num_workers=2)
    mine = [keys_of_batch(next(loader), table) for _ in range(steps)]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        stream = [k for step in range(steps) for r in range(world) for k in gathered[r][step]]
        (out_dir / "stream.json").write_text(json.dumps({"stream": stream, "state": loader.state_dict()}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_exactly_once_two_processes_gloo_two_workers_each(shards, tmp_path):
    """Real processes (gloo) with 2 DataLoader workers each: every key once per epoch, and the
    global stream equals the single-process one (world-size independence)."""
    steps = 10  # 10 x 6 = 60 positions: 2 full epochs of 23 and part of a third
    # fork: real separate processes without re-importing torch in each (spawn costs ~30 s here)
    mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "init"), shards, tmp_path, steps), nprocs=2,
                       join=True, start_method="fork")
    got = json.loads((tmp_path / "stream.json").read_text())
    table, _ = key_of(shards)
    N = len(table)
    for e in range(2):
        assert sorted(got["stream"][e * N:(e + 1) * N]) == sorted(table.values())
    single = TrainLoader(shards, batch_size=6, seed=11, random_flip=False, num_workers=0)
    assert got["stream"] == [k for _ in range(steps) for k in keys_of_batch(next(single), table)]
    assert got["state"]["position"] == 60 and got["state"]["epoch"] == 2


def test_shards_are_plain_webdataset_and_foreign_shards_work(shards, tmp_path):
    """The webdataset library reads our shards (key + .npy), and we read a foreign shard whose
    samples have several members (image + label), one sample per key."""
    import webdataset as wds  # here: webdataset is in the test extra for this test only

    table, imgs = key_of(shards)
    ds = wds.WebDataset(str(shards / "train-{000000..000004}.tar"), shardshuffle=False, empty_check=False).decode()
    got = {s["__key__"]: s["npy"] for s in ds}
    assert set(got) == set(imgs)
    k = next(iter(imgs))
    np.testing.assert_array_equal(got[k], imgs[k].permute(1, 2, 0).numpy())

    foreign = tmp_path / "foreign-000000.tar"
    with tarfile.open(foreign, "w") as tar:
        for i in range(3):
            for name, data in ((f"dir/s{i}.cls", b"7"), (f"dir/s{i}.png", None)):
                if data is None:
                    buf = io.BytesIO()
                    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buf, format="PNG")
                    data = buf.getvalue()
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    x, keys = next(iter_split([str(foreign)], "train", 8, with_keys=True))
    assert keys == ["dir/s0", "dir/s1", "dir/s2"] and x.shape == (3, 3, 8, 8)
    assert x[:, 0, 0, 0].tolist() == [0, 40, 80]


def test_damaged_shard_names_the_file(tmp_path):
    d = make_shards(tmp_path / "s", n_train=6, n_test=1, shard_size=3)
    (d / "train-000001.tar").write_bytes(b"\0" * 100)  # cut short: not a tar any more
    # Counted like corrupt samples (tests/test_corrupt_reporting.py); past max_corrupt, an error naming it.
    L = TrainLoader(d, batch_size=6, seed=0, num_workers=0, max_corrupt=0)
    with pytest.raises(DataError, match="train-000001.tar"):
        next(L)
