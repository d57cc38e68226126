"""Pushing to the Hub (eval/hub_push.py, `python -m eval push`) against a real HTTP server
(scripts/hub_server.py) with the unmodified huggingface_hub client (plain LFS: Xet off): one
commit, retries, tokens, the model card, and the pushed repo loaded back by us and by diffusers."""

from __future__ import annotations

import json
import os
import subprocess as sp
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download

from eval.hub_push import PushError, PushFailedError, push_to_hub, stage_push
from eval.results import write_result
from pipeline.config import load_recipe, save_recipe
from pipeline.hub import load_pretrained
from pipeline.weights import LoadError, load_state_dict, weights_sha256
from scripts.hub_server import HubServer
from support.hub import ROOT, TOKEN, eval_cli, fresh_cache, hub_env
from support.hub_models import make_run, outputs
from support.training import make_tiny_shards, train_cmd, write_recipe


def test_push_roundtrip_one_commit_card_and_tensors(hub, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    out = push_to_hub(run, "alice/tiny-ddpm")
    assert out["files"] == ["README.md", "config.json", "config.yaml", "ema.safetensors", "results.json",
                            "samples/step-00000040.png"]
    commits = hub.commits("alice/tiny-ddpm")
    assert [c.title for c in commits][1:] == ["initial commit"] and commits[0].id == out["commit"]

    fresh_cache(monkeypatch, tmp_path, "clean-cache")
    folder = Path(snapshot_download("alice/tiny-ddpm"))
    ckpt = run / "checkpoints" / "step-00000040"
    a, b = load_state_dict(folder / "ema.safetensors"), load_state_dict(ckpt / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name is None and "ddpm-pipeline" in card.data.tags and card.data.datasets == ["cifar10"]
    got = {(r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert got == {("fid", 123.4), ("bits_per_dim", 7.5)}
    assert "reference: train split, 50k" in card.text and "accelerate launch pipeline/train.py x.yaml" in card.text
    assert "2 processes" in card.text
    desc = json.loads((folder / "config.json").read_text())
    assert desc["unet"]["ch_mult"] == [1, 2] and desc["step"] == 40
    assert HfApi().model_info("alice/tiny-ddpm").private is False

    fresh_cache(monkeypatch, tmp_path, "clean-cache-2")
    p = load_pretrained("alice/tiny-ddpm")
    local = load_pretrained(run)
    assert p.source.startswith("alice/tiny-ddpm@") and p.recipe.diffusion.var_type == "fixed_large"
    torch.testing.assert_close(outputs(p.model), outputs(local.model), rtol=0, atol=0)


def test_push_retries_transient_errors_and_makes_one_commit(hub, tmp_path):
    run = make_run(tmp_path / "run")
    hub.inject("POST", r"/api/models/alice/r/commit/", status=503, times=2)
    out = push_to_hub(run, "alice/r", backoff=0.01)
    assert len(hub.commits("alice/r")) == 2 and hub.commits("alice/r")[0].id == out["commit"]
    assert [s for m, p, s in hub.requests if "/commit/" in p] == [503, 503, 200]

    # The commit reaches the server but the reply is lost (reset): the retry must not commit twice.
    run2 = make_run(tmp_path / "run2", seed=1)
    hub.inject("POST", r"/api/models/alice/r/commit/", status=None, after=True)
    out2 = push_to_hub(run2, "alice/r", backoff=0.01)
    commits = hub.commits("alice/r")
    assert len(commits) == 3 and commits[0].id == out2["commit"]


def test_push_that_finally_fails_commits_nothing(hub, tmp_path):
    run = make_run(tmp_path / "run")
    push_to_hub(make_run(tmp_path / "first", seed=3), "alice/f")
    before = [c.id for c in hub.commits("alice/f")]
    hub.inject("POST", r"/commit/", status=500, times=-1)
    with pytest.raises(PushFailedError, match="push failed, nothing was committed") as e:
        push_to_hub(run, "alice/f", max_retries=2, backoff=0.01)
    assert e.value.exit_code == 1  # the CLI's exit status: the input was fine, the Hub was not
    assert [c.id for c in hub.commits("alice/f")] == before
    hub.clear_faults()

    # An LFS upload the storage refuses (not transient): no commit, the old weights stay.
    # (New weights: the blobs of the failed push above are on the server already, uncommitted.)
    hub.inject("PUT", r"/lfs-upload/", status=403, times=-1)
    with pytest.raises(PushError, match="nothing was committed"):
        push_to_hub(make_run(tmp_path / "run3", seed=4), "alice/f", max_retries=1, backoff=0.01)
    assert any(p.startswith("/lfs-upload/") and s == 403 for _, p, s in hub.requests)
    assert [c.id for c in hub.commits("alice/f")] == before
    old = load_state_dict(tmp_path / "first" / "checkpoints" / "step-00000040" / "ema.safetensors")
    now = load_pretrained("alice/f").model.state_dict()
    assert all(torch.equal(old[k], now[k]) for k in old)
    assert "ema.safetensors" in HfApi().list_repo_files("alice/f")


def test_token_missing_invalid_or_wrong_namespace_fails_before_upload(hub, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushError, match="no Hugging Face token"):
        push_to_hub(run, "alice/t")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PushError, match="token was rejected"):
        push_to_hub(run, "alice/t")
    monkeypatch.setenv("HF_TOKEN", "hf_bob")
    with pytest.raises(PushError, match="'bob', who cannot write to 'alice'"):
        push_to_hub(run, "alice/t")
    assert {p for _, p, _ in hub.requests} == {"/api/whoami-v2"}  # nothing else was attempted
    assert not hub.state.repos and not hub.state.lfs


def test_private_repo_on_a_branch_and_org_namespace(hub, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    out = push_to_hub(run, "ddpm-org/private", private=True, revision="exp-1")
    api = HfApi()
    assert api.model_info("ddpm-org/private").private is True
    assert "ema.safetensors" not in api.list_repo_files("ddpm-org/private")  # main untouched
    assert "ema.safetensors" in api.list_repo_files("ddpm-org/private", revision="exp-1")
    with pytest.raises(LoadError, match="holds no model"):
        load_pretrained("ddpm-org/private")
    p = load_pretrained("ddpm-org/private", revision="exp-1")
    assert p.source == f"ddpm-org/private@{out['commit']}"
    with pytest.raises(LoadError, match="no revision 'nope'"):
        load_pretrained("ddpm-org/private", revision="nope")
    monkeypatch.setenv("HF_TOKEN", "hf_bob")  # bob cannot see the private repo
    fresh_cache(monkeypatch, tmp_path, "bob-cache")
    with pytest.raises(LoadError, match="no such repo"):
        load_pretrained("ddpm-org/private", revision="exp-1")


def test_results_for_other_weights_are_refused(hub, tmp_path):
    run = make_run(tmp_path / "run")
    other = make_run(tmp_path / "other", seed=5)
    with pytest.raises(PushError, match="computed for other weights"):
        push_to_hub(run, "alice/x", results=other / "checkpoints" / "step-00000040" / "results.json")
    assert not hub.state.repos


def test_invalid_card_metadata_is_rejected_before_any_upload(hub, tmp_path, monkeypatch):
    import eval.hub_push

    run = make_run(tmp_path / "run")
    real = eval.hub_push.render_model_card
    monkeypatch.setattr(eval.hub_push, "render_model_card", lambda *a, **k: real(*a, **k).replace(
        "pipeline_tag: unconditional-image-generation", "library_name: [1, 2]", 1))
    with pytest.raises(PushError, match="library_name"):
        push_to_hub(run, "alice/card")
    assert not hub.state.lfs and len(hub.commits("alice/card")) == 1


def test_checkpoint_without_ema_is_pushed_as_raw_weights(hub, tmp_path):
    run = make_run(tmp_path / "run", results=False)
    ckpt = run / "checkpoints" / "step-00000040"
    (ckpt / "ema.safetensors").unlink()
    out = push_to_hub(ckpt, "alice/raw")
    assert "model.safetensors" in out["files"] and "ema.safetensors" not in out["files"]
    p = load_pretrained("alice/raw")
    raw = load_state_dict(ckpt / "model.safetensors")
    assert all(torch.equal(p.model.state_dict()[k], raw[k]) for k in raw)
    card = hub.state.repos[("model", "alice/raw")].resolve("main").files["README.md"].content.decode()
    assert "raw training weights" in card


def test_diffusers_export_loads_in_diffusers(hub, tmp_path, monkeypatch):
    from diffusers import DDPMScheduler, UNet2DModel  # the test extra, and slow to import

    run = make_run(tmp_path / "run")
    out = push_to_hub(run, "alice/tiny-diffusers", format="diffusers")
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
            "scheduler/scheduler_config.json"} <= set(out["files"])
    # diffusers pulls from the server itself
    unet = UNet2DModel.from_pretrained("alice/tiny-diffusers", subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained("alice/tiny-diffusers", subfolder="scheduler")
    assert sched.config.variance_type == "fixed_large" and sched.config.num_train_timesteps == 1000
    ours = load_pretrained(run).model
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 500])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, ours(x, t), rtol=0, atol=1e-5)
    back = load_pretrained("alice/tiny-diffusers")  # and our loader reads the diffusers layout back
    torch.testing.assert_close(outputs(back.model), outputs(ours), rtol=0, atol=1e-5)


def _cli(args, srv, tmp_path, token=TOKEN):
    return eval_cli(["push", *args], hub_env(srv, tmp_path / "hf-home", token))


def test_cli_push_and_errors(tmp_path):
    run = make_run(tmp_path / "run")
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        r = _cli([str(run), "--repo-id", "alice/cli", "--revision", "v1"], srv, tmp_path)
        assert r.returncode == 0, r.stderr
        assert "as commit" in r.stdout and "--revision v1" in r.stdout
        assert len(srv.commits("alice/cli", "v1")) == 2
        bad = _cli([str(run), "--repo-id", "alice/cli"], srv, tmp_path, token="hf_nope")
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
            "error: the Hugging Face token was rejected (401 from whoami): check HF_TOKEN"]
        missing = _cli([str(tmp_path / "nope"), "--repo-id", "alice/cli"], srv, tmp_path)
        assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nope: no such file" in missing.stderr
        srv.inject("POST", r"/commit/", status=500, times=-1)
        failed = _cli([str(run), "--repo-id", "alice/cli", "--max-retries", "0"], srv, tmp_path)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert failed.stderr.strip().splitlines()[-1].startswith("error: alice/cli: push failed, nothing was committed")


