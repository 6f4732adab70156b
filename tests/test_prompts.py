"""The prompts file every version answers (engine/data/prompts.py): its three shapes, a bad line named and left out,
the cap, and that the eval suite does not take it for an eval source."""

from __future__ import annotations

import json
from pathlib import Path

from engine.core import config
from engine.data import prompts
from engine.quality import suite


def write(path, *lines) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_the_three_shapes_are_read_with_their_ids(tmp_path):
    path = tmp_path / "prompts.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    tools = [{"type": "function", "function": {"name": "add"}}]
    write(path, {"id": "sum", "messages": chat, "tools": tools}, {"prompt": "The capital of France is"}, "",
          {"text": "Once upon a time", "id": 7})
    read = prompts.read(path, max_prompts=32)
    assert read.problems == []
    assert [(p["id"], p["line"], p["kind"]) for p in read.items] == [("sum", 1, "messages"), ("2", 2, "prompt"),
                                                                      ("7", 4, "text")]
    assert read.items[0]["messages"] == chat and read.items[0]["tools"] == tools
    assert read.items[1]["text"] == "The capital of France is"


def test_a_bad_line_is_named_with_its_number_and_left_out(tmp_path):
    path = tmp_path / "prompts.jsonl"
    answered = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write(path, {"prompt": "fine"}, "{not json", {"messages": answered}, {"prompt": "a", "text": "b"},
          {"prompt": "  "}, {"text": "x", "colour": "red"}, {"text": "again", "id": "1"}, {"prompt": "fine too"})
    read = prompts.read(path, max_prompts=32, shown="eval/prompts.jsonl")
    assert [p["line"] for p in read.items] == [1, 8]
    assert [problem.split(":")[0] for problem in read.problems] == [f"eval/prompts.jsonl line {n}" for n in range(2, 8)]
    said = "\n".join(read.problems)
    assert "not JSON" in said and "must end with a user turn" in said and "expected only one of them" in said
    assert "must be a non-empty string" in said and "unknown key 'colour'" in said
    assert "line 7: id '1' is line 1's already" in said
    assert all(problem.endswith("left out") for problem in read.problems)


def test_past_max_prompts_the_rest_is_left_out_once(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write(path, *({"text": f"prompt {i}"} for i in range(10)))
    read = prompts.read(path, max_prompts=3)
    assert [p["text"] for p in read.items] == ["prompt 0", "prompt 1", "prompt 2"]
    assert read.problems == [f"{path} line 4 and after: left out, past samples.max_prompts = 3"]


def test_no_prompts_file_means_no_prompts_and_no_problem(tmp_path):
    assert prompts.read(tmp_path / "prompts.jsonl", max_prompts=32) == prompts.Prompts()
    default = config.Config().samples.prompts
    assert prompts.location(tmp_path, default) == tmp_path / "eval" / prompts.PROMPTS_NAME
    assert prompts.location(tmp_path, "/data/mine.jsonl") == Path("/data/mine.jsonl")


def test_the_eval_suite_does_not_take_the_prompts_file_for_an_eval_source(tmp_path):
    from workspaces import make_workspace

    ws = make_workspace(tmp_path / "ws", {})
    write(ws.eval_dir / prompts.PROMPTS_NAME, {"messages": [{"role": "user", "content": "hi"}]})
    write(ws.eval_dir / "facts.jsonl", *({"text": f"fact {i}"} for i in range(20)))
    found, problems = suite.sources(ws, config.Config())
    assert [s["name"] for s in found] == ["eval/facts"] and problems == []
