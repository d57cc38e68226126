"""Torch versions users have: pyproject.toml declares ranges, constraints.txt holds the exact
versions CI and `make quickstart` install, and installing the package next to another torch in
the range (a cluster's own CUDA build) keeps that torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TORCH_FLOOR = Version("2.4")  # torch.compile on Python 3.12, fused Adam on CPU


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = Version(version.strip())
    return pins


def test_torch_is_a_range_and_the_pins_live_in_constraints():
    reqs, pins = _requirements(), _constraints()
    for name in ("torch", "torchvision"):
        assert not any(s.operator == "==" for s in reqs[name].specifier), reqs[name]
        assert reqs[name].specifier.contains(pins[name]), (name, pins[name])  # the pins are in range
    assert reqs["torch"].specifier.contains("2.4.0") and not reqs["torch"].specifier.contains("2.3.1")
    assert {s.version for s in reqs["torch"].specifier} == {str(TORCH_FLOOR)}
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -c constraints.txt -e '.[test]'" in makefile


def test_this_environment_is_in_the_declared_range():
    import torch
    import torchvision

    reqs = _requirements()
    assert reqs["torch"].specifier.contains(Version(torch.__version__).base_version)
    assert reqs["torchvision"].specifier.contains(Version(torchvision.__version__).base_version)


def _fake_dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A metadata-only installed distribution (what pip's resolver reads of an installed package)."""
    d = site / f"{name}-{version}.dist-info"
    d.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (d / "METADATA").write_text("\n".join(lines) + "\n")
    (d / "INSTALLER").write_text("pip\n")
    (d / "RECORD").write_text("")


@pytest.mark.slow
def test_installing_next_to_a_cluster_torch_keeps_it(tmp_path):
    """pip's real resolver (dry run, no index) over this environment with a cluster's torch 2.5.1+cu121
    (and its torchvision) shadowing ours: it installs only the package and keeps that torch; the
    constraints file, which CI uses, would replace it (and cannot here, with no index)."""
    src = tmp_path / "src"
    (src / "pipeline").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, src / name)
    (src / "pipeline" / "__init__.py").write_text("")
    site = tmp_path / "cluster-site"
    _fake_dist(site, "torch", "2.5.1+cu121")
    _fake_dist(site, "torchvision", "0.20.1+cu121", ("torch==2.5.1",))
    # PIP_CONFIG_FILE: no site or user pip configuration (extra indexes, global constraints) applies.
    env = {"PYTHONPATH": str(site), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PATH": "/usr/bin:/bin",
           "PIP_CONFIG_FILE": os.devnull}
    cmd = [sys.executable, "-W", "ignore", "-m", "pip", "install", "--dry-run", "--no-index",
           "--no-build-isolation", "--quiet", "--report", str(tmp_path / "report.json"), str(src)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    installs = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert installs == {"ddpm-pipeline": "0.1.0"}, installs
    loud = [a for a in cmd[:-1] if a != "--quiet"]
    pinned = subprocess.run(loud + ["-c", str(src / "constraints.txt"), str(src)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert pinned.returncode != 0 and "torch==2.14.1" in pinned.stdout + pinned.stderr, pinned.stderr[-2000:]
