"""The trust boundary, round 2 (issue 23): the newer input surfaces hold to the threat model of
the README. Manifests and checksum lists of remote shards and of `data_prep push` never name a
file outside their folder; one trainer per run folder; `--resume-from` verified like an automatic
resume; DeepSpeed checkpoints read without unpickling code. Every case is refused in one line
(exit 2) before anything is fetched, written, uploaded or run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess as sp
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.hub import push_shards
from data_prep.sources import PrepError
from pipeline.data import TrainLoader
from pipeline.remote_shards import RemoteShardsError
from pipeline.safe_names import name_problem
from support.hub import ROOT, hub_env
from support.training import make_tiny_shards, train_cmd, write_recipe


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


# ------------------------------------------------------------------ names a listing gives


@pytest.mark.parametrize("name, subfolders, ok", [
    ("train-000000.tar", False, True),
    ("accelerate/model.safetensors", True, True),
    ("accelerate/model.safetensors", False, False),
    ("/etc/passwd", True, False),
    ("../x.tar", True, False),
    ("a/../../x.tar", True, False),
    ("a//b", True, False),
    ("./x.tar", False, False),
    ("..\\x.tar", False, False),
    ("C:x.tar", False, False),
    ("x\0.tar", False, False),
    ("", False, False),
    (None, False, False),
    (["x.tar"], False, False),
    ("x" * 2000, False, False),
])
def test_one_rule_for_names_in_listings(name, subfolders, ok):
    assert (name_problem(name, subfolders=subfolders) is None) == ok


# ------------------------------------------------------------------ row 1: remote shards (fsspec URL)


def _source_with(tmp_path: Path, shards: Path, name: str, checksums: dict | None = None) -> Path:
    """A copy of `shards` whose manifest names its first train shard `name` (what an attacker's
    bucket serves), with the file that name reaches put there so a fetch would succeed."""
    src = tmp_path / "bucket" / "data"
    shutil.copytree(shards, src)
    m = json.loads((src / "manifest.json").read_text())
    first = m["splits"]["train"]["shards"][0]
    reached = Path(os.path.normpath(src / name))
    if "\0" not in name and "\\" not in name:
        reached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / first["name"], reached)
    first["name"] = name
    (src / "manifest.json").write_text(json.dumps(m))
    if checksums is not None:
        (src / "checksums.json").write_text(json.dumps(checksums))
    return src


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "deep dotdot", "backslash", "NUL", "sub-folder"])
def test_remote_manifest_naming_a_file_outside_is_refused_before_any_fetch(tmp_path, monkeypatch, kind):
    shards = make_tiny_shards(tmp_path / "shards")
    name = {"absolute": str(tmp_path / "elsewhere" / "victim.tar"), "dotdot": "../escape.tar",
            "deep dotdot": "x/../../../escape.tar", "backslash": "..\\escape.tar", "NUL": "a\0.tar",
            "sub-folder": "sub/train.tar"}[kind]
    src = _source_with(tmp_path, shards, name)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DDPM_SHARDS_CACHE", str(cache))
    before = _files(tmp_path)
    with pytest.raises(RemoteShardsError) as e:
        TrainLoader(f"file://{src}", batch_size=4, seed=0, num_workers=0)
    msg = str(e.value)
    assert "\n" not in msg and f"data.shards=file://{src}: manifest.json: splits.train.shards[0].name" in msg
    # Nothing fetched or written: no shard in the cache, nothing new anywhere else.
    assert not any(f.endswith(".tar") for f in _files(cache)), _files(cache)
    assert _files(tmp_path) - {f"cache/{f}" for f in _files(cache)} == before


def test_remote_checksums_naming_a_file_outside_is_refused(tmp_path, monkeypatch):
    shards = make_tiny_shards(tmp_path / "shards")
    src = tmp_path / "bucket"
    shutil.copytree(shards, src)
    (src / "checksums.json").write_text(json.dumps({"../../x.tar": {"sha256": "0" * 64, "bytes": 1}}))
    monkeypatch.setenv("DDPM_SHARDS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RemoteShardsError, match=r"checksums.json: entry '../../x.tar' has an empty, '.' or '..' part"):
        TrainLoader(f"file://{src}", batch_size=4, seed=0, num_workers=0)
    assert not any(f.endswith(".tar") for f in _files(tmp_path / "cache"))


def test_remote_manifest_refusal_is_one_line_exit_2_from_the_trainer(tmp_path):
    shards = make_tiny_shards(tmp_path / "shards")
    src = _source_with(tmp_path, shards, "../escape.tar")
    recipe = write_recipe(tmp_path / "r.yaml", f"file://{src}", tmp_path / "run")
    cmd, env = train_cmd(recipe, "train.max_steps=2")
    r = sp.run(cmd, env={**env, "DDPM_SHARDS_CACHE": str(tmp_path / "cache")}, cwd=ROOT, capture_output=True,
               text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "manifest.json: splits.train.shards[0].name: '../escape.tar'" in one_error_line(r.stderr)
    assert not any(f.endswith(".tar") for f in _files(tmp_path / "cache"))


# ------------------------------------------------------------------ row 2: data_prep push


def _push_source(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A finished-looking data_prep output whose manifest reaches a secret: (folder, secret)."""
    shards = make_tiny_shards(tmp_path / "shards")
    out = tmp_path / "out"
    shutil.copytree(shards, out)
    secret = tmp_path / "home" / "id_rsa.tar"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    m = json.loads((out / "manifest.json").read_text())
    first = m["splits"]["train"]["shards"][0]
    (out / first["name"]).unlink()
    if kind == "absolute":
        first["name"] = str(secret)
    elif kind == "dotdot":
        first["name"] = "../home/id_rsa.tar"
    else:  # a symbolic link under the listed name
        (out / first["name"]).symlink_to(secret)
    (out / "manifest.json").write_text(json.dumps(m))
    return out, secret


