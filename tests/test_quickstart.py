"""The quickstart chain end to end (slow): data_prep -> 2-process training -> eval -> Hub -> back."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_quickstart_chain(tmp_path):
    from scripts.quickstart import quickstart

    # 200 steps: an NLL well under 8 bits/dim (whether samples read as digits: test_learning.py).
    s = quickstart(tmp_path / "qs", steps=200, images=300, samples=16, nll_images=16)
    grid = np.asarray(Image.open(s["sample_grid"]))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0
    assert 0 < s["nll_bpd"] < 8  # beats the uniform 8 bits/dim
    assert s["hub_round_trip_equal"]
    assert sorted(s["fid_by_step"]) == [50, 100, 150, 200] and s["best_snapshot"].endswith(".safetensors")
    # The digit scores: samples, the two ends of the scale, and every snapshot.
    d = s["digits"]
    assert [d[k]["images"] for k in ("samples", "training images", "held-out images", "noise")] == [16, 284, 16, 16]
    assert d["training images"]["confident"] > 0.7 and d["noise"]["confident"] == 0
    assert sorted(s["digits_by_step"]) == [50, 100, 150, 200]
    figure = np.asarray(Image.open(s["figure"]))  # 16 samples: 2 rows of 8 samples, a grey tile, 8 digits; 4x
    assert figure.shape == (2 + 2 * (32 + 2), 2 + 17 * (32 + 2), 3)
    results = json.loads(Path(s["results"]).read_text())
    assert {"fid", "nll"} <= set(results["evaluations"])
    assert list(Path(s["figures"]).glob("*.png"))
    assert list(Path(s["hub_samples"]).rglob("*"))
