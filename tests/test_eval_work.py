"""eval sample's work units (eval/work.py): every process draws an equal share of the missing
samples whatever the chunk size; parts of chunks resume under another process count."""

import json

import numpy as np
import pytest

from eval.common import load_model
from eval.sample import load_samples, run_sampling
from eval.work import split
from support.cli import PY, run_eval
from support.model import make_checkpoint

TORCHRUN = (PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "step-00000001")


@pytest.fixture(scope="module")
def one(ckpt, tmp_path_factory):
    """10 samples drawn by one process: the reference images."""
    out = tmp_path_factory.mktemp("one")
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4)
    return load_samples(out)


class RankOfTwo:
    """What run_sampling asks of its Accelerator, for rank `index` of a 2-process job run alone
    (it also does rank 0's part for all: the plan, samples.json): the files it leaves are those
    of a 2-process job whose other rank was preempted before it wrote anything."""

    def __init__(self, index: int):
        self.process_index, self.num_processes = index, 2
        self.is_main_process = self.is_local_main_process = True
        self.device = "cpu"

    def wait_for_everyone(self):
        pass


@pytest.mark.parametrize("n, world", [(128, 2), (50_000, 8), (50_000, 64), (50_000, 512), (3, 8), (1000, 3)])
def test_shares_differ_by_at_most_one_sample_and_cover_everything_once(n, world):
    ranges = [(lo, min(lo + 1000, n)) for lo in range(0, n, 1000)]  # the chunks of the default size
    shares = split(ranges, world)
    sizes = [sum(hi - lo for lo, hi in s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    flat = [i for s in shares for lo, hi in s for i in range(lo, hi)]
    assert flat == list(range(n))  # in index order, nothing twice
    for s in shares:  # every piece lies inside one chunk
        assert all(lo // 1000 == (hi - 1) // 1000 for lo, hi in s)


def test_shares_of_what_a_preempted_job_left():
    left = [(5, 10), (1000, 1003), (2000, 2500)]
    assert split(left, 2) == [[(5, 10), (1000, 1003), (2000, 2246)], [(2246, 2500)]]
    assert split([(0, 1)], 3) == [[], [], [(0, 1)]]


def test_parts_left_by_a_preempted_rank_resume_with_one_process(ckpt, one, tmp_path):
    out = tmp_path / "o"
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4, acc=RankOfTwo(0))
    assert not (out / "chunks" / "chunk-000000.npz").exists()  # a chunk exists only whole
    part = out / "parts" / "part-000000000-000000005.npz"
    assert [p.name for p in (out / "parts").iterdir()] == [part.name]
    info = json.loads((out / "samples.json").read_text())
    assert info["complete"] is False and info["drawn_per_process"] == [5]
    # the same directory, one process: only samples 5..9 are drawn (the part is not redrawn),
    # then the chunk is put together
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4)
    info = json.loads((out / "samples.json").read_text())
    assert info["complete"] is True and info["drawn_per_process"] == [5]
    assert list((out / "parts").iterdir()) == []  # the parts went into the chunk
    np.testing.assert_array_equal(load_samples(out), one)
    with np.load(out / "chunks" / "chunk-000000.npz") as z:
        assert z["indices"].tolist() == list(range(10))


def test_damaged_part_is_moved_aside_and_redrawn(ckpt, one, tmp_path, capsys):
    out = tmp_path / "o"
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4, acc=RankOfTwo(1))
    part = out / "parts" / "part-000000005-000000010.npz"
    part.write_bytes(part.read_bytes()[:-30])  # the disk lost its tail
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4)
    assert "part-000000005-000000010.npz: unreadable" in capsys.readouterr().out
    assert (out / "parts" / "part-000000005-000000010.npz.bad").is_file()
    assert json.loads((out / "samples.json").read_text())["drawn_per_process"] == [10]
    np.testing.assert_array_equal(load_samples(out), one)


def test_parts_of_a_finished_chunk_are_removed(ckpt, one, tmp_path):
    """A job stopped after writing a chunk and before removing its parts: the chunk counts, the
    parts go, nothing is drawn."""
    out = tmp_path / "o"
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4, acc=RankOfTwo(0))
    stale = (out / "parts" / "part-000000000-000000005.npz").read_bytes()
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4)
    (out / "parts" / "part-000000000-000000005.npz").write_bytes(stale)
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4)
    assert json.loads((out / "samples.json").read_text())["drawn_per_process"] == [0]
    assert list((out / "parts").iterdir()) == []
    np.testing.assert_array_equal(load_samples(out), one)


@pytest.mark.slow
def test_two_processes_share_fewer_samples_than_one_chunk(ckpt, one, tmp_path):
    """10 samples, the default 1000-sample chunk: both processes draw 5, the images are the
    1-process run's, and the one chunk is whole with no parts left."""
    two = tmp_path / "two"
    r = run_eval("sample", ckpt, "--out", two, "--num-samples", 10, "--batch-size", 3, launcher=TORCHRUN)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((two / "samples.json").read_text())
    assert info["complete"] is True and info["processes"] == 2 and info["drawn_per_process"] == [5, 5]
    assert info["protocol"]["chunk_size"] == 1000 and info["chunks"] == ["chunk-000000.npz"]
    assert list((two / "parts").iterdir()) == []
    np.testing.assert_array_equal(load_samples(two), one)


@pytest.mark.slow
def test_a_preempted_job_resumes_with_another_process_count(ckpt, one, tmp_path):
    """A 2-process job lost rank 0 before it wrote anything; 2 real processes resume it and
    split the 5 missing samples 2 + 3."""
    out = tmp_path / "o"
    run_sampling(load_model(str(ckpt)), out, num_samples=10, batch_size=4, acc=RankOfTwo(1))
    r = run_eval("sample", ckpt, "--out", out, "--num-samples", 10, "--batch-size", 4, launcher=TORCHRUN)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "samples.json").read_text())
    assert info["complete"] is True and info["drawn_per_process"] == [2, 3]
    assert list((out / "parts").iterdir()) == []
    np.testing.assert_array_equal(load_samples(out), one)


@pytest.mark.slow
def test_fig10_is_shared_by_two_processes_and_scores_like_one(tmp_path):
    """`eval figures --which 10` on 2 processes: each draws half of Fig. 10's samples (before, rank
    0 drew them all and then waited forever in the feature gather rank 1 had left), and the FID
    along the reverse process is the 1-process one."""
    from support.cli import eval_env
    from support.folder_shards import make_folder_shards
    from support.model import tiny_recipe

    shards = make_folder_shards(tmp_path / "d", n=12, size=8, test_count=3)
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(timesteps=20, shards=str(shards)))
    fid = {}
    for name, launcher in (("one", (PY, "-m")), ("two", TORCHRUN)):
        r = run_eval("figures", ck, "--out", tmp_path / name, "--which", "10", "--fig10-samples", 6,
                     "--fig10-points", 3, "--batch-size", 4,
                     "--feature-extractor", "tiny-seeded=support.features:TinyFeatures",
                     env=eval_env(DDPM_CACHE=str(tmp_path / f"cache-{name}")), launcher=launcher, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        fid[name] = json.loads((tmp_path / name / "fig10_progressive_quality.json").read_text())["fid"]
    np.testing.assert_allclose(fid["two"], fid["one"], rtol=1e-6)  # float64 moments merged per rank
