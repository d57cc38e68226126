"""The shared small helpers: atomic writes keep the old file whole on failure; a UserError
is one line on stderr and exit 2 in every CLI, anything else keeps its traceback."""

from __future__ import annotations

import json

import pytest

from pipeline import atomic
from pipeline.errors import UserError, run_cli


def test_write_json_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "state.json"
    atomic.write_json(p, {"step": 1}, fsync=True)
    atomic.write_json(p, {"step": 2})
    assert json.loads(p.read_text()) == {"step": 2} and p.read_text().endswith("\n")
    assert [f.name for f in tmp_path.iterdir()] == ["state.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "state.json"
    atomic.write_json(p, {"step": 1})
    with pytest.raises(TypeError):
        atomic.write_json(p, {"step": object()})  # not serialisable: fails before any replace
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(p) as tmp:
            tmp.write_text('{"step": 2')  # half written, then the writer dies
            raise RuntimeError("killed")
    assert json.loads(p.read_text()) == {"step": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["state.json"]


def test_atomic_path_keeps_the_suffix(tmp_path):
    """Writers that choose a format by extension (np.save, save_image) still see it."""
    with atomic.atomic_path(tmp_path / "grid.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "grid.png").read_bytes() == b"png"


def test_run_cli_reports_user_errors_in_one_line(capsys):
    def main(fail):
        if fail:
            raise UserError("recipe.yaml: train.lr: must be positive\n(details that stay out)")
        return 0

    assert run_cli(main, False) == 0
    assert run_cli(main, True) == 2
    assert capsys.readouterr().err == "error: recipe.yaml: train.lr: must be positive\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: traceback
        run_cli(lambda: 1 / 0)
