"""What a pushed repo may say about the machine it came from: no absolute local path.

Every string of the card, config.yaml and results.json goes through here before a push or an
export: a Hub id or URL stays (it is public), an absolute local path becomes its last component (the
data set's folder name, `cifar10`), and a command line keeps its arguments with every
absolute path shortened the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# An absolute POSIX path inside a longer string (a command line, an error message).
_ABS = re.compile(r"(?<![\w:/.-])(/[^\s'\"=,;:]+)")
HUB_DATASET = re.compile(r"(?:hf://datasets/)?([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@[\w./-]+)?/?")


def public_path(s: str) -> str:
    """A local path as a plain name; anything remote (hf://, s3://, https://) unchanged."""
    if "://" in s or not s:
        return s
    if os.path.isabs(s) or s.startswith("~"):  # a relative path (data/cifar10) names no machine
        return Path(s).name or s
    return s


def public_text(s: str) -> str:
    """`s` with every absolute path in it replaced by its last component."""
    if "://" in s:
        return s
    return _ABS.sub(lambda m: Path(m.group(1)).name or m.group(1), s)


def public_tree(obj: Any) -> Any:
    """A JSON / YAML tree with `public_text` applied to every string (keys kept)."""
    if isinstance(obj, dict):
        return {k: public_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [public_tree(v) for v in obj]
    if isinstance(obj, str):
        return public_path(obj) if os.path.isabs(obj) else public_text(obj)
    return obj


def public_recipe(d: dict) -> dict:
    """A recipe dict (Recipe.to_dict) for publication: its path-valued keys as plain names."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for section, key in (("data", "shards"), ("eval", "fid_reference"), ("train", "init_from"),
                         ("run", "output_dir")):
        v = d.get(section, {}).get(key)
        if isinstance(v, str) and not hub_dataset_id(v):
            d[section][key] = public_path(v)
    return public_tree(d)


def hub_dataset_id(spec: str | None) -> str | None:
    """The Hub data set id of a `data.shards` value: `hf://datasets/you/shards@rev`, or `you/shards`
    when this machine's shard cache holds a copy fetched from the Hub (a relative local folder
    `data/cifar10` has the same shape); None for a local folder or another URL."""
    if not spec or "://" in spec and not spec.startswith("hf://datasets/"):
        return None
    m = HUB_DATASET.fullmatch(spec)
    if m is None:
        return None
    if spec.startswith("hf://"):
        return m.group(1)
    from pipeline.remote_shards import cache_root  # torch-free

    fetched = cache_root() / "hub" / (re.sub(r"[^\w.-]+", "--", spec).strip("-")[:120])
    return spec if fetched.is_dir() and not os.path.exists(spec) else None
