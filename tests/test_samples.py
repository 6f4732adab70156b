"""Sample answers in the real worker: a version is saved with its answers to the prompts file (samples.jsonl),
listed and hashed in its marker, and greedy answers equal model.generate run by hand on the saved version."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from engine.core import protocol
from engine.worker import samples
from worker_runs import make_spec, of, run_worker

pytestmark = pytest.mark.e2e

PROMPTS = [
    {"id": "chat", "line": 1, "kind": "messages",
     "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]},
    {"id": "2", "line": 2, "kind": "prompt", "text": "The capital of France is"},
    {"id": "3", "line": 3, "kind": "text", "text": "Once upon a time"},
]
PLAN = {"prompts": PROMPTS, "max_new_tokens": 12, "temperature": 0.0, "path": "eval/prompts.jsonl"}


def read_samples(version: Path) -> tuple[dict, list[dict]]:
    header, *records = [json.loads(line) for line in (version / samples.SAMPLES).read_text().splitlines()]
    return header["samples"], records


def test_a_version_is_saved_with_its_answers_equal_to_generate_by_hand(tmp_path, tiny_model_dir, text_data):
    spec = dataclasses.replace(make_spec(tmp_path, tiny_model_dir, "text", text_data, "answers"), samples=PLAN)
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    version = Path(spec.model_out)
    header, records = read_samples(version)
    assert header["prompts"] == 3 and header["version"] == "answers"
    assert [r["id"] for r in records] == ["chat", "2", "3"]
    marker = json.loads((version / protocol.MODEL_MARKER).read_text())
    assert samples.SAMPLES in marker["files"] and samples.SAMPLES in marker["hashes"]
    assert of(events, "job_end")[0]["samples"]["prompts"] == 3

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(version).eval()
    tokenizer = AutoTokenizer.from_pretrained(version)
    for prompt, record in zip(PROMPTS, records):
        ids = samples.prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        assert record["answer"] == tokenizer.decode(new, skip_special_tokens=True), prompt["id"]
        assert record["tokens"] == len(new)
    assert any(r["answer"] for r in records), "the model said nothing at all"


def test_no_prompts_means_no_answers_and_no_file(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "none")
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_DONE
    assert not (Path(spec.model_out) / samples.SAMPLES).exists() and of(events, "job_end")[0]["samples"] is None


def test_through_the_daemon_a_bad_prompt_line_is_reported_and_the_version_answers_the_rest(tmp_path, tiny_model_dir):
    from workspaces import drop, files_in, make_workspace, run_cli, text_lines

    settings = {"training": {"max_seq_length": 64, "batch_size": 8}, "samples": {"max_new_tokens": 8},
                "snapshots": {"daily_at": "off"}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    (ws.eval_dir / "prompts.jsonl").write_text(
        json.dumps({"prompt": "Two and two make"}) + "\n" + "{broken\n" + json.dumps({"text": "Hello"}) + "\n")
    drop(ws, "a.jsonl", text_lines(200, "a"))
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_in(ws, "done") == ["00001-a.jsonl"]
    header, records = read_samples(ws.models / "00001-a")
    assert [r["line"] for r in records] == [1, 3] and header["max_new_tokens"] == 8
    logged = [json.loads(line) for line in (ws.state / "events.jsonl").read_text().splitlines()]
    [bad] = [e for e in logged if e["kind"] == "prompt_invalid"]
    assert bad["message"].startswith("eval/prompts.jsonl line 2: not JSON") and bad["level"] == "warning"


def test_kill_9_while_answering_leaves_no_version_and_the_retry_publishes_one_with_every_answer(
        tmp_path, tiny_model_dir, text_data):
    import os
    import signal

    reference = dataclasses.replace(make_spec(tmp_path, tiny_model_dir, "text", text_data, "whole"), samples=PLAN)
    assert run_worker(reference)[0] == protocol.EXIT_DONE
    spec = dataclasses.replace(make_spec(tmp_path, tiny_model_dir, "text", text_data, "killed",
                                         samples_sleep_seconds=2.0), samples=PLAN)

    def kill(proc, event):
        if event["event"] == "answering":
            os.kill(proc.pid, signal.SIGKILL)

    rc, _ = run_worker(spec, kill)
    assert rc == -signal.SIGKILL
    assert not (Path(spec.model_out) / protocol.MODEL_MARKER).exists()  # nothing published, nothing torn
    rc, events = run_worker(dataclasses.replace(spec, test_hooks={}))
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    _, records = read_samples(Path(spec.model_out))
    _, expected = read_samples(Path(reference.model_out))
    assert [(r["id"], r["answer"]) for r in records] == [(r["id"], r["answer"]) for r in expected]
    marker = json.loads((Path(spec.model_out) / protocol.MODEL_MARKER).read_text())
    assert samples.SAMPLES in marker["hashes"]
