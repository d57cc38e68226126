"""Issue 24: the launcher's precision, the recorded command, public cards, EMA warm-up."""

from __future__ import annotations

import pytest

from eval.model_card import card_metadata
from eval.public import public_recipe, public_text
from pipeline.config import RecipeError
from pipeline.ema import warmup_decay
from pipeline.launcher import check_precision, launch_command
from support.hub_models import make_run


def test_launcher_precision_that_disagrees_is_refused():
    assert check_precision("no", {"ACCELERATE_MIXED_PRECISION": "no"}) == "no"
    assert check_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "no"}) == "bf16"  # the launcher's default
    assert check_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    with pytest.raises(RecipeError, match="add train.mixed_precision=bf16"):
        check_precision("no", {"ACCELERATE_MIXED_PRECISION": "bf16"})


def test_command_is_the_one_run_without_local_paths(tmp_path):
    parent = ["/v/bin/python", "/v/bin/accelerate", "launch", "--num_processes", "2", "--config_file",
              str(tmp_path / "a.yaml"), "-m", "pipeline.train", str(tmp_path / "r.yaml")]
    cmd = launch_command(["python", "-m", "pipeline.train", "r.yaml"], parent, cwd=tmp_path)
    assert cmd == "accelerate launch --num_processes 2 --config_file a.yaml -m pipeline.train r.yaml"
    one = launch_command(["/v/bin/python", "/v/bin/ddpm-train", "r.yaml"], ["bash"], cwd=tmp_path)
    assert one == "ddpm-train r.yaml"


def test_public_recipe_and_text_hold_no_absolute_path(tmp_path):
    d = public_recipe({"data": {"shards": "/home/me/data/cifar10"}, "run": {"output_dir": "/scratch/runs/x"},
                       "eval": {"fid_reference": None}, "train": {"init_from": None}})
    assert d["data"]["shards"] == "cifar10" and d["run"]["output_dir"] == "x"
    assert public_text("python /home/me/x/ddpm-train /data/r.yaml a=1") == "python ddpm-train r.yaml a=1"


def test_diffusers_card_snippet_passes_T_and_no_local_path(tmp_path):
    from eval.hub_push import stage_push

    run = make_run(tmp_path / "run")
    (tmp_path / "stage").mkdir()
    files = stage_push(run, tmp_path / "stage", repo_id="alice/x", format="diffusers")
    card = files["README.md"].read_text()
    T = 1000
    assert f"num_inference_steps={T}" in card and str(tmp_path) not in card
    assert str(tmp_path) not in files["config.yaml"].read_text()
    assert card_metadata(card)["datasets"] == ["cifar10"]


def test_ema_warmup_decay():
    assert warmup_decay(0.9999, 0) == pytest.approx(0.1)
    assert warmup_decay(0.9999, 10**6) == 0.9999
    assert warmup_decay(0.9, 100) == 0.9
