"""eval nll --also-train: the training split's bound beside the test split's, and the gap
(Table 1 reports both on CIFAR-10: <= 3.75 test, 3.72 train)."""

import json

from eval.common import load_model
from eval.nll import run_nll
from pipeline.config import save_recipe
from support.cli import run_eval
from support.folder_shards import make_folder_shards
from support.model import make_checkpoint, tiny_recipe
from support.oracle import oracle_bpd, oracle_factory


def test_train_split_and_gap_through_the_cli(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=9, size=8, test_count=3)
    ckpt = make_checkpoint(tmp_path / "ck", tiny_recipe(shards=str(shards)))
    out = tmp_path / "out"
    r = run_eval("nll", ckpt, "--out", out, "--also-train", "--batch-size", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["evaluations"]["nll"]
    m, proto = res["metrics"], res["protocol"]
    assert m["num_images"] == 3 and m["train_num_images"] == 6
    assert proto["train_split"] == "train" and proto["train_complete_split"]
    assert abs(m["gap_bpd"] - (m["bpd"] - m["train_bpd"])) < 1e-12
    assert m["gap_bpd_sem"] > 0 and "train images; gap test - train" in r.stdout
    # the same numbers as bounding the train split on its own
    direct = run_nll(load_model(str(ckpt)), str(shards), split="train", batch_size=4, t_batch=5, progress=False)
    assert direct["num_images"] == 6 and abs(direct["bpd"] - m["train_bpd"]) < 1e-5 * direct["bpd"]
    r = run_eval("nll", ckpt, "--out", tmp_path / "lim", "--also-train", "--train-limit", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    lim = json.loads((tmp_path / "lim" / "results.json").read_text())["evaluations"]["nll"]
    assert lim["metrics"]["train_num_images"] == 2 and not lim["protocol"]["train_complete_split"]


def test_oracle_of_the_test_image_is_worse_on_the_train_split(tmp_path):
    """The exact model of a one-image test split knows nothing of the train images: the train
    bound is far above the test bound's closed form, so the gap shows which split was read."""
    shards = make_folder_shards(tmp_path / "d", n=4, size=8, test_count=1, smooth=False)
    src = tmp_path / "oracle"
    src.mkdir()
    save_recipe(tiny_recipe(timesteps=100, shards=str(shards)), src / "config.yaml")
    out = tmp_path / "out"
    r = run_eval("nll", src, "--out", out, "--model-factory", "support.oracle:oracle_factory",
                 "--also-train", "--t-batch", 50)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "results.json").read_text())["evaluations"]["nll"]["metrics"]
    p = oracle_factory(str(src))
    want = oracle_bpd(p.model.x_star[0].float(), p.diffusion)["total"]
    assert abs(m["bpd"] - want) < 2e-3 * want
    assert m["train_num_images"] == 3 and m["gap_bpd"] < -1.0
