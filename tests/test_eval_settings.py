"""One rule for every eval setting: the command-line argument, else the recipe's eval.*, else the
default. nll and figures follow it like sample, fid and is (their seed and precision included)."""

import dataclasses
import json

import pytest

from eval.__main__ import main
from eval.common import resolve
from support.folder_shards import make_folder_shards
from support.model import make_checkpoint, tiny_recipe


def test_resolve_argument_then_recipe_then_default():
    r = tiny_recipe()
    r = dataclasses.replace(r, eval=dataclasses.replace(r.eval, seed=5))
    assert resolve(3, r, "eval.seed", 7) == 3
    assert resolve(0, r, "eval.seed", 7) == 0  # 0 is an argument, not "unset"
    assert resolve(None, r, "eval.seed", 7) == 5
    assert r.eval.var_type is None and resolve(None, r, "eval.var_type", "fixed_small") == "fixed_small"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint whose recipe sets eval.seed and eval.mixed_precision away from their defaults."""
    root = tmp_path_factory.mktemp("settings")
    shards = make_folder_shards(root / "d", n=6, size=8, test_count=2)
    r = tiny_recipe(timesteps=10, shards=str(shards))
    r = dataclasses.replace(r, eval=dataclasses.replace(r.eval, seed=5, mixed_precision="bf16"))
    return make_checkpoint(root / "ck", r)


def _run(command, ckpt, out, *args):
    assert main([command, str(ckpt), "--out", str(out), *map(str, args)]) == 0
    return json.loads((out / "results.json").read_text())["evaluations"][command]


def test_nll_takes_seed_and_precision_from_the_recipe(ckpt, tmp_path):
    got = _run("nll", ckpt, tmp_path / "recipe")
    assert (got["protocol"]["seed"], got["protocol"]["precision"]) == (5, "bf16")
    same = _run("nll", ckpt, tmp_path / "args", "--seed", 5, "--precision", "bf16")
    assert same["metrics"]["bpd"] == got["metrics"]["bpd"]  # the settings reach the computation
    other = _run("nll", ckpt, tmp_path / "override", "--seed", 0, "--precision", "no")
    assert (other["protocol"]["seed"], other["protocol"]["precision"]) == (0, "no")
    assert other["metrics"]["bpd"] != got["metrics"]["bpd"]


def test_figures_take_seed_and_precision_from_the_recipe(ckpt, tmp_path):
    got = _run("figures", ckpt, tmp_path / "recipe", "--which", 5, "--num-images", 2)
    assert (got["protocol"]["seed"], got["protocol"]["precision"]) == (5, "bf16")
    same = _run("figures", ckpt, tmp_path / "args", "--which", 5, "--num-images", 2, "--seed", 5, "--precision", "bf16")
    assert same["metrics"]["fig5"] == got["metrics"]["fig5"]
    other = _run("figures", ckpt, tmp_path / "override", "--which", 5, "--num-images", 2, "--seed", 0)
    assert (other["protocol"]["seed"], other["protocol"]["precision"]) == (0, "bf16")
    assert other["metrics"]["fig5"] != got["metrics"]["fig5"]
