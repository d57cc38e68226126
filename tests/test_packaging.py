"""What gets installed: pyproject.toml declares the ranges the package supports, constraints.txt
(the lock, written by scripts/lock.py) pins every package `make install` puts into the venv, and
installing the package next to a cluster's torch at the declared floor keeps that torch. Nothing
here asks a package index: everything is read from the installed packages' own metadata."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from scripts.lock import NO_DEPS, PROJECT, TOOLS, canonical, parse, render

ROOT = Path(__file__).resolve().parents[1]
TORCHES = ("torch", "torchvision")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> dict[str, Requirement]:
    return {canonical(Requirement(d).name): Requirement(d) for d in _pyproject()["dependencies"]}


def _lock() -> dict[str, str]:
    return parse((ROOT / "constraints.txt").read_text())


def _floor(req: Requirement) -> Version:
    lows = [s for s in req.specifier if s.operator == ">="]
    assert len(lows) == 1 and all(s.operator in (">=", "<") for s in req.specifier), req
    return Version(lows[0].version)


def _floors() -> dict[str, Version]:
    reqs = _requirements()
    return {name: _floor(reqs[name]) for name in TORCHES}


def _applies(req: Requirement, extra: str) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": extra})


def _closure() -> tuple[dict[str, metadata.Distribution], list[tuple[str, Requirement]]]:
    """The installed distributions `pip install ddpm-pipeline[test]` needs, followed through the
    extras each one is asked for, and every (requirer, requirement) edge on the way."""
    dists: dict[str, metadata.Distribution] = {}
    asked: set[tuple[str, str]] = set()
    edges: list[tuple[str, Requirement]] = []
    todo = [(PROJECT, ""), (PROJECT, "test")]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in asked:
            continue
        asked.add((name, extra))
        try:
            dists[name] = dists.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is required (by the edges {[(a, str(r)) for a, r in edges if canonical(r.name) == name]}) "
                        "but not installed: run `make install`")
        for req in map(Requirement, dists[name].requires or []):
            if _applies(req, extra):
                edges.append((name, req))
                todo += [(canonical(req.name), e) for e in ("", *req.extras)]
    return dists, edges


def test_the_lock_pins_every_direct_dependency_inside_its_declared_range():
    lock, project = _lock(), _pyproject()
    declared = [*project["dependencies"], *(d for deps in project["optional-dependencies"].values() for d in deps)]
    for req in map(Requirement, declared):
        name = canonical(req.name)
        assert name in lock, f"{name} ({req}) is not in constraints.txt: run `make lock`"
        assert req.specifier.contains(lock[name], prereleases=True), f"constraints.txt pins {name}=={lock[name]}, outside {req}"
    assert set(TOOLS) | set(NO_DEPS) <= lock.keys()
    assert PROJECT not in lock


def test_the_lock_is_as_scripts_lock_writes_it():
    """Sorted, canonical names, one pin each, its header: a hand edit shows up as a diff here."""
    text = (ROOT / "constraints.txt").read_text()
    python, machine = re.search(r"for CPython (\S+) on Linux (\S+)", text).groups()
    assert render(parse(text), python, machine) == text
    with pytest.raises(ValueError, match="not a plain NAME==VERSION pin"):
        parse("torch>=2.6\n")
    with pytest.raises(ValueError, match="pinned twice"):
        parse("PyYAML==6.0\npyyaml==6.0.1\n")


def test_this_environment_is_the_lock():
    """Every distribution the package needs is pinned, and installed at its pin (`make install`
    installed exactly the lock); the lock holds nothing beyond them, the tools and NO_DEPS."""
    lock = _lock()
    dists, _ = _closure()
    needed = {n: d.version for n, d in dists.items() if n != PROJECT}
    missing = sorted(needed.keys() - lock.keys())
    assert not missing, f"installed and needed, but not in constraints.txt: {missing}"
    wrong = {n: (v, lock[n]) for n, v in needed.items() if Version(v) != Version(lock[n])}
    assert not wrong, f"installed version vs lock: {wrong}"
    extra = sorted(lock.keys() - needed.keys() - set(TOOLS) - set(NO_DEPS))
    assert not extra, f"pinned in constraints.txt but needed by nothing: {extra}"


def test_the_torch_floor_admits_every_installed_requirement_on_torch():
    """The declared floor is true: no installed package asks for more (accelerate 1.16 asks for
    torch>=2.6, so a floor of 2.4 fails here), following each extra the install asks for, and every
    installed distribution's own requirements besides. torchvision's floor is torch's pair."""
    floors = _floors()
    assert floors["torchvision"] == Version(f"0.{floors['torch'].minor + 15}"), floors  # 2.6 <-> 0.21, ...
    _, edges = _closure()
    for dist in metadata.distributions():
        edges += [(canonical(dist.metadata["Name"]), r) for r in map(Requirement, dist.requires or []) if _applies(r, "")]
    checked = [(who, r) for who, r in edges if canonical(r.name) in TORCHES and who not in (*TORCHES, PROJECT)]
    assert len({who for who, _ in checked}) >= 3, checked  # accelerate, deepspeed, torch-fidelity at least
    refused = sorted({f"{who}: {r}" for who, r in checked if not r.specifier.contains(floors[canonical(r.name)], prereleases=True)})
    assert not refused, f"installed packages that need more than the declared floor {floors}: {refused}"