@pytest.mark.parametrize("kind, want", [
    ("absolute", r"manifest.json: splits.train.shards\[0\].name: '/.*id_rsa.tar' is not a plain .* \(is an absolute path\)"),
    ("dotdot", r"manifest.json: splits.train.shards\[0\].name: '../home/id_rsa.tar' is not a plain .* \(has an empty"),
    ("symlink", r"train-000000.tar: listed in manifest.json but a symbolic link"),
])
def test_push_of_a_manifest_naming_a_file_outside_uploads_nothing(hub, tmp_path, kind, want):
    out, _ = _push_source(tmp_path, kind)
    with pytest.raises(PrepError, match=want) as e:
        push_shards(out, "alice/leak")
    assert "\n" not in str(e.value)
    assert hub.requests == []  # refused before the Hub was contacted: nothing uploaded, no repo made


def test_push_refusal_is_one_line_exit_2_from_the_cli(hub, tmp_path):
    out, _ = _push_source(tmp_path, "absolute")
    r = sp.run([sys.executable, "-m", "data_prep", "push", str(out), "--repo-id", "alice/leak"], cwd=ROOT,
               env=hub_env(hub, tmp_path / "hf-home"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "splits.train.shards[0].name" in one_error_line(r.stderr) and hub.requests == []


# ------------------------------------------------------------------ row 5: one trainer per run folder

HOLD = "import sys; from pipeline import run_lock; run_lock.acquire(sys.argv[1]); print('held', flush=True); sys.stdin.read()"


def _holder(run_dir: Path) -> sp.Popen:
    """Another process that takes the run folder's lock and keeps it until its stdin closes."""
    p = sp.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                 stdin=sp.PIPE, stdout=sp.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("state, want", [
    ("held by a live process", "in use by another trainer (host {host}, pid {pid}"),
    ("left by a killed process", "the trainer that held this run folder (host {host}, pid {pid}, since"),
    ("left empty", None),
    ("a symbolic link", "cannot open the run folder's lock"),
])
def test_run_folder_lock_states(tmp_path, state, want):
    import socket

    from pipeline import run_lock

    run = tmp_path / "run"
    run.mkdir()
    pid = None
    holder = None
    if state.startswith(("held", "left by")):
        holder = _holder(run)
        pid = holder.pid
        if state.startswith("left by"):
            holder.kill()  # SIGKILL: no exit handler removes the file
            holder.wait()
            assert (run / ".lock").is_file()
    elif state == "left empty":
        (run / ".lock").write_text("")
    else:
        (run / ".lock").symlink_to(tmp_path / "elsewhere")
    want = want and want.format(host=socket.gethostname(), pid=pid)
    notices = []
    try:
        if state in ("held by a live process", "a symbolic link"):
            with pytest.raises(run_lock.RunLockedError) as e:
                run_lock.acquire(run, notice=notices.append)
            assert want in str(e.value) and "\n" not in str(e.value)
            assert not (tmp_path / "elsewhere").exists()
        else:  # taken: with one notice naming the dead holder, or silently when it named nobody
            run_lock.acquire(run, notice=notices.append)
            assert len(notices) == 1 and want in notices[0] if want else notices == []
            assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
            run_lock.release(run)
            assert not (run / ".lock").exists()
    finally:
        if holder is not None and holder.poll() is None:
            holder.stdin.close()
            holder.wait()


def test_second_trainer_on_a_run_folder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    """Real processes: a holder of RUN/.lock and the real trainer CLI."""
    import socket

    shards = make_tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, run)
    cmd, env = train_cmd(recipe, "train.max_steps=2")
    holder = _holder(run)
    try:
        r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stdout + r.stderr
        line = one_error_line(r.stderr)
        assert f"is in use by another trainer (host {socket.gethostname()}, pid {holder.pid}," in line
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()  # dies holding it: the file stays, naming a process that is gone
        holder.wait()
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    taken = [ln for ln in r.stdout.splitlines() if "lock taken over" in ln]
    assert len(taken) == 1 and f"pid {holder.pid}," in taken[0], r.stdout
    assert (run / "checkpoints" / "step-00000002").is_dir() and not (run / ".lock").exists()


# ------------------------------------------------------------------ row 4: --resume-from is verified


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run's checkpoint step 2 (the trainer CLI, one process): (shards, checkpoint)."""
    tmp = tmp_path_factory.mktemp("trained")
    shards = make_tiny_shards(tmp / "shards")
    recipe = write_recipe(tmp / "r.yaml", shards, tmp / "run", train={"max_steps": 2})
    cmd, env = train_cmd(recipe)
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return shards, tmp / "run" / "checkpoints" / "step-00000002"


def _flip_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _list_outside(ckpt: Path, name: str) -> None:
    """trainer_state.json lists `name` too (first): verifying it would read that file."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["files"] = {name: {"bytes": 0, "sha256": "0" * 64}, **state["files"]}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def _drop_checksums(ckpt: Path) -> None:
    """As a checkpoint written before checksums were recorded."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["files"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("case, damage, want", [
    ("altered weights", lambda c: _flip_byte(c / "model.safetensors"),
     "damaged checkpoint step-00000002: model.safetensors does not match its sha256"),
    ("truncated EMA", lambda c: _truncate(c / "ema.safetensors"),
     "damaged checkpoint step-00000002: ema.safetensors has"),
    ("altered optimizer state", lambda c: _flip_byte(c / "accelerate" / "optimizer.bin"),
     "damaged checkpoint step-00000002: accelerate/optimizer.bin does not match its sha256"),
    ("missing model", lambda c: (c / "accelerate" / "model.safetensors").unlink(),
     "damaged checkpoint step-00000002: accelerate/model.safetensors is missing"),
    ("listing names a file outside", lambda c: _list_outside(c, "../../../etc/passwd"),
     "lists a bad file entry: '../../../etc/passwd' has an empty, '.' or '..' part"),
    ("truncated, from before checksums", lambda c: (_drop_checksums(c), _truncate(c / "accelerate" / "model.safetensors")),
     "unreadable weights"),
])
def test_resume_from_a_damaged_checkpoint_is_refused_in_one_line(trained, tmp_path, case, damage, want):
    shards, good = trained
    ckpt = tmp_path / "copy" / "checkpoints" / good.name
    shutil.copytree(good, ckpt)
    damage(ckpt)
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, run, train={"max_steps": 4})
    cmd, env = train_cmd(recipe, "--resume-from", str(ckpt))
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert want in one_error_line(r.stderr) and "Traceback" not in r.stderr
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()  # nothing trained or kept


