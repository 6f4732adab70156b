"""Demo data: deterministic, well-formed in each format, and correct (a model can only learn true facts)."""

from __future__ import annotations

import json
import re

import pytest

from engine.data.demo_data import FORMATS, write_demo_file


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_fact(line: str) -> None:
    if m := re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line):
        assert int(m[1]) + int(m[2]) == int(m[3]), line
    elif m := re.fullmatch(r"count (\d+): ([\d ]+)", line):
        assert [int(x) for x in m[2].split()] == list(range(int(m[1]) + 1, int(m[1]) + 6)), line
    elif m := re.fullmatch(r"reverse ([a-j]+): ([a-j]+)", line):
        assert m[2] == m[1][::-1], line
    elif m := re.fullmatch(r"double (\d+): (\d+)", line):
        assert int(m[2]) == 2 * int(m[1]), line
    else:
        raise AssertionError(f"unexpected line {line!r}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_deterministic_well_formed_and_true(tmp_path, fmt):
    a = write_demo_file(tmp_path / "a.jsonl", 200, fmt, seed=7)
    b = write_demo_file(tmp_path / "b.jsonl", 200, fmt, seed=7)
    c = write_demo_file(tmp_path / "c.jsonl", 200, fmt, seed=8)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    rows = records(a)
    assert len(rows) == 200
    for row in rows:
        if fmt == "text":
            assert set(row) == {"text"}
            for line in row["text"].split("\n"):
                check_fact(line)
        elif fmt == "prompt_completion":
            assert set(row) == {"prompt", "completion"} and row["completion"]
            check_fact(row["prompt"] + row["completion"])
        else:
            roles = [m["role"] for m in row["messages"]]
            assert roles in (["user", "assistant"], ["system", "user", "assistant"])
            user, assistant = row["messages"][-2]["content"], row["messages"][-1]["content"]
            check_fact(user + ("" if user.endswith("=") else " ") + assistant)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]  # no temp files left


def test_unknown_format_is_refused_before_any_file_is_made(tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        write_demo_file(tmp_path / "x.jsonl", 3, "csv")
    assert list(tmp_path.iterdir()) == []
