"""Damaged checkpoints are survived, and nothing good is lost (issue 13): checksums verified on
resume and load with a fallback to the previous complete checkpoint, a confined `latest`
pointer, a refused resume that writes nothing, divergence that keeps the newest good
checkpoint, and a full disk while saving."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from pipeline import checkpoint as ck
from pipeline.config import RecipeError, load_recipe
from pipeline.data import DataError
from pipeline.hub import load_pretrained
from pipeline.integrity import damage
from pipeline.train import EXIT_OK
from pipeline.trainer import Hooks, NonFiniteLossError, train
from pipeline.weights import LoadError
from support.datasets import make_shards
from support.training import HOOKS_SCRIPT, PY, ROOT, env, make_tiny_shards, run_train, train_cmd, write_recipe


def reset_accelerate():
    """Accelerate keeps process-wide singletons; each in-process run starts clean."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards") / "s")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shards):
    """A run with complete checkpoints at steps 2 and 4."""
    d = tmp_path_factory.mktemp("base")
    recipe = load_recipe(write_recipe(d / "r.yaml", shards, d / "run", train={"max_steps": 4}))
    try:
        assert train(recipe) == EXIT_OK
    finally:
        reset_accelerate()
    return d / "run"


@pytest.fixture
def run(tmp_path, base_run):
    shutil.copytree(base_run, tmp_path / "run")
    yield tmp_path / "run"
    reset_accelerate()


def resume(tmp_path, shards, run, **sections):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", shards, run, **sections))
    return train(recipe)


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _optimizer_file(c):
    return next(p for p in (c / "accelerate").iterdir() if p.name.startswith("optimizer"))


DAMAGE = {
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors has"),
    "missing ema": (lambda c: (c / "ema.safetensors").unlink(), "ema.safetensors is missing"),
    "corrupt optimizer": (lambda c: _flip(_optimizer_file(c)), "does not match its sha256"),
    "missing accelerate state": (lambda c: shutil.rmtree(c / "accelerate"), "is missing"),
    "garbage trainer state": (lambda c: (c / "trainer_state.json").write_bytes(b"\x00{not json"), "unreadable"),
    "edited config": (lambda c: (c / "config.yaml").write_text("model: {}\n"), "config.yaml has"),
}


def test_checkpoints_record_checksums(base_run):
    for c in ck.list_checkpoints(base_run):
        files = ck.read_trainer_state(c)["files"]
        assert {"model.safetensors", "ema.safetensors", "config.yaml"} <= set(files)
        assert any(k.startswith("accelerate/") for k in files) and damage(c) is None


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_previous(run, kind):
    hurt, why = DAMAGE[kind]
    hurt(run / "checkpoints" / "step-00000004")
    lines = []
    got = ck.latest_intact(run, set_aside=True, report=lines.append)
    assert got == run / "checkpoints" / "step-00000002" and len(lines) == 1
    assert "step-00000004: damaged (" in lines[0] and why in lines[0] and "using the previous complete" in lines[0]
    # Set aside, not deleted: neither resumed nor counted when pruning, and still there to look at.
    assert (run / "checkpoints" / ".damaged-step-00000004").is_dir()
    assert [c.name for c in ck.list_checkpoints(run)] == ["step-00000002"]


@pytest.mark.parametrize("kind", ["truncated weights", "garbage trainer state"])
def test_resume_survives_damage_end_to_end(tmp_path, shards, run, capsys, kind):
    DAMAGE[kind][0](run / "checkpoints" / "step-00000004")
    assert resume(tmp_path, shards, run, train={"max_steps": 6}) == EXIT_OK
    out = capsys.readouterr().out
    assert "damaged" in out and f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in out
    newest = ck.latest_checkpoint(run)
    assert newest.name == "step-00000006" and damage(newest) is None


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, shards, run):
    for c in ck.list_checkpoints(run):
        _truncate(c / "ema.safetensors")
    with pytest.raises(ck.CheckpointError, match="every checkpoint is damaged"):
        ck.latest_intact(run)
    # The first launch refuses and sets them aside; the second must not start over at step 0.
    with pytest.raises(ck.CheckpointError, match="every checkpoint is damaged"):
        resume(tmp_path, shards, run, train={"max_steps": 6})
    reset_accelerate()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".damaged"))
    assert kept == [".damaged-step-00000002", ".damaged-step-00000004"]
    with pytest.raises(RecipeError, match="no intact checkpoint, and 2 damaged one.s. set aside .*step 0"):
        resume(tmp_path, shards, run, train={"max_steps": 6})
    assert not ck.list_checkpoints(run)