def test_resume_from_an_intact_checkpoint_still_resumes(trained, tmp_path):
    shards, good = trained
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run", train={"max_steps": 3})
    cmd, env = train_cmd(recipe, "--resume-from", str(good))
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resumed from {good} at step 2" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ row 3: DeepSpeed files, weights only


class _Call:
    """Pickles to a call of `fn(*args)`: what an attacker's checkpoint file holds."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _zero_state(extra=None) -> dict:
    """The shape of a ZeRO-2 optimizer states file (what DeepSpeed writes), plus `extra`."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    opt = {"loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
           "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]},
           "single_partition_of_fp32_groups": [torch.ones(3)], "zero_stage": ZeroStageEnum.gradients,
           "param_slice_mappings": [{"w": fragment_address(numel=3, start=0)}],
           "fp16": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False)}
    return {"optimizer_state_dict": {**opt, **(extra or {})}, "ds_config": {"train_batch_size": 4}, "ds_version": "0.19"}


@pytest.mark.parametrize("payload, type_name", [
    ("os.system", "posix.system"),
    ("exec", "exec"),
    ("subprocess", "commands.Popen"),  # pickled under its Python 2 name
    ("in a loss scaler", "posix.system"),
])
def test_deepspeed_file_that_runs_code_is_refused_and_nothing_runs(tmp_path, payload, type_name):
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from pipeline.deepspeed_load import ForeignCheckpointError, weights_only

    marker = tmp_path / "PWNED"
    call = {"os.system": _Call(os.system, f"touch {marker}"),
            "exec": _Call(exec, f"open({str(marker)!r}, 'w').close()"),
            "subprocess": _Call(sp.Popen, ["touch", str(marker)])}.get(payload)
    if payload == "in a loss scaler":  # inside an allowed type: its state is read weights-only too
        call = LossScaler(1.0)
        call.cur_scale = _Call(os.system, f"touch {marker}")
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(_zero_state({"extra": call}), path)
    engine = TorchCheckpointEngine()  # DeepSpeed's own engine, as the trainer's DeepSpeed engine holds it
    with weights_only([type("Engine", (), {"checkpoint_engine": engine})()]):
        with pytest.raises(ForeignCheckpointError) as e:
            engine.load(str(path), map_location="cpu")
    assert f"{path}: not read: it holds the global {type_name}" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    assert "load" not in vars(engine)  # DeepSpeed's engine is as it was outside a restore


