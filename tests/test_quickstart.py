"""The quickstart chain end to end (slow): data_prep -> 2-process training -> eval -> Hub -> back."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_quickstart_chain(tmp_path):
    from scripts.quickstart import quickstart

    # 200 steps: the first sample grid (train.sample_every) and an NLL well under 8 bits/dim.
    s = quickstart(tmp_path / "qs", steps=200, images=300, samples=16, nll_images=16)
    grid = np.asarray(Image.open(s["sample_grid"]))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0
    assert 0 < s["nll_bpd"] < 8  # beats the uniform 8 bits/dim
    assert s["hub_round_trip_equal"]
    assert sorted(s["fid_by_step"]) == [50, 100, 150, 200] and s["best_snapshot"].endswith(".safetensors")
    results = json.loads(Path(s["results"]).read_text())
    assert {"fid", "nll"} <= set(results["evaluations"])
    assert list(Path(s["figures"]).glob("*.png"))
    assert list(Path(s["hub_samples"]).rglob("*"))
