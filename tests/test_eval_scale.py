"""Evaluation at paper scale: statistics gathered over processes, standard statistics files in and
out, outside samples (ADM .npz / PNG folder), Inception weights that never unpickle, the paper's
protocol flag and bad input refused in one line."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from eval.__main__ import main as eval_main
from eval.features import Moments, features, load_extractor, load_stats, statistics
from eval.outside import load_outside
from eval.results import mark_paper_protocol
from support.cli import PY, eval_env, run_eval
from support.features import fid_by_hand, register_tiny_features, train_images
from support.folder_shards import make_folder_shards
from support.model import make_checkpoint, tiny_recipe

TINY = "tiny-seeded=support.features:TinyFeatures"


def _samples(seed=3, n=20, size=8):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_folder_shards(tmp_path_factory.mktemp("d"), n=30, size=8, test_count=2)


def _fid(tmp_path, *args):
    out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
    assert eval_main(["fid", *map(str, args), "--out", str(out), "--feature-extractor", TINY]) == 0
    return json.loads((out / "results.json").read_text())["evaluations"]["fid"]


def test_chan_moments_match_numpy_cov_in_any_grouping():
    f = torch.from_numpy(np.random.default_rng(0).normal(3, 2, (101, 7)))
    whole, parts = Moments(), Moments()
    whole.add(f)
    for lo, hi in ((0, 1), (1, 40), (40, 101)):  # uneven parts, one of a single row
        part = Moments()
        part.add(f[lo:hi])
        parts.merge(part.n, part.mean, part.m2)
    want = statistics(f.numpy())
    for m in (whole, parts):
        s = m.statistics()
        np.testing.assert_allclose(s["mu"], want["mu"], rtol=1e-13, atol=0)
        np.testing.assert_allclose(s["sigma"], want["sigma"], rtol=1e-12, atol=1e-13)


def test_ref_stats_npz_gives_the_same_fid_as_the_shards(shards, tmp_path):
    npz = tmp_path / "ref.npz"
    assert eval_main(["ref-stats", str(shards), "--out", str(npz), "--feature-extractor", TINY,
                      "--feature-batch-size", "7"]) == 0
    stats, proto = load_stats(npz)
    assert stats["n"] == 28 and stats["mu"].dtype == np.float64 and stats["sigma"].shape == (16, 16)
    assert proto["split"] == "train" and proto["reference_count"] == 28
    with np.load(npz) as z:  # what pytorch-fid / the ADM evaluator read: plain float64 mu, sigma
        assert z["mu"].dtype == np.float64 and z["sigma"].dtype == np.float64
    fe = load_extractor(register_tiny_features())
    direct = statistics(features(train_images(shards), fe, progress=False))
    np.testing.assert_allclose(stats["sigma"], direct["sigma"], rtol=1e-12, atol=1e-15)
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=_samples())
    a = _fid(tmp_path, "--samples", samples, "--reference", shards, "--cache-dir", tmp_path / "c")
    b = _fid(tmp_path, "--samples", samples, "--reference", npz)
    assert a["metrics"]["fid"] == pytest.approx(b["metrics"]["fid"], rel=1e-12)
    want = fid_by_hand(features(_samples(), fe, progress=False), features(train_images(shards), fe, progress=False))
    assert b["metrics"]["fid"] == pytest.approx(want, rel=1e-6)
    assert b["protocol"]["reference"] == str(npz) and b["protocol"]["reference_count"] == 28
    # outside samples: not the paper's protocol, and the card-facing caveats say why
    assert b["protocol"]["paper_protocol"] is False
    assert any("20 samples" in c for c in b["protocol"]["paper_protocol_caveats"])


def test_adm_npz_and_png_folder_give_the_same_fid(shards, tmp_path):
    x = _samples(5, n=17)
    np.savez(tmp_path / "adm.npz", arr_0=x)
    folder = tmp_path / "png"
    folder.mkdir()
    for i, im in enumerate(x):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    ref = ["--reference", str(shards), "--cache-dir", str(tmp_path / "c")]
    a = _fid(tmp_path, "--samples", tmp_path / "adm.npz", *ref)
    b = _fid(tmp_path, "--samples", folder, *ref)
    assert a["metrics"]["fid"] == b["metrics"]["fid"] and a["protocol"]["num_samples_scored"] == 17
    # np.savez_compressed (read whole) and np.savez (memory-mapped, never copied per process) agree
    np.savez_compressed(tmp_path / "adm_z.npz", arr_0=x)
    assert _fid(tmp_path, "--samples", tmp_path / "adm_z.npz", *ref)["metrics"]["fid"] == a["metrics"]["fid"]
    assert isinstance(load_outside(tmp_path / "adm.npz"), np.memmap)


def test_eval_sample_writes_the_adm_npz(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    out = tmp_path / "o"
    assert eval_main(["sample", str(ck), "--out", str(out), "--num-samples", "5", "--chunk-size", "2",
                      "--npz", str(tmp_path / "x.npz")]) == 0  # streamed chunk by chunk
    np.testing.assert_array_equal(load_outside(tmp_path / "x.npz"), np.load(tmp_path / "x.npz")["arr_0"])
    with np.load(tmp_path / "x.npz") as z:  # numpy's own reader
        assert z["arr_0"].shape == (5, 8, 8, 3) and z["arr_0"].dtype == np.uint8
        from eval.sample import load_samples
        np.testing.assert_array_equal(z["arr_0"], load_samples(out))


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: what a crafted weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_inception_weights_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(2), "evil": _Payload(marker)}, bad)
    with open(tmp_path / "legacy.pth", "wb") as f:  # the same in the old (non-zip) format
        pickle.dump({"evil": _Payload(marker)}, f)
    np.savez(tmp_path / "s.npz", arr_0=_samples())
    for weights, how in ((bad, "flag"), (tmp_path / "legacy.pth", "env")):
        for metric in ("fid", "is"):
            args = [metric, "--samples", tmp_path / "s.npz", "--out", tmp_path / f"o-{metric}"]
            env = eval_env(DDPM_CACHE=str(tmp_path / "cache"))
            if how == "flag":
                args += ["--inception-weights", weights]
            else:
                env["DDPM_INCEPTION_WEIGHTS"] = str(weights)
            r = run_eval(*args, env=env, timeout=300)
            assert r.returncode == 2, r.stderr[-2000:]
            assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
            assert str(weights) in r.stderr and "unpickling" in r.stderr
            assert not marker.exists()  # the payload never ran
            assert not (tmp_path / f"o-{metric}" / "results.json").exists()


def _torch_fidelity_style_weights(path):
    """A file in the layout of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (its
    InceptionV3 state dict, classifier included, old non-zip serialization), random weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as mod

    saved = mod.load_state_dict_from_url
    mod.load_state_dict_from_url = lambda *a, **k: {}
    try:
        class Skeleton(mod.FeatureExtractorInceptionV3):
            def load_state_dict(self, *a, **k):
                return None
        torch.manual_seed(0)
        net = Skeleton("inception-v3-compat", ["logits_unbiased"])
    finally:
        mod.load_state_dict_from_url = saved
    sd = net.state_dict()
    for k, v in sd.items():
        if k.endswith("running_var"):
            v.fill_(1.0)
    sd["fc.weight"].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))  # peaked class predictions
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    return sd