def test_genuine_deepspeed_state_still_loads(tmp_path):
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from pipeline.deepspeed_load import weights_only

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(_zero_state(), path)
    engine = TorchCheckpointEngine()
    with weights_only([type("Engine", (), {"checkpoint_engine": engine})()]):
        got = engine.load(str(path), map_location="cpu")
    opt = got["optimizer_state_dict"]
    assert opt["loss_scaler"].cur_scale == 1.0 and int(opt["zero_stage"]) == 2
    assert torch.equal(opt["single_partition_of_fp32_groups"][0], torch.ones(3))


@pytest.mark.slow
def test_deepspeed_resume_of_a_file_with_code_is_refused_and_a_genuine_one_resumes(tmp_path):
    """A real DeepSpeed (ZeRO-2, CPU) checkpoint whose optimizer states file is replaced by one
    that runs code, with the checksums rewritten to match (as an attacker would): refused, the
    code not run; the genuine file resumes."""
    import torch

    from pipeline.deepspeed_load import _types
    from pipeline.integrity import digests

    shards = make_tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, run, train={"max_steps": 2})
    cmd, env = train_cmd(recipe, deepspeed=True, procs=1)
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run / "checkpoints" / "step-00000002"
    (f,) = (ckpt / "accelerate" / "pytorch_model").glob("zero_pp_rank_0_*_optim_states.pt")
    genuine, state_file = f.read_bytes(), (ckpt / "trainer_state.json").read_text()
    with torch.serialization.safe_globals(_types()):
        state = torch.load(f, map_location="cpu", weights_only=True)
    marker = tmp_path / "PWNED"
    state["optimizer_state_dict"]["loss_scaler"] = _Call(os.system, f"touch {marker}")
    torch.save(state, f)
    (ckpt / "trainer_state.json").write_text(json.dumps({**json.loads(state_file), "files": digests(ckpt)}))
    cmd, env = train_cmd(recipe, "train.max_steps=4", deepspeed=True, procs=1)
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and not marker.exists(), r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors and f"{f.name}: not read: it holds the global posix.system" in errors[0], r.stderr[-3000:]
    f.write_bytes(genuine)
    (ckpt / "trainer_state.json").write_text(state_file)
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"resumed from {ckpt} at step 2" in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------ row 12: RUN/tracker.json


