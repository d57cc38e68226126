"""Recipes: typed, validated at load, errors that name the file, key and closest valid key."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import build
from pipeline.config import Recipe, RecipeError, check_paths, load_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

# Parameter counts of the paper's models (Appendix B; the original code's counts).
PAPER_PARAMS = {"cifar10": 35.75e6, "lsun256": 113.67e6, "celebahq256": 113.67e6, "lsun256_large": 255.68e6}


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_all_recipes_load_and_round_trip(tmp_path):
    assert {p.stem for p in RECIPES} >= {
        "cifar10", "celebahq256", "lsun_bedroom", "lsun_bedroom_large", "lsun_church", "lsun_cat", "quickstart",
    }
    for path in RECIPES:
        r = load_recipe(path)
        save_recipe(r, tmp_path / "saved.yaml")
        assert load_recipe(tmp_path / "saved.yaml") == r, path.name


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "quickstart"], ids=lambda p: p.stem)
def test_paper_recipes_build_paper_models(path):
    r = load_recipe(path)
    with torch.device("meta"):
        net = build.unet(r.model)
    n = sum(p.numel() for p in net.parameters())
    assert n == pytest.approx(PAPER_PARAMS[r.model.preset], rel=1e-3)
    # Appendix B of the paper: the 256x256 models use lr 2e-5 at batch 64, CIFAR-10 2e-4 at 128.
    if r.model.preset == "cifar10":
        assert (r.train.lr, r.train.global_batch_size, r.diffusion.var_type) == (2e-4, 128, "fixed_large")
    else:
        assert (r.train.lr, r.train.global_batch_size, r.diffusion.var_type) == (2e-5, 64, "fixed_small")
    assert r.data.random_flip == (not path.stem.startswith("lsun_bedroom"))  # the paper's text, App. B


def test_overrides_are_typed():
    r = load_recipe(ROOT / "recipes/quickstart.yaml", ["train.lr=3e-4", "model.ch_mult=[1,2,2]",
                                                      "train.mixed_precision=no", "run.name=me/tiny"])
    assert r.train.lr == 3e-4 and isinstance(r.train.lr, float)
    assert r.model.ch_mult == (1, 2, 2)
    assert r.train.mixed_precision == "no"
    assert r.run.name == "me/tiny"


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("train:\n  lrr: 1.0e-4\n", [], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian:\n  lr: 1.0e-4\n", [], "unknown key 'trian' (did you mean 'train'?)"),
        ("train:\n  max_steps: many\n", [], "train.max_steps: expected int, got 'many'"),
        ("diffusion:\n  var_type: fixed_medium\n", [], "diffusion.var_type: 'fixed_medium' is not one of"),
        ("model:\n  preset: cifar\n", [], "unknown preset 'cifar' (did you mean 'cifar10'?)"),
        ("", ["train.warmup_step=10"], "unknown key 'train.warmup_step' (did you mean 'train.warmup_steps'?)"),
        ("", ["lr=1"], "must be section.key"),
        ("", ["train.learning_rate=1e-4"], "unknown key 'train.learning_rate' (did you mean 'train.lr'?)"),
        ("", ["train.ema_decay=1.5"], "train.ema_decay: must be in [0, 1)"),
    ],
)
def test_bad_recipes_name_file_and_key(tmp_path, text, overrides, expected):
    p = write(tmp_path, "model:\n  preset: cifar10\n" + text if "preset" not in text else text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, overrides)
    assert str(p) in str(e.value)
    assert expected in str(e.value)


def test_missing_file_and_missing_shards(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    r = load_recipe(ROOT / "recipes/cifar10.yaml", [f"data.shards={tmp_path}/none"])
    with pytest.raises(RecipeError, match="no manifest.json"):
        check_paths(r, "cifar10.yaml")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(RecipeError, match="splits: expected an object"):
        check_paths(load_recipe(ROOT / "recipes/cifar10.yaml", [f"data.shards={tmp_path}"]))
    (tmp_path / "manifest.json").write_text(
        '{"resolution": 32, "splits": {"train": {"count": 1, "shards": [{"name": "train-000000.tar", "count": 1}]}}}')
    check_paths(load_recipe(ROOT / "recipes/cifar10.yaml", [f"data.shards={tmp_path}"]))


def test_saved_recipe_is_plain_yaml(tmp_path):
    r = load_recipe(ROOT / "recipes/lsun_bedroom.yaml")
    save_recipe(r, tmp_path / "c.yaml")
    d = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert d["model"]["preset"] == "lsun256" and d["train"]["adam_betas"] == [0.9, 0.999]
    assert Recipe.from_dict(d) == r


def test_checkpoints_saved_with_the_removed_keys_still_load():
    """save_recipe wrote every key, so older config.yaml files (run directories, pushed Hub repos)
    hold data.split and the hub section, with whatever values the recipe set: they load, mean
    what they meant, and a warning says the keys are ignored."""
    d = load_recipe(ROOT / "recipes/cifar10.yaml").to_dict()
    d["data"]["split"] = "train"
    d["hub"] = {"repo_id": "alice/ddpm", "private": True, "revision": None, "format": "native",
                "push_after_eval": True}
    with pytest.warns(UserWarning) as caught:
        assert Recipe.from_dict(d, source="old/config.yaml") == load_recipe(ROOT / "recipes/cifar10.yaml")
    messages = [str(w.message) for w in caught]
    assert any("old/config.yaml: 'data.split' is no longer used" in m for m in messages)
    assert any("'hub' is no longer used" in m and "eval push" in m for m in messages)


def test_schema_imports_without_torch():
    """The schema validates a recipe before any heavy import (a launcher, a login node)."""
    code = "import sys, pipeline.config; assert 'torch' not in sys.modules, 'pipeline.config imported torch'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
