"""Loading a model from anywhere (pipeline/hub.py, pipeline/weights.py): local run dirs, checkpoints,
safetensors files and folders in our or diffusers' layout, and Hub repos pulled from a real HTTP
server (scripts/hub_server.py) with the unmodified huggingface_hub client (plain LFS: Xet off)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

from eval.hub_push import push_to_hub
from pipeline.convert import diffusers_config, diffusion_settings_from_diffusers
from pipeline.errors import UserError
from pipeline.hub import load_pretrained
from pipeline.integrity import file_sha256
from pipeline.weights import LoadError, load_state_dict, weights_sha256
from support.hub_models import TINY, google_style_unet, make_run, outputs


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config({**TINY, "in_channels": 3, "out_channels": 3})))
    torch.save({"conv_in.weight": torch.zeros(1), "x": _Evil()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(LoadError, match=r"diffusion_pytorch_model.bin: refused.*weights_only"):
        load_pretrained(folder)
    assert not _Evil.marker.exists()


def test_truncated_or_bad_files_are_clear_errors(tmp_path):
    run = make_run(tmp_path / "run", results=False)
    ema = run / "checkpoints" / "step-00000040" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-100])
    with pytest.raises(LoadError, match=r"ema.safetensors: not a readable safetensors file \(truncated"):
        load_pretrained(run)
    with pytest.raises(LoadError, match="no such file or directory, and not a Hub repo id"):
        load_pretrained(tmp_path / "missing" / "dir" / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no model found"):
        load_pretrained(tmp_path / "empty")


def test_local_sources_agree_and_raw_weights(tmp_path):
    run = make_run(tmp_path / "run", results=False)
    ckpt = run / "checkpoints" / "step-00000040"
    ref = outputs(load_pretrained(run).model)
    for src in (ckpt, ckpt / "ema.safetensors"):
        torch.testing.assert_close(outputs(load_pretrained(src).model), ref, rtol=0, atol=0)
    raw = load_pretrained(ckpt, use_ema=False).model.state_dict()
    ema = load_state_dict(ckpt / "ema.safetensors")
    assert all(torch.equal(raw[k], ema[k] + 1) for k in ema)


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_google_ddpm_style_repo_loads_and_matches_diffusers(hub, tmp_path, safe):
    ref = google_style_unet()
    folder = tmp_path / "google-ddpm"
    ref.save_pretrained(folder, safe_serialization=safe)
    (folder / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
         "num_train_timesteps": 1000, "variance_type": "fixed_large", "clip_sample": True}))
    api = HfApi()
    api.create_repo("ddpm-org/ddpm-tiny-32")
    api.upload_folder(repo_id="ddpm-org/ddpm-tiny-32", folder_path=folder)
    p = load_pretrained("ddpm-org/ddpm-tiny-32")
    assert p.recipe.diffusion.var_type == "fixed_large" and p.recipe.model.attn_resolutions == (4,)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5, 999])
    with torch.no_grad():
        torch.testing.assert_close(p.model(x, t), ref(x, t).sample, rtol=0, atol=1e-5)


def test_paper_settings_without_scheduler_config(tmp_path):
    folder = tmp_path / "no-sched"
    google_style_unet().save_pretrained(folder)
    assert load_pretrained(folder).recipe.diffusion.var_type == "fixed_large"  # 32x32 and below: sigma^2 = beta
    cfg = json.loads((folder / "config.json").read_text())
    assert diffusion_settings_from_diffusers({**cfg, "sample_size": 256}, None)["var_type"] == "fixed_small"


def test_ddpm_pipeline_layout_with_subfolders(hub, tmp_path):
    """DDPMPipeline.save_pretrained puts the U-Net in unet/ and the scheduler in scheduler/."""
    from diffusers import DDPMPipeline, DDPMScheduler  # the test extra, and slow to import

    ref = google_style_unet(seed=2)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, variance_type="fixed_small")
    DDPMPipeline(unet=ref, scheduler=sched).save_pretrained(tmp_path / "pipe")
    HfApi().create_repo("alice/pipe")
    HfApi().upload_folder(repo_id="alice/pipe", folder_path=tmp_path / "pipe")
    for src in (tmp_path / "pipe", "alice/pipe"):
        p = load_pretrained(src)
        assert p.recipe.diffusion.var_type == "fixed_small"
        x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
        with torch.no_grad():
            torch.testing.assert_close(p.model(x, t), ref(x, t).sample, rtol=0, atol=1e-5)


def test_early_diffusers_attention_names_load_like_diffusers(tmp_path):
    """The google/ddpm-* uploads predate diffusers' to_q/to_k/to_v/to_out.0 attention names."""
    from diffusers import UNet2DModel  # the test extra, and slow to import

    ref = google_style_unet(seed=7)
    folder = tmp_path / "old"
    ref.save_pretrained(folder, safe_serialization=False)
    new2old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    old = {re.sub(r"(attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"{m.group(1)}.{new2old[m.group(2)]}.", k): v
           for k, v in state.items()}
    assert sum(".query." in k for k in old) == 8  # weight + bias of 4 blocks: down 1, mid 1, up 2
    torch.save(old, folder / "diffusion_pytorch_model.bin")
    theirs = UNet2DModel.from_pretrained(folder).eval()
    ours = load_pretrained(folder).model
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8)), torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x, t), ref(x, t).sample, rtol=0, atol=1e-5)


