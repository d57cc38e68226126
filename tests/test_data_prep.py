"""data_prep on real inputs: CIFAR-10 pickles, an LSUN-layout LMDB, an image folder."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

import data_prep.shards as shards
from data_prep.__main__ import main
from data_prep.shards import key_hash, prepare
from data_prep.sources import Cifar10Source, FolderSource, LsunSource, PrepError
from support.datasets import CORRUPT_KEY, SMALL_KEY, cifar_image, make_cifar10_batches, make_image_folder, make_lsun_lmdb

ROOT = Path(__file__).resolve().parents[1]


def read_shards(out: Path, split: str) -> dict[str, tuple[str, bytes]]:
    """{key: (ext, bytes)} of a split, read with tarfile (independent of pipeline.data)."""
    m = json.loads((out / "manifest.json").read_text())
    got = {}
    for s in m["splits"][split]["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            members = [x for x in tar if x.isfile()]
            assert len(members) == s["count"]
            for x in members:
                key, ext = x.name.rsplit(".", 1)
                assert key not in got, f"duplicate key {key}"
                got[key] = (ext, tar.extractfile(x).read())
    return got


def leftovers(out: Path) -> list[str]:
    """Hidden files (temporary files of the atomic writes) in a data_prep output."""
    return [f.name for d in (out, out / ".prep") for f in d.iterdir() if f.name.startswith(".") and f.name != ".prep"]


def pixels(ext: str, data: bytes) -> np.ndarray:
    if ext == "npy":
        return np.load(io.BytesIO(data))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def by_hand(value: bytes, res: int) -> np.ndarray:
    """ProGAN create_lsun, written out: numpy centre crop, then PIL LANCZOS (ANTIALIAS) resize."""
    img = np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
    c = min(img.shape[:2])
    h, w = img.shape[:2]
    img = img[(h - c) // 2:(h + c) // 2, (w - c) // 2:(w + c) // 2]
    return np.asarray(Image.fromarray(img).resize((res, res), Image.LANCZOS))


def test_cifar10_pixels_keys_and_counts(tmp_path):
    src = make_cifar10_batches(tmp_path / "c", n_train=12, n_test=5, seed=1)
    m = prepare(Cifar10Source(src), tmp_path / "out", resolution=32, shard_size=5, progress=False)
    assert m["splits"]["train"]["count"] == 12 and m["splits"]["test"]["count"] == 5
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [5, 5, 2]
    train, test = read_shards(tmp_path / "out", "train"), read_shards(tmp_path / "out", "test")
    assert len(train) == 12 and len(test) == 5
    # lossless: every stored pixel equals the pickle's, read by an independent reader
    for key, (ext, data) in {**train, **test}.items():
        batch, idx = key.rsplit("_", 1)
        assert ext == "npy"  # the default format
        np.testing.assert_array_equal(pixels(ext, data), cifar_image(src, batch, int(idx)))
    assert set(test) == {f"test_batch_{i:05d}" for i in range(5)}


def test_lsun_crop_resize_matches_pil_by_hand_and_skips(tmp_path):
    values = make_lsun_lmdb(tmp_path / "lmdb", n=8, size=24, seed=2)
    m = prepare(LsunSource(tmp_path / "lmdb"), tmp_path / "out", resolution=16, test_count=2,
                shard_size=3, fmt="png", png_level=6, progress=False)
    train, test = read_shards(tmp_path / "out", "train"), read_shards(tmp_path / "out", "test")
    assert (len(train), len(test)) == (6, 2) and m["inputs"] == 10
    for key, (ext, data) in {**train, **test}.items():
        np.testing.assert_array_equal(pixels(ext, data), by_hand(values[key], 16))
    reasons = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {CORRUPT_KEY, SMALL_KEY}
    assert reasons[CORRUPT_KEY].startswith("undecodable bytes")
    assert reasons[SMALL_KEY] == "too small: 23x12 < 16"


def test_preprocess_is_not_a_plain_resize(tmp_path):
    """What data_prep stores for non-square images is told apart from two plausible wrong
    preprocessings (so the by-hand equality above pins the crop and the filter): a plain
    Lanczos resize without the centre crop, and a corner crop with bicubic resampling."""
    values = make_lsun_lmdb(tmp_path / "lmdb", n=4, size=24, seed=3)
    prepare(LsunSource(tmp_path / "lmdb"), tmp_path / "out", resolution=16, test_count=0, progress=False)
    stored = read_shards(tmp_path / "out", "train")
    checked = 0
    for key, (ext, data) in stored.items():
        ours = pixels(ext, data)
        img = Image.open(io.BytesIO(values[key])).convert("RGB")
        if img.width == img.height:
            continue  # a square image has no crop to get wrong
        checked += 1
        assert not np.array_equal(ours, np.asarray(img.resize((16, 16), Image.LANCZOS)))
        box = img.crop((0, 0, min(img.size), min(img.size)))
        assert not np.array_equal(ours, np.asarray(box.resize((16, 16), Image.BICUBIC)))
    assert checked >= 2


def test_too_small_kept_with_allow_upscale(tmp_path):
    make_lsun_lmdb(tmp_path / "lmdb", n=4, size=24, seed=4)
    m = prepare(LsunSource(tmp_path / "lmdb"), tmp_path / "out", resolution=24, allow_upscale=True,
                test_count=0, progress=False)
    assert [s["key"] for s in m["skipped"]] == [CORRUPT_KEY]
    assert read_shards(tmp_path / "out", "train")[SMALL_KEY][0] == "npy"


def test_split_by_key_hash_independent_of_workers(tmp_path):
    make_lsun_lmdb(tmp_path / "lmdb", n=16, size=20, seed=5)
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        prepare(LsunSource(tmp_path / "lmdb"), out, resolution=16, test_fraction=0.3, shard_size=4,
                workers=workers, progress=False)
        outs.append(out)
    a, b = (json.loads((o / "manifest.json").read_text()) for o in outs)
    assert a["splits"] == b["splits"] and a["skipped"] == b["skipped"]
    for s in a["splits"]["train"]["shards"] + a["splits"]["test"]["shards"]:
        assert (outs[0] / s["name"]).read_bytes() == (outs[1] / s["name"]).read_bytes()
    test_keys = set(read_shards(outs[0], "test"))
    good = set(read_shards(outs[0], "train")) | test_keys
    assert test_keys == {k for k in good if key_hash(k) < int(0.3 * 2**64)}
    assert 0 < len(test_keys) < len(good)


def test_folder_keys_formats_and_manifest(tmp_path):
    make_image_folder(tmp_path / "imgs", n=6, size=20, seed=6)
    cmd = ["folder", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--resolution", "16",
           "--test-count", "1", "--format", "png", "--no-progress"]
    assert main(cmd) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    keys = set(read_shards(tmp_path / "out", "train")) | set(read_shards(tmp_path / "out", "test"))
    assert keys == {"00000", "00001", "sub/00002", "00003", "00004", "sub/00005"}
    for k in ("dataset", "source", "resolution", "format", "command", "splits", "skipped", "tool", "created"):
        assert k in m, k
    assert (m["dataset"], m["resolution"], m["format"], m["png_level"], m["skipped"]) == ("folder", 16, "png", 1, [])
    assert m["source"] == str((tmp_path / "imgs").absolute()) and m["command"][-len(cmd):] == cmd
    assert (m["splits"]["train"]["count"], m["splits"]["test"]["count"]) == (5, 1)
    ext, data = read_shards(tmp_path / "out", "train")["00000"]
    with open(tmp_path / "imgs" / "00000.png", "rb") as f:
        np.testing.assert_array_equal(pixels(ext, data), by_hand(f.read(), 16))


def test_jpg_format_is_close(tmp_path):
    src = make_cifar10_batches(tmp_path / "c", n_train=5, n_test=0, seed=7)
    prepare(Cifar10Source(src), tmp_path / "out", resolution=32, fmt="jpg", quality=95, progress=False)
    for key, (ext, data) in read_shards(tmp_path / "out", "train").items():
        assert ext == "jpg"
        ref = cifar_image(src, *key.rsplit("_", 1)[:1], int(key.rsplit("_", 1)[1])).astype(int)
        err = np.abs(pixels(ext, data).astype(int) - ref).mean()
        assert 0 < err < 40  # lossy but the same picture (uniform noise images are JPEG's worst case)


def test_rerun_complete_output_is_a_noop(tmp_path):
    src = make_cifar10_batches(tmp_path / "c", n_train=6, n_test=2, seed=8)
    out = tmp_path / "out"
    prepare(Cifar10Source(src), out, resolution=32, shard_size=4, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    prepare(Cifar10Source(src), out, resolution=32, shard_size=4, progress=False)
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}


def test_resume_after_crash_keeps_done_shards_and_has_no_duplicates(tmp_path, monkeypatch):
    make_lsun_lmdb(tmp_path / "lmdb", n=14, size=20, seed=9)
    ref = tmp_path / "ref"
    prepare(LsunSource(tmp_path / "lmdb"), ref, resolution=16, test_count=3, shard_size=3, progress=False)

    out = tmp_path / "out"
    real, calls = shards.write_shard, []

    def crashing(path, samples):
        calls.append(path.name)
        if len(calls) == 3:  # die half-way through the third shard: a partial tmp file is left behind
            # (named as pipeline.atomic names it, by a process that was killed)
            path.with_name(f".{path.name}.tmp-999999{path.suffix}").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(path, samples)

    monkeypatch.setattr(shards, "write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        prepare(LsunSource(tmp_path / "lmdb"), out, resolution=16, test_count=3, shard_size=3, progress=False)
    assert not (out / "manifest.json").exists()
    done = {n: (out / n).stat().st_mtime_ns for n in calls[:2]}
    monkeypatch.setattr(shards, "write_shard", real)
    m = prepare(LsunSource(tmp_path / "lmdb"), out, resolution=16, test_count=3, shard_size=3, progress=False)
    assert done == {n: (out / n).stat().st_mtime_ns for n in done}  # completed shards kept
    r = json.loads((ref / "manifest.json").read_text())
    assert m["splits"] == r["splits"] and m["skipped"] == r["skipped"]
    for split in ("train", "test"):
        assert read_shards(out, split) == read_shards(ref, split)  # read_shards asserts no duplicate key
    assert not leftovers(out)


def test_user_errors_raise_prep_error(tmp_path):
    with pytest.raises(PrepError, match="no such"):
        LsunSource(tmp_path / "nope")
    (tmp_path / "notlmdb").mkdir()
    with pytest.raises(PrepError, match="not an LMDB"):
        LsunSource(tmp_path / "notlmdb")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    with pytest.raises(PrepError, match="not an LMDB"):
        LsunSource(tmp_path / "junk").items()
    lmdb.open(str(tmp_path / "emptylmdb"), map_size=1 << 20).close()
    with pytest.raises(PrepError, match="empty"):
        LsunSource(tmp_path / "emptylmdb").items()
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="no images"):
        FolderSource(tmp_path / "empty").items()
    with pytest.raises(PrepError, match="missing"):
        Cifar10Source(tmp_path / "empty")
    src = make_cifar10_batches(tmp_path / "c", n_train=5, n_test=1)
    prepare(Cifar10Source(src), tmp_path / "out", resolution=32, progress=False)
    with pytest.raises(PrepError, match="different data set.*resolution: 32 -> 16"):
        prepare(Cifar10Source(src), tmp_path / "out", resolution=16, allow_upscale=True, progress=False)


@pytest.mark.parametrize("args, message", [
    (["lsun", "--lmdb", "{tmp}/missing", "--out", "{tmp}/o"], "no such LMDB directory"),
    (["lsun", "--lmdb", "{tmp}", "--out", "{tmp}/o"], "not an LMDB database"),
    (["folder", "--images", "{tmp}/emptydir", "--out", "{tmp}/o"], "no images found"),
])
def test_cli_errors_exit_2_one_line(tmp_path, args, message):
    (tmp_path / "emptydir").mkdir()
    r = subprocess.run([sys.executable, "-m", "data_prep", *[a.format(tmp=tmp_path) for a in args]],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_different_dataset_exit_2(tmp_path, capsys):
    src = make_cifar10_batches(tmp_path / "c", n_train=5, n_test=1)
    base = ["cifar10", "--batches", str(src), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(base) == 0
    assert main(base) == 0  # the same data set again: fine (a no-op)
    assert main(base + ["--format", "jpg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different data set" in err[0] and "format: 'npy' -> 'jpg'" in err[0]


@pytest.mark.slow
def test_cli_killed_mid_run_then_rerun_finishes_without_duplicates(tmp_path):
    """SIGKILL a real `python -m data_prep lsun --workers 2` after its first shard, re-run it."""
    make_lsun_lmdb(tmp_path / "lmdb", n=300, size=48, seed=10)
    args = ["lsun", "--lmdb", str(tmp_path / "lmdb"), "--resolution", "32", "--shard-size", "10",
            "--test-count", "20", "--workers", "2", "--no-progress", "--format", "png"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "data_prep", *args, "--out", str(out)], cwd=ROOT,
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / ".prep").glob("*.tar.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the CLI and its pool workers, mid-run
    p.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    kept = {f.name: f.stat().st_mtime_ns for f in out.glob("*.tar")
            if (out / ".prep" / f"{f.name}.json").exists()}
    assert kept
    r = subprocess.run([sys.executable, "-m", "data_prep", *args, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert kept == {n: (out / n).stat().st_mtime_ns for n in kept}
    m, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "ref"))
    assert m["splits"] == ref["splits"] and m["skipped"] == ref["skipped"]
    for split in ("train", "test"):
        assert read_shards(out, split) == read_shards(tmp_path / "ref", split)
    assert not leftovers(out)


def test_truncated_file_and_limit(tmp_path):
    paths = make_image_folder(tmp_path / "imgs", n=6, size=20, seed=11)
    jpg = next(p for p in paths if p.suffix == ".jpg")
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # a download cut short
    m = prepare(FolderSource(tmp_path / "imgs"), tmp_path / "out", resolution=16, test_count=0, progress=False)
    assert [(s["key"], s["reason"].split(":")[0]) for s in m["skipped"]] == [(jpg.stem, "truncated file")]
    assert m["splits"]["train"]["count"] == 5
    m = prepare(FolderSource(tmp_path / "imgs"), tmp_path / "lim", resolution=16, test_count=0, limit=3,
                progress=False)
    assert m["inputs"] == 3 and m["limit"] == 3


def test_test_count_counts_usable_inputs(tmp_path):
    """--test-count N gives N test samples even when an input the hash picked for test is skipped
    (it goes to train, skipped and recorded there): issue 24's `--test-count 8` gave 7."""
    make_image_folder(tmp_path / "imgs", n=9, size=20, seed=5)
    src = FolderSource(tmp_path / "imgs")
    first = min(src.items(), key=lambda it: key_hash(it[0]))  # the first the hash sends to test
    Path(first[2]).write_bytes(b"not an image")
    m = prepare(src, tmp_path / "out", resolution=16, test_count=3, progress=False)
    assert m["splits"]["test"]["count"] == 3 and m["splits"]["train"]["count"] == 5
    assert [(s["key"], s["split"]) for s in m["skipped"]] == [(first[0], "train")]
    test = read_shards(tmp_path / "out", "test")
    good = sorted((key_hash(k), k) for k, _, _ in src.items() if k != first[0])
    assert sorted(test) == sorted(k for _, k in good[:3])  # the next ones by hash, the same on every run


def test_cli_out_is_a_file_exit_2(tmp_path, capsys):
    src = make_cifar10_batches(tmp_path / "c", n_train=5, n_test=1)
    (tmp_path / "afile").write_text("x")
    assert main(["cifar10", "--batches", str(src), "--out", str(tmp_path / "afile"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile" in err[0]