def test_damage_set_aside_twice_keeps_both_copies(run):
    c4 = run / "checkpoints" / "step-00000004"
    shutil.copytree(c4, run / "spare")
    _truncate(c4 / "ema.safetensors")
    ck.latest_intact(run, set_aside=True, report=lambda m: None)
    shutil.copytree(run / "spare", c4)  # the same step written again, and damaged again
    _flip(c4 / "model.safetensors")
    ck.latest_intact(run, set_aside=True, report=lambda m: None)
    first, second = run / "checkpoints" / ".damaged-step-00000004", run / "checkpoints" / ".damaged-step-00000004.2"
    assert damage(first) and "ema.safetensors" in damage(first)
    assert damage(second) and "model.safetensors" in damage(second)


def test_load_verifies_checksums(run):
    c4 = run / "checkpoints" / "step-00000004"
    _flip(c4 / "ema.safetensors")
    with pytest.raises(LoadError, match="damaged checkpoint: ema.safetensors does not match its sha256"):
        load_pretrained(c4)
    with pytest.raises(LoadError, match="damaged checkpoint"):
        load_pretrained(c4 / "ema.safetensors")
    assert load_pretrained(run).source.endswith("step-00000002/ema.safetensors")  # the run: newest intact


@pytest.mark.parametrize("pointer", [b"../../outside/step-00000009\n", b"{outside}/step-00000009\n",
                                     b"../../outside\n", b"step-00000004/../../../outside/step-00000009\n",
                                     b"\xff\xfe" * 100, b"step-99999999\n", b""])
def test_latest_pointer_never_leads_outside(tmp_path, run, pointer):
    outside = tmp_path / "outside"  # a complete, newer checkpoint somewhere else
    shutil.copytree(run / "checkpoints" / "step-00000004", outside / "step-00000009")
    (run / "checkpoints" / "latest").write_bytes(pointer.replace(b"{outside}", str(outside).encode()))
    lines = []
    got = ck.latest_intact(run, report=lines.append)
    assert got == run / "checkpoints" / "step-00000004" and ck.latest_checkpoint(run) == got
    named_a_step = pointer == b"step-99999999\n"  # a plain name, just not there: nothing to report
    assert len(lines) == (0 if named_a_step else 1) and all("latest: damaged" in ln for ln in lines)
    # A step-* symlink to a folder outside is not a checkpoint either.
    os.symlink(outside / "step-00000009", run / "checkpoints" / "step-00000009")
    assert ck.latest_checkpoint(run) == got and ck.latest_intact(run) == got


@pytest.mark.parametrize("sections, error, match", [
    ({"model": {"ch": 64}}, RecipeError, "model.ch: 32 -> 64"),
    ({"model": {"ch_mult": [1, 1]}}, RecipeError, "model.ch_mult"),
    ({"train": {"seed": 8}}, RecipeError, "train.seed: 7 -> 8"),
])
def test_refused_resume_changes_nothing(tmp_path, shards, run, sections, error, match):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(error, match=match):
        resume(tmp_path, shards, run, train={"max_steps": 6, **sections.get("train", {})},
               **{k: v for k, v in sections.items() if k != "train"})
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # config.yaml included


def test_resume_with_another_dropout_is_allowed(tmp_path, shards, run):
    """README: resuming refuses any other `model` key but dropout (a regulariser, not the
    architecture: the weights fit unchanged)."""
    assert resume(tmp_path, shards, run, train={"max_steps": 6}, model={"dropout": 0.3}) == EXIT_OK
    assert ck.latest_checkpoint(run).name == "step-00000006"
    assert load_recipe(run / "config.yaml").model.dropout == 0.3


@pytest.mark.parametrize("n_train, seed, match", [
    (30, 0, "these shards hold 30"),  # another size
    (24, 5, "another data set of 24 samples"),  # the same size, keys and layout, other images
])
def test_resume_on_other_data_changes_nothing(tmp_path, run, n_train, seed, match):
    other = make_shards(tmp_path / "other", n_train=n_train, n_test=4, seed=seed, resolution=16, shard_size=7)
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(DataError, match=match):
        resume(tmp_path, other, run, train={"max_steps": 6})
    assert (run / "config.yaml").read_bytes() == before