def test_pull_uses_the_cache_when_the_hub_is_unreachable(hub, tmp_path, capsys):
    run = make_run(tmp_path / "run", results=False)
    out = push_to_hub(run, "alice/cached")
    first = load_pretrained("alice/cached")
    assert f"fetching alice/cached at main (commit {out['commit'][:12]}): " in capsys.readouterr().err
    hub.stop()  # connection refused from now on
    again = load_pretrained("alice/cached")
    assert again.source == first.source == f"alice/cached@{out['commit']}"
    torch.testing.assert_close(outputs(again.model), outputs(first.model), rtol=0, atol=0)
    with pytest.raises(LoadError, match="cannot download from the Hub, and it is not cached"):
        load_pretrained("alice/never-pulled")


def test_every_bad_source_is_a_user_error(hub, tmp_path):
    """What the CLIs print as one line (exit 2): a LoadError naming the file or repo, never a
    ValueError/TypeError from deeper down."""
    with pytest.raises(LoadError, match="alice/b--c: not a valid Hub repo id"):
        load_pretrained("alice/b--c")  # fits namespace/name, but the Hub refuses '--'
    folder = tmp_path / "sched"
    google_style_unet().save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps({"beta_start": [1e-4], "beta_schedule": "linear"}))
    with pytest.raises(LoadError, match=r"scheduler_config.json: .*must be numbers"):
        load_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(LoadError, match=r"scheduler_config.json: beta_schedule 'squaredcos_cap_v2'"):
        load_pretrained(folder)
    run = make_run(tmp_path / "run", results=False)
    (run / "checkpoints" / "step-00000040" / "config.yaml").write_text("model: {chh: 3}\n")
    with pytest.raises(LoadError, match=r"config.yaml.*model.chh") as e:
        load_pretrained(run)
    assert isinstance(e.value, UserError) and e.value.exit_code == 2


def test_weights_hash_is_stable_across_files_and_models(tmp_path):
    """results.json files record weights_sha256: its value for given tensors never changes, and a
    model, its state dict and the safetensors file of it give the same hash."""
    state = {"b": torch.tensor([1, -2], dtype=torch.int64), "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
             "h": torch.tensor([0.5, -1.0], dtype=torch.float16), "e": torch.zeros(0)}
    assert weights_sha256(state) == "1f2abb3f8999209d101194a6a470bb97ae2ca082ced6285fa9678e29c4cc078d"
    save_file(state, str(tmp_path / "w.safetensors"))
    assert weights_sha256(load_state_dict(tmp_path / "w.safetensors")) == weights_sha256(state)
    torch.save(state, tmp_path / "w.bin")
    assert weights_sha256(load_state_dict(tmp_path / "w.bin")) == weights_sha256(state)
    assert file_sha256(tmp_path / "w.bin") != file_sha256(tmp_path / "w.safetensors")  # the files differ
    run = make_run(tmp_path / "run", results=False)
    model = load_pretrained(run).model
    assert weights_sha256(model) == weights_sha256(load_state_dict(run / "checkpoints" / "step-00000040" / "ema.safetensors"))
