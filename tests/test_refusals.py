"""Untrusted inputs are refused in one line, and nothing they carry runs: CIFAR pickles that
call code, YAML alias bombs (recipe, override, a checkpoint's config.yaml), Slurm values that
would add lines to the batch script, unbounded values in messages (issue 13)."""

from __future__ import annotations

import os
import pickle
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from data_prep.__main__ import main as data_prep_main
from pipeline import train as train_cli
from pipeline.config import RecipeError, load_recipe
from pipeline.hub import load_pretrained
from pipeline.weights import LoadError
from slurm.submit import main as submit_main
from support.datasets import make_cifar10_batches
from support.training import make_tiny_shards, write_recipe


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ pickles that call code


class _Call:
    """Pickles to a call of `fn(*args)` (what an attacker's batch file holds)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path):
    return {
        "os.system": {b"data": _Call(os.system, f"touch {marker}")},
        "exec": {b"data": _Call(exec, f"open({str(marker)!r}, 'w').close()")},
        "subprocess": {b"data": _Call(subprocess.Popen, ["touch", str(marker)])},
        "nested in labels": {b"labels": [_Call(os.system, f"touch {marker}")], b"data": None},
    }


@pytest.mark.parametrize("name", ["os.system", "exec", "subprocess", "nested in labels"])
def test_cifar_pickle_that_runs_code_is_refused(tmp_path, capsys, name):
    src = make_cifar10_batches(tmp_path / "batches", n_train=10, n_test=2)
    marker = tmp_path / "PWNED"
    (src / "data_batch_3").write_bytes(pickle.dumps(_payloads(marker)[name]))
    code = data_prep_main(["cifar10", "--batches", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "data_batch_3: refused: the pickle calls" in line
    time.sleep(0.05)  # a Popen would have run by now
    assert not marker.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5, "py2 module names"])
def test_genuine_cifar_pickles_still_load(tmp_path, capsys, protocol):
    src = make_cifar10_batches(tmp_path / "batches", n_train=10, n_test=2)
    for f in src.iterdir():  # the same batches, pickled as another Python or numpy would
        d = pickle.loads(f.read_bytes())
        raw = pickle.dumps(d, protocol=protocol if isinstance(protocol, int) else 2)
        if not isinstance(protocol, int):  # numpy 1.x / Python 2 name the array module numpy.core
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        f.write_bytes(raw)
    code = data_prep_main(["cifar10", "--batches", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0 and (tmp_path / "out" / "manifest.json").is_file(), capsys.readouterr().err


# ------------------------------------------------------------------ YAML bombs and errors

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi"))  # 10^9 nodes once expanded, 400 bytes on disk
RECURSIVE = "model: &m\n  preset: cifar10\n  self: *m\n"


@pytest.mark.parametrize("text, want", [
    (BOMB, "alias bomb"),
    ("train:\n  lr: " + BOMB.replace("\n", "\n  ").replace("a: &a", "{}\n  a: &a", 1), "alias bomb"),
    (RECURSIVE, "recursive alias"),
    ("run:\n  name: " + "x" * (2 << 20) + "\n", "more than the 1048576"),
])
def test_yaml_bombs_refused_fast(tmp_path, text, want):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=want) as e:
        load_recipe(p)
    assert time.perf_counter() - t0 < 2.0
    assert str(p) in str(e.value) and len(str(e.value)) < 300


def test_alias_bomb_in_override_and_in_downloaded_config(tmp_path, tiny_unet):
    r = tmp_path / "r.yaml"
    r.write_text("model:\n  preset: cifar10\n")
    levels = ["&a [" + ",".join(["x"] * 10) + "]"] + [  # a flow-style bomb fits on one command line
        f"&{c} [" + ",".join([f"*{p}"] * 10) + "]" for p, c in zip("abcdefgh", "bcdefghi")]
    bomb = "[" + ", ".join(levels) + "]"
    with pytest.raises(RecipeError, match="command line override .* alias bomb"):
        load_recipe(r, [f"run.name={bomb}"])
    # A checkpoint folder (as a Hub download lands) whose config.yaml is a bomb.
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.yaml").write_text(BOMB)
    save_file(tiny_unet().state_dict(), str(ck / "ema.safetensors"))
    with pytest.raises(LoadError, match="alias bomb"):
        load_pretrained(ck)


@pytest.mark.parametrize("text, where", [
    ("model:\n  preset: cifar10\ntrain:\n  lr: [1e-4\n", "line 5, column 1"),
    ("model:\n  preset: cifar10\n   bad: 1\n", "line 3, column 7"),
    ("model: {preset: cifar10\n", "line 2, column 1"),
    ("\tmodel: 1\n", "line 1, column 1"),
])
def test_yaml_syntax_errors_name_line_and_column(tmp_path, capsys, text, where):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    assert train_cli.main([str(p), "--dry-run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{p}: {where}: not valid YAML" in line


@pytest.mark.parametrize("override, want", [
    ("train.lr=fast", "command line override 'train.lr=fast' (recipe {p}): train.lr: expected float"),
    ("train.lrr=1", "command line override 'train.lrr=1' (recipe {p}): unknown key 'train.lrr'"),
    ("train.adam_betas=[0.9]", "command line override 'train.adam_betas=[0.9]' (recipe {p}): train.adam_betas"),
    ("trainlr=1", "command line override 'trainlr=1' (recipe {p}): the key must be section.key"),
])
def test_override_errors_say_command_line(tmp_path, capsys, override, want):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  preset: cifar10\n")
    assert train_cli.main([str(p), "--dry-run", override]) == 2
    assert want.format(p=p) in one_error_line(capsys.readouterr().err)


def test_file_errors_name_the_file_not_the_command_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  preset: cifar10\ntrain:\n  lr: fast\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["train.max_steps=3"])
    assert str(e.value).startswith(f"{p}: train.lr: expected float") and "command line" not in str(e.value)


@pytest.mark.parametrize("override", ["train.lr=" + "9" * 200_000, "train.lr=[" + "1," * 20_000 + "1]",
                                      "train.sed" + "d" * 100_000 + "=1"])
def test_messages_never_echo_unbounded_values(tmp_path, capsys, override):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  preset: cifar10\n")
    assert train_cli.main([str(p), "--dry-run", override]) == 2
    assert len(one_error_line(capsys.readouterr().err)) < 1100


# ------------------------------------------------------------------ Slurm values


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    return write_recipe(d / "r.yaml", make_tiny_shards(d / "s"), d / "run")


@pytest.mark.parametrize("args, want", [
    (["--partition", "gpu\ntouch /tmp/pwned"], "--partition 'gpu\\ntouch /tmp/pwned': not a Slurm name"),
    (["--account", "acct; rm -rf ~"], "--account"),
    (["--qos", "normal\n#SBATCH --wrap=x"], "--qos"),
    (["--constraint", "a100\nrm x"], "--constraint"),
    (["--job-name", "a b"], "--job-name"),
    (["run.name=a\nb"], "run.name"),
    (["--time", "1:00\nfoo"], "--time"),
    (["--time", "0"], "--time '0': must be positive"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--cpus-per-task", "0"], "--cpus-per-task must be at least 1"),
    (["--mem-gb", "-4"], "--mem-gb must be a positive number"),
    (["--mem-gb", "nan"], "--mem-gb must be a positive number"),
    (["--signal-delay-s", "-1"], "--signal-delay-s must be at least 0"),
    (["--max-requeues", "-1"], "--max-requeues must be at least 0"),
    (["--job-dir", "jobs/a\ntouch pwned"], "a path with a line break"),
])
def test_slurm_values_validated_before_any_script(recipe, capsys, args, want):
    assert submit_main([str(recipe), "--dry-run", "--cpu", *args]) == 2
    out, err = capsys.readouterr()
    assert want in one_error_line(err) and "#SBATCH" not in out and out == ""


def test_slurm_good_values_make_a_script(recipe, capsys):
    args = ["--partition", "gpu", "--account", "proj-1", "--constraint", "a100&ib", "--time", "2-00:30:00",
            "--mem-gb", "64", "--job-name", "ddpm.lsun"]
    assert submit_main([str(recipe), "--dry-run", "--cpu", *args]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --partition=gpu" in out and "#SBATCH --time=2910" in out
