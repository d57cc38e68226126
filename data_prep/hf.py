"""`python -m data_prep hf --dataset NAME`: an image data set of the `datasets` library (a Hub
data set id, or a local copy: a folder of parquet / arrow / image files) as a data_prep source.

Items are the rows of one split (`--split`, default train), keyed `<split>_<row:08d>`; the bytes
of the image column (`--image-column`, default: the first column of type Image) go through the
same centre crop + resize as every other source, and the train/test split of the shards is
chosen by key hash (`--test-fraction` / `--test-count`), or taken from another split of the data
set with `--test-split`. The data set's own files are read through `datasets` (its cache, its
HF_ENDPOINT / token); nothing here talks to the Hub directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_prep.sources import PrepError


class HfSource:
    kind = "hf"

    def __init__(self, name: str, split: str = "train", image_column: str | None = None,
                 test_split: str | None = None, revision: str | None = None):
        try:
            import datasets  # an optional dependency: `pip install -e '.[hf]'`
        except ImportError:
            raise PrepError("data_prep hf needs the `datasets` library: pip install datasets") from None
        self.path, self.name = name, name
        self.splits = [split] + ([test_split] if test_split else [])
        self._ds = {}
        for s in self.splits:
            try:
                ds = self._load(datasets, name, s, revision)
            except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
                raise PrepError(f"--dataset {name}: cannot load split {s!r}: {str(e).splitlines()[0]}") from None
            self._ds[s] = ds
        first = self._ds[split]
        self.column = image_column or next(
            (c for c, f in first.features.items() if isinstance(f, datasets.Image)), None)
        if self.column is None or not isinstance(first.features.get(self.column), datasets.Image):
            have = ", ".join(f"{c} ({type(f).__name__})" for c, f in first.features.items())
            raise PrepError(f"--dataset {name}: no image column {image_column or ''} (columns: {have}); "
                            "pass --image-column naming a column of type Image")
        for s, ds in self._ds.items():
            if self.column not in ds.features:
                raise PrepError(f"--dataset {name}: split {s!r} has no column {self.column!r}")
            # Undecoded: the stored bytes go through our own decoder and resize, as for every source.
            self._ds[s] = ds.cast_column(self.column, datasets.Image(decode=False))
        self.test_split = test_split

    @staticmethod
    def _load(datasets, name: str, split: str, revision: str | None):
        p = Path(name)
        if (p / "dataset_dict.json").is_file():  # a DatasetDict.save_to_disk folder
            return datasets.load_from_disk(str(p))[split]
        if (p / "state.json").is_file():  # a Dataset.save_to_disk folder (one split)
            return datasets.load_from_disk(str(p))
        # A Hub id, or a local folder of parquet / csv / image files (the packaged builders).
        return datasets.load_dataset(name, split=split, revision=revision)

    def items(self, limit: int | None = None):
        """[(key, fixed split or None, (split, row))]; `limit`: per split."""
        out = []
        for s in self.splits:
            n = len(self._ds[s]) if limit is None else min(limit, len(self._ds[s]))
            fixed = None if self.test_split is None else ("test" if s == self.test_split else "train")
            out += [(f"{s}_{i:08d}", fixed, (s, i)) for i in range(n)]
        if not out:
            raise PrepError(f"--dataset {self.name}: split {self.splits[0]!r} holds no rows")
        return out

    def read(self, payload) -> bytes:
        split, row = payload
        cell = self._ds[split][row][self.column]
        if cell is None:
            raise ValueError("empty image cell")
        if cell.get("bytes") is not None:
            return cell["bytes"]
        path = cell.get("path")
        if path and os.path.isfile(path):
            if not any(Path(path).resolve().is_relative_to(root) for root in self._roots()):
                # A cell is data, not an instruction: a parquet file naming /etc/passwd or ~/.ssh/id_rsa
                # must not copy that file into the shards (and from there to the Hub).
                raise ValueError(f"image cell names a file outside the data set ({str(path)[:200]}); not read")
            with open(path, "rb") as f:
                return f.read()
        raise ValueError(f"image cell without bytes (path {str(path)[:200]!r} not found)")

    def _roots(self) -> list[Path]:
        """Where a cell's file may lie: the local data set folder (an image folder data set names
        its own files) and the caches the datasets library downloads a Hub data set's files into."""
        if not hasattr(self, "_root_list"):
            import datasets
            from huggingface_hub import constants

            roots = [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]
            if Path(self.name).exists():
                roots.append(Path(self.name))
            self._root_list = [r.resolve() for r in roots]
        return self._root_list