@pytest.mark.parametrize("tracker, content, want", [
    ("wandb", {"tracker": "wandb", "run_id": "a/b"}, "run_id: 'a/b' is not a W&B name"),
    ("wandb", {"tracker": "wandb", "run_id": ["x"]}, "run_id: expected a non-empty string"),
    ("wandb", {"tracker": "wandb", "run_id": "abc", "project": {"p": 1}}, "project: \"{'p': 1}\" is not a W&B name"),
    ("wandb", ["tracker", "wandb"], "expected a JSON object, got list"),
    ("tensorboard", {"tracker": "tensorboard", "run_id": "../../outside"}, "run_id: '../../outside' has an empty"),
    ("tensorboard", {"tracker": "mlflow", "run_id": "x"}, "tracker: 'mlflow' is neither"),
    ("tensorboard", "{not json", "unreadable (JSONDecodeError)"),
    ("tensorboard", "a directory", "not a regular file"),
])
def test_damaged_tracker_state_is_refused_in_one_line_before_any_work(tmp_path, tracker, content, want):
    shards = make_tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    run.mkdir()
    state = run / "tracker.json"
    if content == "a directory":
        state.mkdir()
    else:
        state.write_text(content if isinstance(content, str) else json.dumps(content))
    recipe = write_recipe(tmp_path / "r.yaml", shards, run, run={"tracker": tracker})
    cmd, env = train_cmd(recipe, "train.max_steps=2")
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r.stderr)
    assert f"{state}: {want}" in line and "move it away" in line, line
    assert sorted(p.name for p in run.iterdir()) == ["tracker.json"]  # nothing written, nothing replaced


# ------------------------------------------------------------------ row 11: load_pretrained bounds first


@pytest.mark.parametrize("section, key, value, want", [
    ("model", "ch", 8192, "declares a U-Net of"),
    ("diffusion", "timesteps", 2_000_000_000, "diffusion.timesteps: must be in 1..100000"),
    ("model", "num_res_blocks", 1_000_000, "model.num_res_blocks: must be in 1..64"),
])
def test_downloaded_config_is_bounded_before_the_model_is_built(tmp_path, section, key, value, want):
    import resource
    import time

    import yaml

    from pipeline.hub import load_pretrained
    from pipeline.weights import LoadError
    from support.model import make_checkpoint

    folder = make_checkpoint(tmp_path / "repo")
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg[section][key] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    peak, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(LoadError) as e:
        load_pretrained(folder)
    assert want in str(e.value) and "\n" not in str(e.value)
    # Refused from the config and the file size: no gigabytes allocated, no minutes spent.
    assert time.monotonic() - t0 < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024  # KiB


# ------------------------------------------------------------------ row 10: eval inputs, bounded first


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height and holds no pixels: what decoding a bomb starts from."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _npz_with_header(path: Path, shape: tuple, dtype=np.uint8, compressed: bool = True) -> Path:
    """An .npz whose arr_0 declares `shape` (a bomb's header) followed by a few bytes only."""
    import io
    import zipfile

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as zf:
        zf.writestr("arr_0.npy", head.getvalue() + bytes(4096))
    return path


def _stats(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("case, want", [
    ("sigma not positive semi-definite", "sigma has the eigenvalue -1: not positive semi-definite"),
    ("sigma not symmetric", "sigma is not symmetric"),
    ("truncated", "not a readable .npz"),
    ("too many features", "statistics of 100000 features; at most 16384"),
])
def test_reference_statistics_are_validated(tmp_path, case, want):
    from eval.common import EvalError
    from eval.features import load_stats

    p = tmp_path / "ref.npz"
    if case == "sigma not positive semi-definite":
        _stats(p, mu=np.zeros(4), sigma=-np.eye(4))
    elif case == "sigma not symmetric":
        _stats(p, mu=np.zeros(4), sigma=np.triu(np.ones((4, 4))))
    elif case == "truncated":
        _truncated(_stats(p, mu=np.zeros(64), sigma=np.eye(64)))
    else:  # headers that declare 100000 features: refused before 80 GB are read
        import io
        import zipfile

        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, shape in (("mu", (100000,)), ("sigma", (100000, 100000))):
                head = io.BytesIO()
                np.lib.format.write_array_header_1_0(head, {"descr": "<f8", "fortran_order": False, "shape": shape})
                zf.writestr(f"{name}.npy", head.getvalue())
    with pytest.raises(EvalError) as e:
        load_stats(p)
    assert str(e.value).startswith(f"{p}: ") and want in str(e.value) and "\n" not in str(e.value)


def test_an_object_array_n_is_never_unpickled(tmp_path):
    from eval.features import load_stats

    marker = tmp_path / "PWNED"
    p = _stats(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4),
               n=np.array([_Call(os.system, f"touch {marker}")], dtype=object))
    stats, _ = load_stats(p)
    assert stats["n"] is None and not marker.exists()