def test_a_blow_up_with_finite_weights_keeps_the_last_sane_checkpoint(tmp_path, shards, run, capsys):
    """lr 3 from step 4 with keep_checkpoints 1: the weights stay finite but the loss explodes
    (at lr 1e6 the loss is non-finite at once: skipped steps, the rule of the next test); pruning
    keeps step 4 (the last sane one) beside the newest and names it."""
    sane = ck.read_trainer_state(run / "checkpoints" / "step-00000004")["loss"]
    assert resume(tmp_path, shards, run, train={"max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 1,
                                                "lr": 3.0, "warmup_steps": 0}) == EXIT_OK
    names = [c.name for c in ck.list_checkpoints(run)]
    assert names == ["step-00000004", "step-00000008"], names
    blown = ck.read_trainer_state(run / "checkpoints" / "step-00000008")["loss"]
    assert blown > 100 * sane, (sane, blown)
    assert "the run may have diverged; step-00000004 is kept" in capsys.readouterr().out
    # A run whose loss does not spike keeps only the newest, as before.
    again = tmp_path / "calm"
    recipe = load_recipe(write_recipe(tmp_path / "c.yaml", shards, again,
                                      train={"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 1}))
    reset_accelerate()
    assert train(recipe) == EXIT_OK
    assert [c.name for c in ck.list_checkpoints(again)] == ["step-00000006"]


def test_divergence_keeps_the_newest_good_checkpoint(tmp_path, shards):
    """Non-finite weights after a finite loss (an infinite gradient): never saved, never pruning
    the good checkpoint; the run stops with one line naming it."""
    def poison(step, loss):  # value unchanged, gradient inf * 0 = nan at step 2
        return loss + torch.sqrt(loss - loss.detach()) if step == 2 else loss

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run",
                                      train={"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 1}))
    try:
        with pytest.raises(NonFiniteLossError) as e:
            train(recipe, hooks=Hooks(loss=poison))
    finally:
        reset_accelerate()
    good = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert f"the newest good checkpoint is {good}" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert [c.name for c in ck.list_checkpoints(tmp_path / "run")] == [good.name] and damage(good) is None


def assert_save_failed_cleanly(p, run: str, why: str) -> None:
    """One error line naming the checkpoint, the free space and the reason; the partial
    checkpoint removed; the previous one intact and the run's newest."""
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert "no space to write checkpoint step-00000004" in errors[0] and "MiB free there" in errors[0]
    assert why in errors[0], errors[0]
    assert "newest complete one: step-00000002" in errors[0] and "Traceback" not in p.stderr
    d = run / "checkpoints"
    assert sorted(x.name for x in d.iterdir()) == ["latest", "step-00000002"]  # partial removed
    assert damage(d / "step-00000002") is None
    assert json.loads((d / "step-00000002" / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.slow  # a training process
def test_file_size_limit_while_saving(tmp_path, shards):
    """A write past RLIMIT_FSIZE (EFBIG) from step 3 on is reported as a full disk."""
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run", train={"max_steps": 4})
    p = subprocess.run([PY, HOOKS_SCRIPT, "--file-limit-at", "3", str(recipe)], env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert_save_failed_cleanly(p, tmp_path / "run", "File too large")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MiB tmpfs of its own (root only): a file system that really fills, with ENOSPC."""
    d = tmp_path / "fs"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.slow  # a training process
def test_disk_full_while_saving(tmp_path, shards, small_tmpfs):
    """The run's file system fills at step 3 (a real ENOSPC, not a limit): checkpoint 4 fails."""
    run = small_tmpfs / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, run, train={"max_steps": 4})
    p = subprocess.run([PY, HOOKS_SCRIPT, "--fill-disk-at", "3", "--filler", str(small_tmpfs / "filler"),
                        str(recipe)], env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (small_tmpfs / "filler").stat().st_size > 0
    assert_save_failed_cleanly(p, run, "No space left on device")


@pytest.mark.slow  # a 2-process training launch over gloo
def test_disk_full_on_two_processes_is_one_line_on_every_rank(tmp_path, shards, small_tmpfs):
    """Both ranks end with the same line (the launcher then reports the failed children itself);
    no rank prints a traceback and the previous checkpoint is intact."""
    run = small_tmpfs / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, run, train={"max_steps": 4})
    cmd, e = train_cmd(recipe, procs=2, script=(HOOKS_SCRIPT, "--fill-disk-at", "3", "--filler",
                                                str(small_tmpfs / "filler")))
    p = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], p.stderr[-3000:]
    assert "no space to write checkpoint step-00000004" in errors[0] and "newest complete one: step-00000002" in errors[0]
    # The one traceback is the launcher's own report of its failed children (exit code 2 each).
    assert p.stderr.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in p.stderr, p.stderr[-3000:]
    # Each child exits 2, unless the launcher's SIGTERM reached it first: torchrun stops the other
    # workers as soon as one has exited, and that race is the launcher's, after both lines.
    codes = re.findall(r"exitcode  : (-?\d+)", p.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, p.stderr[-3000:]
    d = run / "checkpoints"
    assert sorted(x.name for x in d.iterdir()) == ["latest", "step-00000002"] and damage(d / "step-00000002") is None


@pytest.mark.slow  # two 2-process training launches over gloo
def test_two_process_resume_falls_back_together(tmp_path, shards):
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run", train={"max_steps": 4})
    p = run_train(recipe, procs=2)
    assert p.returncode == 0, p.stderr[-3000:]
    d = tmp_path / "run" / "checkpoints"
    _flip(_optimizer_file(d / "step-00000004"))
    p = run_train(recipe, "train.max_steps=6", procs=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("step-00000004: damaged (") == 1  # one line, from the main process
    assert f"resumed from {d / 'step-00000002'} at step 2" in p.stdout
    assert damage(d / "step-00000006") is None and (d / ".damaged-step-00000004").is_dir()