def test_inception_score_offline_from_torch_fidelity_weights_file(tmp_path):
    from torch_fidelity.metric_isc import isc_features_to_metric

    weights = tmp_path / "weights-inception.pth"
    _torch_fidelity_style_weights(weights)
    x = _samples(7, n=30, size=16)  # 3 per split of 10
    np.savez(tmp_path / "s.npz", arr_0=x)
    out = tmp_path / "o"
    assert eval_main(["is", "--samples", str(tmp_path / "s.npz"), "--out", str(out),
                      "--inception-weights", str(weights), "--feature-batch-size", "5"]) == 0
    got = json.loads((out / "results.json").read_text())["evaluations"]["is"]["metrics"]
    # independent: torch-fidelity's own loader (torch.load of the file we made) and its IS
    import torch_fidelity.feature_extractor_inceptionv3 as mod
    ref = mod.FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"],
                                          feature_extractor_weights_path=str(weights)).eval()
    with torch.no_grad():
        logits = ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())[0]
    want = isc_features_to_metric(logits, splits=10)
    assert got["is"] == pytest.approx(want["inception_score_mean"], rel=1e-5) and got["is"] > 1.0


@pytest.mark.parametrize("args, words", [
    (["--num-samples", "0"], "--num-samples 0"),
    (["--batch-size", "-1"], "--batch-size -1"),
    (["--sampler", "ddim", "--steps", "21"], "--steps 21"),
    (["--sampler", "ddim", "--steps", "0"], "--steps 0"),
    (["--steps", "5"], "ancestral sampling"),
    (["--feature-batch-size", "0"], "feature-batch-size"),
])
def test_bad_sampling_arguments_are_errors_not_defaults(shards, tmp_path, args, words, capsys):
    ck = make_checkpoint(tmp_path / "ck")
    try:
        code = eval_main(["fid", str(ck), "--out", str(tmp_path / "o"), "--reference", str(shards), *args])
    except SystemExit as e:  # argparse's own refusal of a bad value
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "o" / "chunks").exists() or not list((tmp_path / "o" / "chunks").iterdir())


