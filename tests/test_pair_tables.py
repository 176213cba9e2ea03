"""benchmarks/pair_tables.py: per-task columns of committed tables pair task by task; bad input is named."""

from __future__ import annotations

import pytest
from benchmark_helpers import load_benchmark

TABLE = """# Few-shot adaptation

## Per task (accuracy % after 2 steps, mean over episodes)

| task | zero-shot | meta |
|---|---|---|
| a | 50.0 | 62.5 |
| b | 25.0 | 25.0 |
| c | 40.0 | 55.0 |
"""


@pytest.fixture(scope="module")
def pair_tables():
    return load_benchmark("pair_tables")


def test_columns_pair_by_task(pair_tables, tmp_path, capsys):
    path = tmp_path / "results.md"
    path.write_text(TABLE, encoding="utf-8")
    assert pair_tables.read_column(f"{path}:meta") == {"a": 62.5, "b": 25.0, "c": 55.0}
    assert pair_tables.main(["--pair", f"{path}:meta", f"{path}:zero-shot"]) == 0
    # differences 12.5, 0, 15: mean 9.17, sd 8.04, t(2) 4.303 -> half-width 19.97
    assert "| 0 | +9.2 ± 20.0 (n=3) |" in capsys.readouterr().out


def test_bad_input_names_the_file_and_what_is_valid(pair_tables, tmp_path, capsys):
    path = tmp_path / "results.md"
    path.write_text(TABLE, encoding="utf-8")
    other = tmp_path / "other.md"
    other.write_text(TABLE.replace("| c | 40.0 | 55.0 |\n", ""), encoding="utf-8")
    assert pair_tables.main(["--pair", f"{path}:twin", f"{path}:meta"]) == 2
    assert f"{path}: no column 'twin'; the per-task table has zero-shot, meta" in capsys.readouterr().err
    assert pair_tables.main(["--pair", f"{path}:meta", f"{other}:meta"]) == 2
    assert "name different tasks (c)" in capsys.readouterr().err
    assert pair_tables.main(["--pair", f"{tmp_path / 'missing.md'}:meta", f"{path}:meta"]) == 2
    assert "missing.md: no such file" in capsys.readouterr().err