def test_unreachable_hub_fails_before_staging(tmp_path):
    run = make_run(tmp_path / "run")
    srv = HubServer().start()
    srv.stop()  # connection refused
    with pytest.raises(PushError, match="cannot reach the Hub at http://127.0.0.1"):
        push_to_hub(run, "alice/x", endpoint=srv.endpoint, token=TOKEN)


def test_diffusers_layout_refuses_what_diffusers_cannot_name(tmp_path):
    run = make_run(tmp_path / "run", results=False)
    recipe = load_recipe(run / "config.yaml")
    recipe.diffusion.mean_type = "mu"  # predicts the posterior mean: no DDPMScheduler prediction_type
    save_recipe(recipe, run / "checkpoints" / "step-00000040" / "config.yaml")
    (tmp_path / "stage").mkdir()
    with pytest.raises(PushError, match=r"diffusion.mean_type='mu' has no diffusers equivalent; push --format native"):
        stage_push(run, tmp_path / "stage", repo_id="alice/mu", format="diffusers")
    assert "ema.safetensors" in stage_push(run, tmp_path / "stage", repo_id="alice/mu")  # native holds it


def test_cli_help_explains():
    r = eval_cli(["push", "--help"], {**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "--repo-id" in r.stdout and "one commit" in r.stdout and "HF_TOKEN" in r.stdout


@pytest.mark.slow
def test_eval_stage_reads_a_hub_id_and_its_results_push_back(tmp_path):
    """The chain through real CLIs: push a run, `eval sample` it by Hub id (revision), then push
    the run again with results for those samples (the weights hash eval computed on the Hub copy
    must match the pushed weights)."""
    run = make_run(tmp_path / "run", results=False)
    with HubServer(tokens={TOKEN: "alice"}) as srv:
        assert _cli([str(run), "--repo-id", "alice/chain", "--revision", "r1"], srv, tmp_path).returncode == 0
        out = tmp_path / "eval"
        r = eval_cli(["sample", "alice/chain", "--revision", "r1", "--out", str(out), "--num-samples", "2",
                      "--batch-size", "2", "--sampler", "ddim", "--steps", "2"], hub_env(srv, tmp_path / "hf-home-2"))
        assert r.returncode == 0, r.stderr
        proto = json.loads((out / "samples.json").read_text())["protocol"]
        assert proto["weights_sha256"] == weights_sha256(load_pretrained(run).model)
        assert proto["source"].startswith("alice/chain")
        # what `eval fid` would record for these samples (FID itself needs Inception weights)
        write_result(out, "fid", {"fid": 99.0}, proto, {"source": proto["source"],
                                                         "weights_sha256": proto["weights_sha256"]})
        r = _cli([str(run), "--repo-id", "alice/chain", "--results", str(out / "results.json")], srv, tmp_path)
        assert r.returncode == 0, r.stderr
        other = make_run(tmp_path / "other", seed=9, results=False)
        r = _cli([str(other), "--repo-id", "alice/chain", "--results", str(out / "results.json")], srv, tmp_path)
        assert r.returncode == 2 and "computed for other weights" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_real_training_run_pushes_and_fine_tunes_from_the_hub(hub, tmp_path):
    """pipeline/train.py writes a run; it goes to the Hub; a second run starts from the Hub id
    (train.init_from) and, with a negligible lr, holds the pushed EMA weights."""
    shards = make_tiny_shards(tmp_path / "shards")
    r1 = write_recipe(tmp_path / "r1.yaml", shards, tmp_path / "run1",
                      train={"max_steps": 2, "checkpoint_every": 2, "sample_every": 2})
    cmd, env = train_cmd(r1)
    assert sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600).returncode == 0
    out = push_to_hub(tmp_path / "run1", "alice/trained")
    assert {"ema.safetensors", "samples/step-00000002.png", "README.md"} <= set(out["files"])

    r2 = write_recipe(tmp_path / "r2.yaml", shards, tmp_path / "run2",
                      train={"max_steps": 1, "checkpoint_every": 1, "lr": 1e-20, "init_from": "alice/trained"})
    cmd, env = train_cmd(r2)
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf2"))
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    pushed = load_state_dict(tmp_path / "run1" / "checkpoints" / "step-00000002" / "ema.safetensors")
    tuned = load_state_dict(tmp_path / "run2" / "checkpoints" / "step-00000001" / "model.safetensors")
    raw = load_state_dict(tmp_path / "run1" / "checkpoints" / "step-00000002" / "model.safetensors")
    assert any(not torch.equal(raw[k], pushed[k]) for k in pushed)  # EMA != raw: the match below is specific
    for k in pushed:
        torch.testing.assert_close(tuned[k], pushed[k], rtol=0, atol=1e-12)
    assert any("/resolve/" in p for _, p, _ in hub.requests)
