"""eval sample: per-sample seeds (batch size / world size invariance), chunked resume, labels."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from eval.common import load_model
from eval.sample import SampleChunks, load_samples, run_sampling
from support.cli import PY, run_eval
from support.model import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "step-00000001")


def test_samples_do_not_depend_on_batch_size(ckpt, tmp_path):
    a = run_sampling(load_model(str(ckpt)), tmp_path / "b2", num_samples=7, batch_size=2, chunk_size=3)
    run_sampling(load_model(str(ckpt)), tmp_path / "b5", num_samples=7, batch_size=5, chunk_size=3)
    x2, x5 = load_samples(tmp_path / "b2"), load_samples(tmp_path / "b5")
    assert x2.shape == (7, 8, 8, 3) and x2.dtype == np.uint8
    np.testing.assert_array_equal(x2, x5)
    assert len({x.tobytes() for x in x2}) == 7  # distinct samples, not one stream repeated
    assert not a["paper_protocol"] and a["sampler"] == "ancestral" and a["steps"] == 20
    # another seed gives other images
    run_sampling(load_model(str(ckpt)), tmp_path / "s1", num_samples=7, batch_size=5, chunk_size=3, seed=1)
    assert not np.array_equal(load_samples(tmp_path / "s1"), x2)


def test_interrupted_job_resumes_without_redoing_chunks(ckpt, tmp_path):
    full = tmp_path / "full"
    run_sampling(load_model(str(ckpt)), full, num_samples=10, batch_size=4, chunk_size=3)
    out = tmp_path / "cut"
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4, chunk_size=3, stop_after_chunks=2)
    chunks = sorted(p.name for p in (out / "chunks").glob("chunk-*.npz"))
    assert chunks == ["chunk-000000.npz", "chunk-000001.npz"]
    assert json.loads((out / "samples.json").read_text())["complete"] is False
    # a chunk being written when the job died leaves only a temporary file, never a chunk
    (out / "chunks" / ".chunk-000002.tmp999.npz").write_bytes(b"half")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk-*.npz")}
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4, chunk_size=3)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk-*.npz")}
    assert sorted(after) == [f"chunk-{i:06d}.npz" for i in range(4)]
    assert all(after[k] == v for k, v in before.items())  # finished chunks untouched
    np.testing.assert_array_equal(load_samples(out), load_samples(full))
    streamed = SampleChunks(out)  # what FID reads: one chunk at a time, in index order
    assert len(streamed) == 10
    np.testing.assert_array_equal(np.stack([streamed[i] for i in range(10)]), load_samples(full))
    with np.load(out / "chunks" / "chunk-000003.npz") as z:
        assert z["indices"].tolist() == [9]
    assert json.loads((out / "samples.json").read_text())["complete"] is True


def test_cli_sample_ddim_is_labelled_and_protocol_mismatch_refused(ckpt, tmp_path):
    out = tmp_path / "ddim"
    r = run_eval("sample", ckpt, "--out", out, "--num-samples", 4, "--sampler", "ddim", "--steps", 5)
    assert r.returncode == 0, r.stderr
    assert "beyond the paper" in r.stdout
    proto = json.loads((out / "samples.json").read_text())["protocol"]
    assert proto["sampler"] == "ddim" and proto["steps"] == 5 and not proto["paper_protocol"]
    assert "beyond the paper" in proto["note"]
    assert (out / "grid.png").is_file()
    # the same directory with another sampler: one clear line, exit 2, no traceback
    r = run_eval("sample", ckpt, "--out", out, "--num-samples", 4)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "sampler" in r.stderr
    # a missing checkpoint is also one line
    r = run_eval("sample", tmp_path / "nope", "--out", tmp_path / "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr


class Scaled(torch.nn.Module):
    """A deliberately wrong model: eps_theta times `factor` (a 2% error for 1.02)."""

    def __init__(self, model, factor: float):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x, t):
        return self.model(x, t) * self.factor


class Transposed(torch.nn.Module):
    """A deliberately wrong layout: the image's H and W axes swapped going in and coming out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        return self.model(x.transpose(-1, -2), t).transpose(-1, -2)


def wrapped(ckpt, wrapper):
    loaded = load_model(str(ckpt))
    return dataclasses.replace(loaded, model=wrapper(loaded.model))


def pixel_diff(a, b) -> np.ndarray:
    return np.abs(load_samples(a).astype(int) - load_samples(b).astype(int))


# The eval checkpoint's eps has std ~0.8 (support.model.redraw_zero_init). Measured on 8 samples
# of 8x8 (1536 values): bf16 vs fp32 differs by 0.2 levels on average (max 2, ~20% of values
# differ), eps scaled by 1.02 by 0.6 (max 5), by 1.01 by 0.3; channels_last vs NCHW by 0 on CPU.
BF16_MEAN_TOL = 0.45  # about twice bf16's rounding; a 2% error in eps is beyond it


