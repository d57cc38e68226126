"""data_prep on hostile or unusual inputs (issue 13): decompression bombs are skipped and
listed, 16-bit and float images are converted (or skipped and listed, never stored white or
black), distinct names never share a key, and an output with 0 training samples is an error."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import main
from data_prep.preprocess import max_pixels
from data_prep.shards import prepare
from data_prep.sources import FolderSource, LsunSource, PrepError


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in ~100 bytes (one row of image data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + \
        chunk(b"IEND", b"")


def samples(out: Path, split: str = "train") -> dict[str, np.ndarray]:
    m = json.loads((out / "manifest.json").read_text())
    got = {}
    for s in m["splits"][split]["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            for x in tar:
                key = x.name.rsplit(".", 1)[0]
                assert key not in got
                got[key] = np.load(io.BytesIO(tar.extractfile(x).read()))
    return got


def ok_image(path: Path, value: int = 100, size: int = 20):
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_decompression_bombs_skipped_and_listed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    ok_image(src / "fine.png")
    (src / "huge_declared.png").write_bytes(png_header_only(100_000, 100_000))
    (src / "wide.png").write_bytes(png_header_only(max_pixels(16) // 2 + 1, 2))
    Image.new("L", (5000, 4000)).save(src / "real_20mpx.png")  # 20 Mpx of zeros: a few KB on disk
    m = prepare(FolderSource(src), tmp_path / "out", resolution=16, test_count=0, progress=False)
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"huge_declared", "wide", "real_20mpx"}
    assert all("decompression bomb?" in r and f"limit of {max_pixels(16)}" in r for r in skipped.values())
    assert list(samples(tmp_path / "out")) == ["fine"]
    assert max_pixels(16) == 4096 * 4096 and max_pixels(1024) == 256 * 1024 * 1024


@pytest.mark.parametrize("make, want", [
    (lambda: Image.fromarray(np.full((20, 20), 60000, np.uint16)), 233),  # bright 16-bit gray
    (lambda: Image.fromarray(np.full((20, 20), 1000, np.uint16)), 4),  # dark 16-bit gray
    (lambda: Image.fromarray(np.full((20, 20), 0.5, np.float32)), 128),  # float in [0, 1]
    (lambda: Image.fromarray(np.full((20, 20), 40000, np.int32)), 156),  # mode I (16-bit range)
])
def test_16bit_and_float_images_converted(tmp_path, make, want):
    src = tmp_path / "in"
    src.mkdir()
    make().save(src / "img.tif")
    m = prepare(FolderSource(src), tmp_path / "out", resolution=16, test_count=0, progress=False)
    assert m["skipped"] == []
    px = samples(tmp_path / "out")["img"]
    assert px.shape == (16, 16, 3) and np.all(np.abs(px.astype(int) - want) <= 1), px[0, 0]


@pytest.mark.parametrize("make, why", [
    (lambda: Image.fromarray(np.full((20, 20), 3.0, np.float32)), "floating-point image with values in [3, 3]"),
    (lambda: Image.fromarray(np.full((20, 20), np.nan, np.float32)), "non-finite"),
    (lambda: Image.fromarray(np.full((20, 20), -5, np.int32)), "expected 16-bit"),
])
def test_unconvertible_images_skipped_and_listed(tmp_path, make, why):
    src = tmp_path / "in"
    src.mkdir()
    make().save(src / "bad.tif")
    ok_image(src / "good.png")
    m = prepare(FolderSource(src), tmp_path / "out", resolution=16, test_count=0, progress=False)
    assert [s["key"] for s in m["skipped"]] == ["bad"] and why in m["skipped"][0]["reason"]
    assert list(samples(tmp_path / "out")) == ["good"]


def test_distinct_names_never_share_a_key(tmp_path):
    src = tmp_path / "in"
    (src / "d").mkdir(parents=True)
    names = ["a b.png", "a.b.png", "a_b.png", "a?b.png", "a_b.jpg", "d/x.png", "d_x.png", "a_b-1.png"]
    for i, n in enumerate(names):
        ok_image(src / n, value=10 * i)
    m = prepare(FolderSource(src), tmp_path / "out", resolution=16, test_count=0, progress=False)
    got = samples(tmp_path / "out")
    assert len(got) == len(names) == m["splits"]["train"]["count"]
    assert sorted(int(v[0, 0, 0]) for v in got.values()) == [10 * i for i in range(len(names))]
    assert "a_b" in got and "d/x" in got and "d_x" in got  # names that need no change keep them


def test_lsun_keys_that_sanitise_alike_stay_distinct(tmp_path):
    keys = [b"a b", b"a.b", b"a_b", b"a\xffb", b"a\xfeb"]  # the last two both decode to a\ufffdb
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, k in enumerate(keys):
            buf = io.BytesIO()
            Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(buf, format="PNG")
            txn.put(k, buf.getvalue())
    env.close()
    m = prepare(LsunSource(tmp_path / "db"), tmp_path / "out", resolution=16, test_count=0, progress=False)
    got = samples(tmp_path / "out")
    assert len(got) == len(keys) == m["splits"]["train"]["count"] and "a_b" in got
    assert sorted(int(v[0, 0, 0]) for v in got.values()) == [10 * i for i in range(len(keys))]


@pytest.mark.parametrize("args, want", [
    (["--resolution", "64"], "0 training samples: every train input was skipped (first: "),
    (["--test-count", "3"], "all 3 inputs went to the test split"),
])
def test_zero_training_samples_is_an_error(tmp_path, capsys, args, want):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        ok_image(src / f"{i}.png")
    out = tmp_path / "out"
    code = main(["folder", "--images", str(src), "--out", str(out), "--resolution", "16", "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and want in err[0], err
    assert not (out / "manifest.json").exists()


def test_duplicate_keys_from_a_source_are_refused(tmp_path):
    class Twice(FolderSource):
        def items(self, limit=None):
            its = super().items(limit)
            return its + its[:1]

    src = tmp_path / "in"
    src.mkdir()
    ok_image(src / "a.png")
    with pytest.raises(PrepError, match="two inputs map to the key 'a'"):
        prepare(Twice(src), tmp_path / "out", resolution=16, test_count=0, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