@pytest.mark.parametrize("case, want", [
    ("compressed bomb", "arr_0 is compressed and 183.1 GiB inflated"),
    ("bomb of a wrong shape", "need uint8 images [n, H, W, 3] (NHWC), got uint8 [100000, 256, 256, 4]"),
    ("truncated", "not a readable .npz"),
    ("20000x20000 PNG", "cannot decode"),
    ("5000x5000 PNG", "5000x5000 pixels; a sample image is at most"),
])
def test_outside_samples_are_bounded_before_decoding(tmp_path, case, want):
    import resource

    from eval.common import EvalError
    from eval.outside import load_outside

    if case == "compressed bomb":
        p = _npz_with_header(tmp_path / "s.npz", (1_000_000, 256, 256, 3))
    elif case == "bomb of a wrong shape":
        p = _npz_with_header(tmp_path / "s.npz", (100_000, 256, 256, 4))
    elif case == "truncated":
        p = tmp_path / "s.npz"
        np.savez_compressed(p, arr_0=np.zeros((64, 8, 8, 3), np.uint8))
        _truncated(p)
    else:
        p = tmp_path / "samples"
        p.mkdir()
        size = 20000 if case.startswith("20000") else 5000
        Image.new("RGB", (8, 8)).save(p / "a.png")
        _png_header(p / "b.png", size, size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EvalError) as e:
        x = load_outside(p)
        for i in range(len(x)):
            x[i]
    assert want in str(e.value) and "\n" not in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024  # KiB: nothing inflated


def test_a_stray_chunk_outside_the_requested_range_is_never_used(tmp_path):
    from eval.__main__ import main as eval_main
    from support.model import make_checkpoint

    ck, out = make_checkpoint(tmp_path / "ck"), tmp_path / "o"
    args = ["sample", str(ck), "--out", str(out), "--num-samples", "4", "--chunk-size", "2", "--npz", str(tmp_path / "x.npz")]
    assert eval_main(args) == 0
    shutil.copy(out / "chunks" / "chunk-000000.npz", out / "chunks" / "chunk-000002.npz")  # a stray one
    assert eval_main(args) == 0  # the same request again: its 4 samples, not 6
    with np.load(tmp_path / "x.npz") as z:
        assert z["arr_0"].shape[0] == 4


def test_refused_reference_is_one_line_exit_2_from_the_cli(tmp_path, capsys):
    from eval.__main__ import main as eval_main

    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    ref = _stats(tmp_path / "ref.npz", mu=np.zeros(4), sigma=-np.eye(4))
    code = eval_main(["fid", "--samples", str(samples), "--reference", str(ref), "--out", str(tmp_path / "o"),
                      "--feature-extractor", "tiny-seeded=support.features:TinyFeatures"])
    assert code == 2 and "not positive semi-definite" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------ row 14: small ones


@pytest.mark.parametrize("args, want", [
    (["nll", "{ck}", "--out", "{o}", "--limit", "-2"], "--limit must be at least 1, got -2"),
    (["nll", "{ck}", "--out", "{o}", "--also-train", "--train-limit", "0"], "--train-limit must be at least 1, got 0"),
    (["export", "{ck}", "--out", "{file}/sub"], "cannot make its folder"),
])
def test_small_eval_refusals_are_one_line(tmp_path, capsys, args, want):
    from eval.__main__ import main as eval_main
    from support.model import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck")
    (tmp_path / "file").write_text("a file, not a folder")
    code = eval_main([a.format(ck=ck, file=tmp_path / "file", o=tmp_path / "o") for a in args])
    assert code == 2 and want in one_error_line(capsys.readouterr().err)


def test_export_removes_what_a_killed_export_left_and_nothing_else(tmp_path):
    import socket

    from eval.__main__ import main as eval_main
    from support.model import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck")
    dead = sp.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    host = socket.gethostname()
    left = {name: tmp_path / name for name in (
        f".export-stage-{host}-{dead.pid}-abc123", f".export-build-{host}-{dead.pid}-x_y",  # a killed export's
        f".export-stage-{host}-{os.getpid()}-live", f".export-stage-otherhost-{dead.pid}-abc")}  # not stale
    for p in left.values():
        (p / "sub").mkdir(parents=True)
    assert eval_main(["export", str(ck), "--out", str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in tmp_path.glob(".export-*")) == sorted(list(left)[2:])
