"""Launching like the ecosystem: `accelerate launch -m pipeline.train RECIPE` trains as the script
path does, and the console scripts of pyproject.toml point at the four real entry points."""

from __future__ import annotations

import subprocess as sp
import sys
import tomllib

import pytest

from support.training import PY, ROOT, assert_bitwise_equal, env, make_tiny_shards, train_cmd, weights, write_recipe

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_four_console_scripts_are_declared_and_documented():
    targets = set(SCRIPTS.values())
    assert targets == {"data_prep.__main__:main", "pipeline.train:main", "eval.__main__:main", "slurm.submit:main"}
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in SCRIPTS), "README lists every console script"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_runs_its_entry_point(name):
    """What the installed wrapper does: import the target, sys.exit(target()) with the user's argv."""
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; from {module} import {func} as f; sys.argv = [{name!r}, '--help']; sys.exit(f())"
    r = sp.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout and len(r.stdout.splitlines()) > 5


@pytest.mark.slow
def test_accelerate_launch_module_trains_like_the_script(tmp_path):
    shards = make_tiny_shards(tmp_path / "shards")
    runs = {}
    for how, script in (("module", ("-m", "pipeline.train")), ("script", (str(ROOT / "pipeline" / "train.py"),))):
        recipe = write_recipe(tmp_path / f"{how}.yaml", shards, tmp_path / how, train={"max_steps": 2})
        cmd, e = train_cmd(recipe, procs=2, script=script)
        r = sp.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[how] = tmp_path / how / "checkpoints" / "step-00000002"
    assert_bitwise_equal(weights(runs["module"]), weights(runs["script"]))
    r = sp.run([PY, "-m", "pipeline.train", str(tmp_path / "module.yaml"), "--dry-run"], cwd=ROOT, env=env(),
               capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "max_steps: 2" in r.stdout
