"""The comparison commands' result files: strict JSON, every key a column, never half written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fm_optuna._results import save_table


def test_a_table_and_its_result_are_strict_and_complete(tmp_path: Path) -> None:
    rows = [{"method": "ew", "score": 0.5}, {"method": "stl", "score": float("nan"), "extra": 1}]
    paths = save_table(tmp_path / "new", "methods", rows, {"table": rows, "when": tmp_path})
    with paths["csv"].open(newline="") as file:
        table = list(csv.DictReader(file))
    assert [row["method"] for row in table] == ["ew", "stl"] and table[1]["extra"] == "1"
    result = json.loads(paths["json"].read_text(), parse_constant=pytest.fail)  # no NaN
    assert result["table"][1]["score"] is None and result["when"] == str(tmp_path)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["methods.csv", "methods.json"]


def test_a_result_that_cannot_be_written_leaves_the_previous_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_table(tmp_path, "replay", [{"a": 1}], {"version": 1})

    class Unserialisable:
        def __str__(self) -> str:
            raise ValueError("cannot be shown")

    with pytest.raises(ValueError, match="cannot be shown"):
        save_table(tmp_path, "replay", [{"a": 2}], {"version": Unserialisable()})
    real_write = Path.write_text

    def disk_full(path: Path, text: str, *args: object, **kwargs: object) -> int:
        real_write(path, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_table(tmp_path, "replay", [{"a": 3}], {"version": 3})
    monkeypatch.undo()
    assert json.loads((tmp_path / "replay.json").read_text()) == {"version": 1}
    assert (tmp_path / "replay.csv").read_text().split() == ["a", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.csv", "replay.json"]
