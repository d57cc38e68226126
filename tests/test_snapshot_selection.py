"""App. B reports every metric at the minimum-FID checkpoint: every paper recipe (and each Table 2
row) keeps EMA snapshots often enough for `eval sweep` to choose, and the README's disk table is
what those recipes write (4 bytes a parameter, one snapshot every `snapshot_every` steps)."""

import re
from pathlib import Path

import pytest
import torch

from pipeline import build
from pipeline.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.stem != "quickstart")
ABLATIONS = sorted((ROOT / "recipes" / "ablations").glob("*.yaml"))


def _params(recipe) -> int:
    with torch.device("meta"):  # sizes only: no memory, no time
        return sum(p.numel() for p in build.unet(recipe.model).parameters())


@pytest.mark.parametrize("path", PAPER + ABLATIONS, ids=lambda p: p.stem)
def test_every_paper_recipe_keeps_snapshots_to_choose_from(path):
    t = load_recipe(path).train
    assert t.snapshot_every > 0 and t.max_steps % t.snapshot_every == 0, path.name
    # at least 20 candidates over the run (the original scored a checkpoint every 30 minutes)
    assert t.max_steps // t.snapshot_every >= 20, path.name


def test_readme_disk_table_is_what_the_recipes_write():
    text = (ROOT / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s*\| (`[^|]+) \| (\d+)k \| (\d+) \| (\d+) MB \| ([\d.]+) GB \|$", line)
        if m:
            for name in re.findall(r"`([^`]+\.yaml)`", m.group(1)):
                rows[name] = tuple(float(v) for v in m.groups()[1:])
    each_row = rows.pop("ablations/*.yaml")
    rows.update({f"ablations/{p.name}": each_row for p in ABLATIONS})
    assert set(rows) == {p.name for p in PAPER} | {f"ablations/{p.name}" for p in ABLATIONS}
    for name, (every_k, count, each_mb, all_gb) in rows.items():
        r = load_recipe(ROOT / "recipes" / name)
        n, k = _params(r), r.train.max_steps // r.train.snapshot_every
        assert (every_k * 1000, count) == (r.train.snapshot_every, k), name
        assert each_mb == round(4 * n / 1e6) and all_gb == round(4 * n * k / 1e9, 1), name