def test_bad_reference_and_sample_files_are_refused_in_one_line(shards, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=_samples())
    cases = {
        "keys.npz": dict(mean=np.zeros(16), cov=np.eye(16)),
        "shape.npz": dict(mu=np.zeros(16), sigma=np.eye(15)),
        "nan.npz": dict(mu=np.full(16, np.nan), sigma=np.eye(16)),
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        code = eval_main(["fid", "--samples", str(tmp_path / "s.npz"), "--reference", str(tmp_path / name),
                          "--out", str(tmp_path / "o"), "--feature-extractor", TINY])
        err = capsys.readouterr().err
        assert code == 2 and name in err and err.strip().count("\n") == 0, err
    np.savez(tmp_path / "f.npz", arr_0=_samples().astype(np.float32))
    np.savez(tmp_path / "nhw.npz", arr_0=_samples()[..., 0])
    for name in ("f.npz", "nhw.npz"):
        code = eval_main(["fid", "--samples", str(tmp_path / name), "--reference", str(shards),
                          "--out", str(tmp_path / "o"), "--feature-extractor", TINY])
        err = capsys.readouterr().err
        assert code == 2 and name in err and "uint8" in err
    # --samples and a model exclude each other
    ck = make_checkpoint(tmp_path / "ck")
    code = eval_main(["fid", str(ck), "--samples", str(tmp_path / "s.npz"), "--out", str(tmp_path / "o")])
    assert code == 2 and "exclude each other" in capsys.readouterr().err
    # a split of another resolution than the model's
    big = make_folder_shards(tmp_path / "big", n=4, size=16)
    code = eval_main(["fid", str(ck), "--reference", str(big), "--out", str(tmp_path / "o2"), "--num-samples", "2",
                      "--feature-extractor", TINY])
    err = capsys.readouterr().err
    assert code == 2 and "16x16" in err and "8x8" in err and not (tmp_path / "o2" / "chunks").exists()


def test_paper_protocol_only_for_the_papers_protocol():
    paper = {"sampler": "ancestral", "steps": 1000, "num_samples": 50_000, "num_samples_scored": 50_000,
             "precision": "fp32", "reference_split": "train", "reference_count": 50_000}
    assert mark_paper_protocol(dict(paper), "fid")["paper_protocol"] is True
    small = mark_paper_protocol({**paper, "num_samples": 128, "num_samples_scored": 128}, "fid")
    assert small["paper_protocol"] is False and small["paper_protocol_caveats"] == ["128 samples (paper: 50,000)"]
    for change in ({"sampler": "ddim"}, {"steps": 20}, {"reference_count": 3_000_000}, {"precision": "bf16"}):
        assert mark_paper_protocol({**paper, **change}, "fid")["paper_protocol"] is False


def test_model_card_shows_the_caveat():
    from eval.model_card import render_model_card

    proto = mark_paper_protocol({"sampler": "ancestral", "steps": 1000, "num_samples": 128,
                                 "reference_split": "train", "reference_count": 50_000}, "fid")
    card = render_model_card(tiny_recipe(), {"evaluations": {"fid": {"metrics": {"fid": 50.0}, "protocol": proto}}},
                             repo_id="me/m")
    assert "not the paper's protocol" in card and "128 samples (paper: 50,000)" in card


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_statistics(shards, tmp_path):
    """Real 2-process runs over gloo: reference statistics and the FID of outside samples."""
    np.savez(tmp_path / "s.npz", arr_0=_samples(n=21))
    two = (PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m")
    res = {}
    for name, launcher in (("one", (PY, "-m")), ("two", two)):
        r = run_eval("ref-stats", shards, "--out", tmp_path / f"{name}.npz", "--feature-extractor", TINY,
                     "--feature-batch-size", "4", launcher=launcher, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        r = run_eval("fid", "--samples", tmp_path / "s.npz", "--reference", shards, "--out", tmp_path / name,
                     "--cache-dir", tmp_path / f"c-{name}", "--feature-extractor", TINY, "--feature-batch-size", "4",
                     launcher=launcher, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        res[name] = json.loads((tmp_path / name / "results.json").read_text())["evaluations"]["fid"]
    s1, _ = load_stats(tmp_path / "one.npz")
    s2, _ = load_stats(tmp_path / "two.npz")
    assert s1["n"] == s2["n"] == 28
    np.testing.assert_allclose(s2["mu"], s1["mu"], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(s2["sigma"], s1["sigma"], rtol=1e-11, atol=1e-15)
    assert res["two"]["metrics"]["fid"] == pytest.approx(res["one"]["metrics"]["fid"], rel=1e-10)
    fe = load_extractor(register_tiny_features())
    want = fid_by_hand(features(_samples(n=21), fe, progress=False), features(train_images(shards), fe, progress=False))
    assert res["two"]["metrics"]["fid"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["cifar10", "celebahq256", "lsun_bedroom", "lsun_bedroom_large", "lsun_cat",
                                  "lsun_church"])
def test_recipes_set_the_papers_fid_protocol(name):
    from pipeline.config import load_recipe
    from support.cli import ROOT

    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert r.eval.num_samples == 50_000 and r.eval.sampler == "ancestral" and r.diffusion.timesteps == 1000
    # CIFAR-10: the whole 50k training split; the others: the first 50,000 of millions
    assert r.eval.fid_reference_count == (None if name == "cifar10" else 50_000)


def test_nll_refuses_a_split_of_another_resolution(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "ck")  # 8x8 model
    big = make_folder_shards(tmp_path / "big", n=4, size=16, test_count=2)
    code = eval_main(["nll", str(ck), "--shards", str(big), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "16x16" in err and "8x8" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_feature_net_on_the_gpu_matches_the_cpu(shards):
    """The feature pipeline (batching, device moves, statistics) on CUDA against CPU, with the
    tiny test feature net: Inception itself is not run here."""
    from eval.features import image_statistics, split_statistics

    fe_cpu = load_extractor(register_tiny_features())
    fe_gpu = load_extractor(register_tiny_features(), device="cuda")
    x = _samples(n=33)
    a, b = image_statistics(x, fe_cpu, batch_size=8), image_statistics(x, fe_gpu, batch_size=8, device="cuda")
    np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-6, atol=1e-9)
    r = split_statistics(str(shards), "train", fe_gpu, batch_size=8, device="cuda", limit=10)
    assert r["n"] == 10 and np.isfinite(r["sigma"]).all()


@pytest.mark.slow
def test_inception_score_from_two_processes_equals_one(tmp_path):
    """The logits of each process's share are gathered in order: IS's 10 splits see the same images."""
    weights = tmp_path / "w.pth"
    _torch_fidelity_style_weights(weights)
    np.savez(tmp_path / "s.npz", arr_0=_samples(9, n=23, size=16))  # 23: unequal shares
    two = (PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m")
    got = {}
    for name, launcher in (("one", (PY, "-m")), ("two", two)):
        r = run_eval("is", "--samples", tmp_path / "s.npz", "--out", tmp_path / name, "--inception-weights", weights,
                     "--feature-batch-size", "4", launcher=launcher, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        got[name] = json.loads((tmp_path / name / "results.json").read_text())["evaluations"]["is"]["metrics"]
    assert got["two"]["is"] == pytest.approx(got["one"]["is"], rel=1e-6) and got["one"]["is"] > 1.0
    assert got["two"]["is_std"] == pytest.approx(got["one"]["is_std"], rel=1e-5, abs=1e-9)


def test_sampling_precision_from_the_recipe_and_the_flag(tmp_path):
    r = tiny_recipe()
    r.eval.sampling_precision = "bf16"
    ck = make_checkpoint(tmp_path / "ck", r)
    for out, extra, want in (("a", [], "bf16"), ("b", ["--precision", "fp32"], "fp32"), ("c", ["--precision", "no"], "fp32")):
        assert eval_main(["sample", str(ck), "--out", str(tmp_path / out), "--num-samples", "2", *extra]) == 0
        proto = json.loads((tmp_path / out / "samples.json").read_text())["protocol"]
        assert proto["precision"] == want
        assert (want == "bf16") == any("bf16" in c for c in proto["paper_protocol_caveats"])


def test_pickle_payload_in_a_cached_weights_file_is_refused(tmp_path):
    """The caches are weights files too: our converted fid-helper file (FID) and torch hub's
    download of torch-fidelity's file (IS, online path)."""
    from eval.inception import CONVERTED_NAME, fid_helper_file

    marker = tmp_path / "pwned"
    np.savez(tmp_path / "s.npz", arr_0=_samples())
    torch_home = tmp_path / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"evil": _Payload(marker)}, torch_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    (tmp_path / "cache").mkdir()
    torch.save({"evil": _Payload(marker)}, tmp_path / "cache" / CONVERTED_NAME)
    env = eval_env(DDPM_CACHE=str(tmp_path / "cache"), TORCH_HOME=str(torch_home))
    env.pop("DDPM_INCEPTION_WEIGHTS", None)
    cases = [("is", "weights-inception-2015-12-05-6726825d.pth")]
    if fid_helper_file() is not None:  # FID offline goes through the converted cache file
        cases.append(("fid", CONVERTED_NAME))
    for metric, name in cases:
        ref = ["--reference", tmp_path / "s.npz"] if metric == "fid" else []
        r = run_eval(metric, "--samples", tmp_path / "s.npz", "--out", tmp_path / metric, *ref, env=env, timeout=300)
        assert r.returncode == 2 and name in r.stderr and "unpickling" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and not marker.exists()
