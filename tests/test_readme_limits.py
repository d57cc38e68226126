"""The limits README's "Untrusted input" table states, at their edges: the 256 MiB manifest,
128-character Slurm names, YAML's safe tags and 100 000 nodes after expanding aliases."""

from __future__ import annotations

import json

import pytest

from pipeline import manifest, yaml_safe
from pipeline.manifest import ManifestError, read_manifest
from slurm.submit import SubmitError, build_parser, check_parameters


def test_manifest_over_256_mib_is_refused_by_its_size(tmp_path):
    assert manifest.MAX_BYTES == 256 * 2 ** 20
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps({"splits": {}}))
    assert read_manifest(m) == {"splits": {}}
    with open(m, "r+b") as f:  # sparse: 256 MiB + 1 byte of trailing spaces on no disk
        f.truncate(manifest.MAX_BYTES + 1)
    with pytest.raises(ManifestError, match=f"{manifest.MAX_BYTES + 1} bytes; a manifest is at most"):
        read_manifest(m)


def test_slurm_names_up_to_128_characters():
    args = build_parser().parse_args(["r.yaml"])
    check_parameters(args, "n" * 128)
    with pytest.raises(SubmitError, match="--job-name"):
        check_parameters(args, "n" * 129)
    args.partition = "p" * 129
    with pytest.raises(SubmitError, match="--partition"):
        check_parameters(args, "run")


@pytest.mark.parametrize("doc", [
    "!!python/object/apply:os.system ['true']",
    "train: !!python/object:pipeline.config.TrainConfig {}",
    "x: !!python/name:os.system",
])
def test_yaml_python_tags_are_refused(doc):
    with pytest.raises(yaml_safe.YamlError, match=r"line \d+, column \d+: .*python/"):
        yaml_safe.load(doc)


def nodes_doc(total: int) -> str:
    """A sequence of `total` nodes once aliases are expanded: the sequence itself, an anchored
    list of 999 scalars (1000 nodes) and 98 aliases of it, then plain scalars for the rest."""
    rest = total - 1 - 99 * 1000
    assert rest >= 0
    return "- &x [" + ", ".join("0" * 999) + "]\n" + "- *x\n" * 98 + "- 0\n" * rest


def test_yaml_100000_nodes_accepted_one_more_refused():
    assert yaml_safe.MAX_NODES == 100_000
    assert len(yaml_safe.load(nodes_doc(100_000))) == 99 + 999
    with pytest.raises(yaml_safe.YamlError, match="more than 100000 nodes"):
        yaml_safe.load(nodes_doc(100_001))