def test_this_environment_is_in_the_declared_range():
    import torch
    import torchvision

    reqs = _requirements()
    assert reqs["torch"].specifier.contains(Version(torch.__version__).base_version)
    assert reqs["torchvision"].specifier.contains(Version(torchvision.__version__).base_version)


def test_make_install_installs_only_from_the_lock():
    installs = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if "pip install" in ln]
    assert len(installs) == 3, installs
    assert all("-c constraints.txt" in ln for ln in installs), installs
    assert "--build-constraint constraints.txt -e '.[test]'" in installs[1]
    assert (ROOT / ".ci" / "run").read_text().count("make install") == 1


def _fake_dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A metadata-only installed distribution (what pip's resolver reads of an installed package)."""
    d = site / f"{name}-{version}.dist-info"
    d.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (d / "METADATA").write_text("\n".join(lines) + "\n")
    (d / "INSTALLER").write_text("pip\n")
    (d / "RECORD").write_text("")


@pytest.mark.slow
def test_installing_next_to_a_cluster_torch_at_the_floor_keeps_it(tmp_path):
    """pip's real resolver (dry run, no index) over this environment (the lock) with a cluster's CUDA
    build of torch at the declared floor, and its torchvision, shadowing ours: it installs only the
    package and keeps that torch; the lock, which CI uses, would replace it (and cannot, with no index)."""
    src = tmp_path / "src"
    (src / "pipeline").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, src / name)
    (src / "pipeline" / "__init__.py").write_text("")
    site = tmp_path / "cluster-site"
    torch_floor, vision_floor = _floors()["torch"], _floors()["torchvision"]
    _fake_dist(site, "torch", f"{torch_floor}.0+cu124")
    _fake_dist(site, "torchvision", f"{vision_floor}.0+cu124", (f"torch=={torch_floor}.0",))
    # PIP_CONFIG_FILE: no site or user pip configuration (extra indexes, global constraints) applies.
    env = {"PYTHONPATH": str(site), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PATH": "/usr/bin:/bin",
           "PIP_CONFIG_FILE": os.devnull}
    cmd = [sys.executable, "-W", "ignore", "-m", "pip", "install", "--dry-run", "--no-index",
           "--no-build-isolation", "--quiet", "--report", str(tmp_path / "report.json"), str(src)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    installs = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert installs == {PROJECT: "0.1.0"}, installs
    loud = [a for a in cmd[:-1] if a != "--quiet"]
    pinned = subprocess.run(loud + ["-c", str(src / "constraints.txt"), str(src)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert pinned.returncode != 0 and f"torch=={_lock()['torch']}" in pinned.stdout + pinned.stderr, pinned.stderr[-2000:]