def test_bf16_autocast_changes_rounding_only(ckpt, tmp_path):
    p = run_sampling(load_model(str(ckpt)), tmp_path / "bf", num_samples=8, batch_size=4, precision="bf16")
    ref = run_sampling(load_model(str(ckpt)), tmp_path / "fp", num_samples=8, batch_size=4)
    assert p["precision"] == "bf16" and ref["precision"] == "fp32"
    assert load_samples(tmp_path / "bf").shape == (8, 8, 8, 3)
    assert load_samples(tmp_path / "fp").std() > 30  # real images, not a constant
    diff = pixel_diff(tmp_path / "bf", tmp_path / "fp")
    assert diff.mean() > 0.02, "bf16 gave the float32 images: autocast did not run"
    assert diff.mean() < BF16_MEAN_TOL and diff.max() <= 8, (diff.mean(), diff.max())
    # the tolerance tells a 2% error in eps from bf16 rounding
    run_sampling(wrapped(ckpt, lambda m: Scaled(m, 1.02)), tmp_path / "off", num_samples=8, batch_size=4)
    assert pixel_diff(tmp_path / "off", tmp_path / "fp").mean() > BF16_MEAN_TOL


@pytest.mark.slow
def test_two_processes_give_the_same_samples_as_one(ckpt, tmp_path):
    one = tmp_path / "one"
    r = run_eval("sample", ckpt, "--out", one, "--num-samples", 9, "--batch-size", 2, "--chunk-size", 2)
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    launcher = (PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m")
    r = run_eval("sample", ckpt, "--out", two, "--num-samples", 9, "--batch-size", 3, "--chunk-size", 2,
                 launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_array_equal(load_samples(one), load_samples(two))
    info = json.loads((two / "samples.json").read_text())
    assert info["complete"] is True and info["processes"] == 2


def test_damaged_chunks_are_detected_and_redrawn(ckpt, tmp_path):
    out = tmp_path / "o"
    run_sampling(load_model(str(ckpt)), out, num_samples=9, batch_size=3, chunk_size=3)
    good = load_samples(out)
    info = json.loads((out / "samples.json").read_text())
    assert set(info["checksums"]) == {"chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz"}
    c0, c1 = out / "chunks" / "chunk-000000.npz", out / "chunks" / "chunk-000001.npz"
    c0.write_bytes(c0.read_bytes()[:-40])  # truncated: the zip no longer reads
    with np.load(c1) as z:  # whole zip, wrong pixels: only the checksum can tell
        bad = z["images"].copy()
        bad[0, 0, 0, 0] ^= 1
        np.savez(c1, images=bad, indices=z["indices"], sha256=z["sha256"])
    untouched = (out / "chunks" / "chunk-000002.npz").stat().st_mtime_ns
    run_sampling(load_model(str(ckpt)), out, num_samples=9, batch_size=3, chunk_size=3)
    np.testing.assert_array_equal(load_samples(out), good)  # redrawn, the same images as before
    assert (out / "chunks" / "chunk-000000.npz.bad").is_file() and (out / "chunks" / "chunk-000001.npz.bad").is_file()
    assert (out / "chunks" / "chunk-000002.npz").stat().st_mtime_ns == untouched


def test_the_recipes_fast_path_samples_like_the_plain_path(ckpt, tmp_path):
    """train.channels_last (on by "auto" on CUDA) also lays out the sampling U-Net: the same
    images up to float rounding (uint8 within one level, a few values at most); on CPU "auto" is
    the plain path. An H/W mix-up of the layout is far outside that."""
    plain = load_model(str(ckpt))
    fast = load_model(str(ckpt))
    fast = dataclasses.replace(fast, recipe=dataclasses.replace(
        fast.recipe, train=dataclasses.replace(fast.recipe.train, channels_last=True)))
    run_sampling(plain, tmp_path / "plain", num_samples=3, batch_size=3)
    run_sampling(fast, tmp_path / "nhwc", num_samples=3, batch_size=3)
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.model.parameters() if p.dim() == 4)  # the layout was applied
    assert load_samples(tmp_path / "plain").std() > 30  # real images, not a constant
    diff = pixel_diff(tmp_path / "nhwc", tmp_path / "plain")
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.mean(), diff.max())
    run_sampling(wrapped(ckpt, Transposed), tmp_path / "swapped", num_samples=3, batch_size=3)
    wrong = pixel_diff(tmp_path / "swapped", tmp_path / "plain")
    assert wrong.max() > 1 and wrong.mean() > 0.05


def test_png_folder_holds_each_sample_by_its_index(ckpt, tmp_path):
    from PIL import Image

    from eval.outside import ImageFolder

    out, png = tmp_path / "s", tmp_path / "png"
    png.mkdir()
    (png / "keep.txt").write_text("theirs")  # a folder that holds other files keeps them
    r = run_eval("sample", ckpt, "--out", out, "--num-samples", 5, "--batch-size", 2, "--chunk-size", 2,
                 "--sampler", "ddim", "--steps", 2, "--png", png)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 5 PNG images" in r.stderr
    assert sorted(p.name for p in png.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["keep.txt"]
    samples = load_samples(out)
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(Image.open(png / f"{i:06d}.png")), samples[i])
    folder = ImageFolder(png)  # what `eval fid --samples DIR` reads back: the same images in order
    np.testing.assert_array_equal(np.stack([folder[i] for i in range(len(folder))]), samples)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["png", "s"]  # nothing written beside DIR
