"""Data from and to the Hub: a `datasets` image data set (parquet) into shards (data_prep/hf.py),
shards pushed as a Hub data set in one commit (data_prep/hub.py), and `data.shards` naming that
repo or an fsspec URL (pipeline/remote_shards.py): fetched once, verified, read with the same
exactly-once order as local shards, also by a 2-process training run."""

from __future__ import annotations

import json
import re
import subprocess as sp
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.hub import push_shards
from pipeline.data import ShardSet, TrainLoader, decode_hwc
from pipeline.remote_shards import RemoteShardsError, is_remote
from support.datasets import make_cifar10_batches, make_image_folder
from support.hub import ROOT, hub_env
from support.train_with_hooks import pixel_digest
from support.training import HOOKS_SCRIPT, make_tiny_shards, train_cmd, write_recipe


def _prep(args, env=None):
    return sp.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                  env=env)


def _pixels(folder) -> dict[str, np.ndarray]:
    """{key: HWC uint8} of every train and test sample of a shard folder."""
    out = {}
    for split in ("train", "test"):
        s = ShardSet(folder, split)
        for i in range(len(s)):
            _, ext, data = s.read(i)
            out[s.key(i)] = decode_hwc(ext, data)
    return out


def test_parquet_image_dataset_converts_into_the_same_shards(tmp_path):
    """The same images as a parquet data set (datasets' Image feature) and as an image folder give
    the same pixels after data_prep (same crop, resize and encoding)."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    paths = make_image_folder(tmp_path / "images", n=6, size=24)
    split = {"train": paths[:4], "test": paths[4:]}
    for name, ps in split.items():
        # The bytes inside the parquet file, as the Hub's parquet data sets hold them.
        ds = datasets.Dataset.from_dict({"img": [{"bytes": p.read_bytes(), "path": p.name} for p in ps],
                                         "label": list(range(len(ps)))},
                                        features=datasets.Features({"img": datasets.Image(),
                                                                    "label": datasets.Value("int64")}))
        (tmp_path / "pq" / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(tmp_path / "pq" / "data" / f"{name}-00000-of-00001.parquet"))
    r = _prep(["hf", "--dataset", str(tmp_path / "pq"), "--test-split", "test", "--out", str(tmp_path / "s"),
               "--resolution", "16", "--no-progress"])
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["dataset"] == "hf" and m["splits"]["train"]["count"] == 4 and m["splits"]["test"]["count"] == 2
    got = _pixels(tmp_path / "s")
    assert sorted(got) == ["test_00000000", "test_00000001", "train_00000000", "train_00000001",
                           "train_00000002", "train_00000003"]
    # The reference: data_prep's folder source on the same files.
    ref_dir = tmp_path / "flat"
    ref_dir.mkdir()
    for i, p in enumerate(paths):
        Image.open(p).save(ref_dir / f"{i:05d}.png")
    r = _prep(["folder", "--images", str(ref_dir), "--out", str(tmp_path / "ref"), "--resolution", "16",
               "--test-count", "0", "--no-progress"])
    assert r.returncode == 0, r.stderr
    ref = _pixels(tmp_path / "ref")
    order = [f"train_{i:08d}" for i in range(4)] + [f"test_{i:08d}" for i in range(2)]
    for i, key in enumerate(order):
        np.testing.assert_array_equal(got[key], ref[f"{i:05d}"])
    bad = _prep(["hf", "--dataset", str(tmp_path / "pq"), "--image-column", "label", "--out", str(tmp_path / "x")])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no image column label" in bad.stderr


def test_parquet_cell_naming_a_local_file_outside_the_data_set_is_not_read(tmp_path):
    """A parquet image cell with only a `path` is an instruction to read a local file: outside the
    data set's folder and the datasets caches it is refused (the row skipped and recorded)."""
    datasets = pytest.importorskip("datasets")
    paths = make_image_folder(tmp_path / "images", n=3, size=24)
    secret = paths[2]  # stands for ~/.ssh/id_rsa: any readable file of the user's
    cells = [{"bytes": p.read_bytes(), "path": p.name} for p in paths[:2]] + [{"bytes": None, "path": str(secret)}]
    ds = datasets.Dataset.from_dict({"img": cells}, features=datasets.Features({"img": datasets.Image()}))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    r = _prep(["hf", "--dataset", str(tmp_path / "pq"), "--out", str(tmp_path / "s"), "--resolution", "16",
               "--test-count", "0", "--no-progress"])
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["splits"]["train"]["count"] == 2
    assert "train_00000002" in json.dumps(m["skipped"]) and "outside the data set" in json.dumps(m["skipped"])
    # Inside the data set's own folder (an image folder data set names its files): read.
    inside = tmp_path / "pq" / "own.png"
    inside.write_bytes(secret.read_bytes())
    ds = datasets.Dataset.from_dict({"img": [{"bytes": None, "path": str(inside)}]},
                                    features=datasets.Features({"img": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    r = _prep(["hf", "--dataset", str(tmp_path / "pq"), "--out", str(tmp_path / "s2"), "--resolution", "16",
               "--test-count", "0", "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s2" / "manifest.json").read_text())["splits"]["train"]["count"] == 1


def _stream(loader, n_batches):
    return [pixel_digest(x) for _ in range(n_batches) for x in next(loader)]


def test_pushed_shards_load_by_repo_id_exactly_as_local(hub, tmp_path, monkeypatch, capsys):
    shards = make_tiny_shards(tmp_path / "shards")
    monkeypatch.setenv("DDPM_SHARDS_CACHE", str(tmp_path / "cache"))
    out = push_shards(shards, "alice/tiny-shards")
    commits = hub.commits("alice/tiny-shards", repo_type="dataset")
    assert len(commits) == 2 and commits[0].id == out["commit"]  # the repo's first commit + ours
    names = json.loads((shards / "manifest.json").read_text())["splits"]
    assert set(out["files"]) == {"README.md", "checksums.json", "manifest.json",
                                 *(s["name"] for sp_ in names.values() for s in sp_["shards"])}
    assert is_remote("alice/tiny-shards") and not is_remote(str(shards))

    kw = dict(batch_size=4, seed=3, random_flip=True, num_workers=0)
    remote, local = TrainLoader("alice/tiny-shards", **kw), TrainLoader(shards, **kw)
    n_shards = sum(len(sp_["shards"]) for sp_ in names.values())
    err = capsys.readouterr().err  # the bar names the repo and the commit, and counts shards
    assert re.search(rf"fetching shards alice/tiny-shards@{out['commit'][:12]}: 100%.* {n_shards}/{n_shards} ", err), err
    assert _stream(remote, 13) == _stream(local, 13)  # two epochs of 24 and a bit: the same order
    cached = Path(remote.shards.paths[0]).parent
    assert cached.is_relative_to(tmp_path / "cache")
    with pytest.raises(RemoteShardsError, match="alice/missing: no local folder of that name .* no Hub data set repo"):
        TrainLoader("alice/missing", **kw)
    # A cached shard changed on disk is noticed at the next open (by size) and fetched again.
    cached_shard = Path(remote.shards.paths[1])
    cached_shard.write_bytes(cached_shard.read_bytes()[:2048])
    assert _stream(TrainLoader("alice/tiny-shards", **kw), 13) == _stream(TrainLoader(shards, **kw), 13)
    assert cached_shard.read_bytes() == (shards / cached_shard.name).read_bytes()
    hub.stop()  # offline: the verified copy is used
    again = TrainLoader("alice/tiny-shards", **kw)
    assert again.shards.paths == remote.shards.paths


def test_fsspec_url_is_fetched_and_verified(tmp_path, monkeypatch):
    shards = make_tiny_shards(tmp_path / "shards")
    monkeypatch.setenv("DDPM_SHARDS_CACHE", str(tmp_path / "cache"))
    url = f"file://{shards}"
    kw = dict(batch_size=4, seed=0, random_flip=False, num_workers=0)
    assert _stream(TrainLoader(url, **kw), 6) == _stream(TrainLoader(shards, **kw), 6)
    # A source whose shard does not match its manifest: the bad copy is refused and deleted.
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in shards.iterdir():
        if p.is_file():
            (bad / p.name).write_bytes(p.read_bytes())
    (bad / "train-000001.tar").write_bytes((shards / "train-000000.tar").read_bytes()[:4096])
    with pytest.raises(RemoteShardsError, match="train-000001.tar does not match manifest.json"):
        TrainLoader(f"file://{bad}", **kw)
    with pytest.raises(RemoteShardsError, match="cannot read manifest.json"):
        TrainLoader(f"file://{tmp_path / 'nowhere'}", **kw)


def test_remote_shards_of_another_resolution_are_refused_before_the_model_is_built(tmp_path, monkeypatch):
    shards = make_tiny_shards(tmp_path / "shards")  # 16x16
    monkeypatch.setenv("DDPM_SHARDS_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run", model={"resolution": 32})
    cmd, e = train_cmd(recipe, f"data.shards=file://{shards}")
    r = sp.run(cmd, env={**e, "DDPM_SHARDS_CACHE": str(tmp_path / "cache")}, cwd=ROOT, capture_output=True,
               text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model resolution 32 does not match the shards' resolution 16" in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("fetching shards")]  # the fetch bar
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_url_of_a_filesystem_not_on_disk(tmp_path, monkeypatch):
    """README: `data.shards` may be any fsspec URL, not only file://. fsspec's in-memory file
    system stands for an object store (s3:// needs s3fs, which the lock does not install: then
    the error says so in one line)."""
    import fsspec

    shards = make_tiny_shards(tmp_path / "shards")
    monkeypatch.setenv("DDPM_SHARDS_CACHE", str(tmp_path / "cache"))
    mem = fsspec.filesystem("memory")
    for p in shards.iterdir():
        if p.is_file():
            mem.pipe(f"/bucket/shards/{p.name}", p.read_bytes())
    try:
        kw = dict(batch_size=4, seed=0, random_flip=False, num_workers=0)
        assert _stream(TrainLoader("memory://bucket/shards", **kw), 6) == _stream(TrainLoader(shards, **kw), 6)
    finally:
        mem.rm("/bucket", recursive=True)
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(RemoteShardsError, match=r"s3://bucket/shards: cannot read manifest.json: .*s3fs"):
            TrainLoader("s3://bucket/shards", batch_size=4, num_workers=0)


def test_push_cli_and_errors(hub, tmp_path):
    shards = make_tiny_shards(tmp_path / "shards")
    env = hub_env(hub, tmp_path / "hf-home")
    r = _prep(["push", str(shards), "--repo-id", "alice/cli-shards"], env)
    assert r.returncode == 0, r.stderr
    assert "data.shards=alice/cli-shards" in r.stdout
    batches = make_cifar10_batches(tmp_path / "cifar", n_train=5, n_test=2)
    r = _prep(["cifar10", "--batches", str(batches), "--out", str(tmp_path / "c"), "--no-progress",
               "--push-to-hub", "alice/cifar-shards"], env)
    assert r.returncode == 0, r.stderr
    files = hub.state.repos[("dataset", "alice/cifar-shards")].resolve("main").files
    assert {"manifest.json", "checksums.json", "train-000000.tar", "test-000000.tar"} <= set(files)
    r = _prep(["push", str(tmp_path), "--repo-id", "alice/x"], env)
    assert r.returncode == 2 and "no manifest.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_two_process_training_from_a_hub_dataset_sees_each_sample_once_per_epoch(hub, tmp_path):
    shards = make_tiny_shards(tmp_path / "shards")  # 24 train samples
    push_shards(shards, "alice/train-shards")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "unused", tmp_path / "run",
                          data={"shards": "alice/train-shards", "random_flip": False},
                          train={"max_steps": 12, "checkpoint_every": 12})  # 12 x 4 = two epochs
    record = tmp_path / "batches"
    cmd, env = train_cmd(recipe, procs=2, script=(HOOKS_SCRIPT, "--record-batches", str(record)))
    env.update({k: v for k, v in hub_env(hub, tmp_path / "hf-home").items() if k.startswith("HF")})
    env["DDPM_SHARDS_CACHE"] = str(tmp_path / "node-cache")
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [[json.loads(line) for line in Path(f"{record}.rank{i}").read_text().splitlines()] for i in (0, 1)]
    assert [len(x) for x in ranks] == [12, 12]
    stream = [d for step in range(12) for rank in ranks for d in rank[step]["sha1"]]  # global order: rank 0, 1
    keys = {pixel_digest(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float() / 127.5 - 1): k
            for k, a in _pixels(shards).items() if k.startswith("data_batch")}
    assert len(keys) == 24
    for epoch in range(2):
        assert sorted(keys[d] for d in stream[epoch * 24:(epoch + 1) * 24]) == sorted(keys.values())
    single = TrainLoader(shards, batch_size=4, seed=7, random_flip=False, num_workers=0)
    assert stream == _stream(single, 12)  # as local shards on one process: world-size independent
    assert list((tmp_path / "node-cache").rglob(".complete"))  # fetched once into the node's cache


def test_an_ordinary_hub_image_dataset_is_refused_with_the_command_that_converts_it(hub, tmp_path, monkeypatch):
    """data.shards naming a Hub data set of parquet files (not data_prep's shards): one line that
    says how to convert it, not `cannot download manifest.json: 404`."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("DDPM_SHARDS_CACHE", str(tmp_path / "cache"))
    api = HfApi()
    api.create_repo("alice/plain-images", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"PAR1 not really", path_in_repo="data/train-00000-of-00001.parquet",
                    repo_id="alice/plain-images", repo_type="dataset")
    with pytest.raises(RemoteShardsError) as e:
        ShardSet("alice/plain-images", "train")
    msg = str(e.value)
    assert "python -m data_prep hf --dataset alice/plain-images --out data/plain-images" in msg and "\n" not in msg
    env = {**hub_env(hub, tmp_path / "hf-home"), "DDPM_SHARDS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    r = sp.run([sys.executable, "-m", "eval", "ref-stats", "alice/plain-images", "--out", str(tmp_path / "r.npz"),
                "--feature-extractor", "tiny-seeded=support.features:TinyFeatures"], cwd=ROOT, env=env,
               capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "data_prep hf --dataset" in r.stderr
    # The same name as a model (a 404 from the model API): one line that says what it is, no traceback.
    for name, says in (("alice/plain-images", "not a model repo on the Hub but a data set repo"),
                       ("alice/nope", "no such repo on the Hub")):
        r = sp.run([sys.executable, "-m", "eval", "sample", name, "--out", str(tmp_path / "s"), "--num-samples", "1"],
                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {name}: ") and says in last
