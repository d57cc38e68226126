"""Corrupt samples and unreadable shards met during training are reported in the training log
as they happen (count and shard), skipped, and counted against data.max_corrupt (issue 13)."""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import pytest

from pipeline.data import DataError, TrainLoader
from support.training import make_tiny_shards


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards") / "s")  # 24 train samples, shards of 7


def _garbage(p):
    p.write_bytes(b"\x00not a tar" * 100)


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _bad_member(p):
    """Member 1 of the shard: valid tar, undecodable npy bytes of the same size."""
    with tarfile.open(p) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(p, "w") as tar:
        for k, (m, data) in enumerate(members):
            tar.addfile(m, io.BytesIO(b"\x93NUMPY garbage".ljust(len(data), b"!") if k == 1 else data))


@pytest.mark.parametrize("hurt, n_bad, why", [
    (_bad_member, 1, "ValueError"),
    (_garbage, 7, "unreadable shard"),
    (_truncate, 7, "DataError"),
])
def test_damage_is_reported_as_it_happens_and_counted(tmp_path, base, capsys, hurt, n_bad, why):
    d = tmp_path / "s"
    shutil.copytree(base, d)
    hurt(d / "train-000001.tar")
    loader = TrainLoader(d, batch_size=8, seed=0, num_workers=0, max_corrupt=10)
    batches = [next(loader) for _ in range(3)]  # one epoch: 24 samples
    assert all(b.shape == (8, 3, 16, 16) and np.isfinite(b.numpy()).all() for b in batches)
    assert loader.skipped == n_bad and len(loader.corrupt) == n_bad
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data (rank 0): corrupt sample")]
    assert len(lines) == n_bad and all("train-000001.tar replaced (" in ln and why in ln for ln in lines)
    assert lines[-1].endswith(f"{n_bad} distinct so far, max_corrupt=10")
    loader.close()


def test_unreadable_shard_stops_at_the_same_limit(tmp_path, base):
    d = tmp_path / "s"
    shutil.copytree(base, d)
    _garbage(d / "train-000002.tar")
    loader = TrainLoader(d, batch_size=8, seed=0, num_workers=0, max_corrupt=3)
    with pytest.raises(DataError, match=r"train-000002.tar: corrupt sample .* 4 corrupt samples > max_corrupt=3"):
        for _ in range(3):
            next(loader)


def test_training_stores_the_corrupt_samples_in_trainer_state(tmp_path, base):
    """README: corrupt samples met in training are stored in trainer_state.json (and so survive
    a resume), keyed by shard and sample, with the reason."""
    from accelerate.state import AcceleratorState, GradientState

    from pipeline import checkpoint as ck
    from pipeline.config import load_recipe
    from pipeline.trainer import train
    from support.training import write_recipe

    d = tmp_path / "s"
    shutil.copytree(base, d)
    _bad_member(d / "train-000001.tar")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", d, tmp_path / "run",
                                      train={"max_steps": 6, "checkpoint_every": 6}))  # one epoch of 24
    try:
        assert train(recipe) == 0
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    data = ck.read_trainer_state(ck.latest_checkpoint(tmp_path / "run"))["data"]
    assert data["skipped"] == 1 and len(data["corrupt"]) == 1
    (where, reason), = data["corrupt"].items()
    assert where.startswith(str(d / "train-000001.tar") + ":") and "ValueError" in reason
