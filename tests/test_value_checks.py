"""Every value is checked before any work (issue 13): recipe ranges, shard manifests, the
model's resolution against the shards', train.init_from, mistyped local paths, and flags
mixed with overrides in any order."""

from __future__ import annotations

import copy
import json

import pytest
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import save_file

from pipeline import train as train_cli
from pipeline.config import RecipeError, check_paths, load_recipe
from pipeline.data import DataError, ShardSet
from pipeline.hub import load_pretrained
from pipeline.trainer import train
from pipeline.weights import LoadError
from support.training import make_tiny_shards, write_recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards") / "s")


@pytest.fixture
def recipe(tmp_path, shards):
    return write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run")


RANGES = [
    ("train.grad_clip=0", "train.grad_clip: must be positive"),
    ("train.grad_clip=-1", "train.grad_clip: must be positive"),
    ("train.adam_betas=[0.9,1.0]", "train.adam_betas: each must be in [0, 1)"),
    ("train.adam_betas=[-0.1,0.999]", "train.adam_betas: each must be in [0, 1)"),
    ("train.adam_eps=0", "train.adam_eps: must be positive"),
    ("train.weight_decay=-0.01", "train.weight_decay: must be >= 0"),
    ("train.log_every=0", "train.log_every: must be at least 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every: must be positive"),
    ("train.lr=.inf", "train.lr: must be finite"),
    ("train.lr=.nan", "train.lr: must be finite"),
    ("train.ema_decay=.nan", "train.ema_decay: must be finite"),
    ("model.dropout=1.0", "model.dropout: must be in [0, 1)"),
    ("model.dropout=-0.1", "model.dropout: must be in [0, 1)"),
    ("model.ch=48", "model.ch: must be a positive multiple of 32"),
    ("model.ch_mult=[]", "model.ch_mult: must not be empty"),
    ("model.ch_mult=[1,0]", "model.ch_mult: every multiplier must be at least 1"),
    ("model.ch_mult=[1,1,1,1,1,1]", "model.resolution: 16 is not divisible by 2**5"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0"),
    ("data.max_corrupt=-1", "data.max_corrupt: must be >= 0"),
    ("train.max_nonfinite=0", "train.max_nonfinite: must be at least 1"),
    ("eval.batch_size=0", "eval.batch_size: must be at least 1"),
]


@pytest.mark.parametrize("override, want", RANGES)
def test_recipe_ranges_refused_before_any_work(recipe, tmp_path, capsys, override, want):
    assert train_cli.main([str(recipe), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    assert not (tmp_path / "run").exists()  # nothing was built or written


def test_flags_and_overrides_mix_in_any_order(recipe, capsys):
    for argv in ([str(recipe), "--dry-run", "train.lr=1e-4"], ["--dry-run", str(recipe), "train.lr=1e-4"],
                 [str(recipe), "train.lr=1e-4", "--dry-run", "train.max_steps=3"]):
        assert train_cli.main(argv) == 0, capsys.readouterr().err
        assert "lr: 0.0001" in capsys.readouterr().out


def test_model_resolution_must_match_the_shards(recipe, tmp_path, capsys):
    assert train_cli.main([str(recipe), "model.resolution=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model resolution 32 does not match the shards' resolution 16" in err[0]
    assert not (tmp_path / "run").exists()


GOOD = {"resolution": 16, "splits": {"train": {"count": 3, "shards": [{"name": "train-000000.tar", "count": 3}]}}}


def _mutate(path: str, value):
    m = copy.deepcopy(GOOD)
    *parents, last = path.split("/")
    node = m
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last if not isinstance(node, list) else int(last)] = value
    return m


@pytest.mark.parametrize("manifest, want", [
    ([], "a manifest is a JSON object"),
    (_mutate("resolution", "16"), "resolution: expected a positive integer"),
    (_mutate("resolution", 0), "resolution: expected a positive integer"),
    (_mutate("splits", []), "splits: expected an object"),
    (_mutate("splits/train/count", -3), "splits.train: expected {count"),
    (_mutate("splits/train/count", True), "splits.train: expected {count"),
    (_mutate("splits/train/count", 4), "splits.train.count: 4, but its shards hold 3"),
    (_mutate("splits/train/shards", "train-000000.tar"), "splits.train: expected {count"),
    (_mutate("splits/train/shards/0/count", "3"), "shards[0]: expected {name, count"),
    (_mutate("splits/train/shards/0/name", "../../etc/passwd.tar"), "is not a plain .tar file name"),
    (_mutate("splits/train/shards/0/name", "/abs/train.tar"), "is not a plain .tar file name"),
])
def test_manifests_are_checked(tmp_path, manifest, want):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    r = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path / "run"))
    with pytest.raises(RecipeError) as e:
        check_paths(r, "r.yaml")
    assert str(e.value).startswith(f"r.yaml: data.shards: {tmp_path / 'manifest.json'}: ") and want in str(e.value)
    with pytest.raises(DataError) as e:
        ShardSet(tmp_path)
    assert want in str(e.value)


def test_init_from_checked(tmp_path, shards, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    r = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run")
    for src in ("runs/typo", str(tmp_path / "nope.safetensors"), "./a/b"):
        assert train_cli.main([str(r), f"train.init_from={src}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"train.init_from: {src!r}: no such file or directory"), err
    # Weights of another model: one line naming the mismatched shapes, not a torch traceback.
    bad = tmp_path / "other.safetensors"
    from support.model import tiny_unet

    save_file(tiny_unet(ch=64).state_dict(), str(bad))
    rec = load_recipe(write_recipe(tmp_path / "r2.yaml", shards, tmp_path / "run2", train={"init_from": str(bad)}))
    try:
        with pytest.raises(RecipeError, match=r"weights do not fit the model .*shapes \['"):
            train(rec)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_mistyped_local_path_is_not_a_hub_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(LoadError, match=r"runs/cifra10: no such file or directory \(runs/ exists here"):
        load_pretrained("runs/cifra10")
    with pytest.raises(LoadError, match="no such file or directory, and not a Hub repo id"):
        load_pretrained("./runs/x/y")
