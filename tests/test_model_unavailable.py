"""A model that cannot be loaded holds the queue (`blocked`) instead of failing the files.

The worker says "model unavailable" with its own exit code; the daemon keeps the
file at the head of the queue, counts no failed attempt, looks at the model again
(every minute; faster here through a test hook) and goes on by itself once it loads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest

from engine.core import protocol
from engine.data import demo_data
from engine.store import models
from worker_runs import make_spec, of, run_worker
from workspaces import drop, events, files_in, make_workspace, start_daemon, stop_daemon, text_lines, wait_for

SETTINGS = {"training": {"max_seq_length": 64, "batch_size": 8, "learning_rate": 2e-3},
            "checkpoint": {"every_steps": 10, "keep": 2},
            "jobs": {"warm_worker": True, "stop_grace_seconds": 30.0, "max_attempts": 2},
            "inbox": {"settle_seconds": 0.5}, "disk": {"reserve": 0}}
FAST_RECHECK = {"daemon": {"model_recheck_seconds": 1.0}}


def status(ws) -> dict:
    return json.loads(ws.status_path.read_text()) if ws.status_path.exists() else {"daemon": {}}


def attempts(ws, job_id: str) -> list[dict]:
    return json.loads((ws.run_dir(job_id) / "job.json").read_text())["attempts"]


@pytest.mark.e2e
def test_a_hub_model_that_cannot_be_fetched_exits_79(tmp_path, text_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = dataclasses.replace(make_spec(tmp_path, tmp_path, "text", text_data, "hub"), model_in="some-org/missing")
    rc, found = run_worker(spec)
    assert rc == protocol.EXIT_MODEL_UNAVAILABLE
    [error] = of(found, "error")
    assert error["kind"] == "model_unavailable"
    assert error["message"].startswith("model unavailable: some-org/missing: loading the tokenizer failed: OSError")


@pytest.mark.e2e
def test_deleted_weights_block_the_queue_until_they_are_back(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    aside = tmp_path / "model.safetensors"
    (model / "model.safetensors").rename(aside)
    ws = make_workspace(tmp_path / "ws", SETTINGS, model_dir=model)
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in demo_data.demo_records(80, "text", seed=5))
    drop(ws, "data.jsonl", lines)
    job = "00001-data"
    proc = start_daemon(ws, fake=False, hooks=FAST_RECHECK)
    try:
        wait_for(lambda: status(ws)["daemon"].get("state") == "blocked", timeout=120, what="blocked")
        reason = status(ws)["daemon"]["reason"]
        assert reason.startswith(f"model unavailable: {model}: no weights"), reason
        time.sleep(2.5)  # two looks at the model: still missing, so no new attempt and nothing counted
        assert status(ws)["daemon"]["state"] == "blocked"
        assert files_in(ws, "active") == [f"{job}.jsonl"] and files_in(ws, "failed") == []
        assert [a["outcome"] for a in attempts(ws, job)] == ["model_unavailable"]
        assert attempts(ws, job)[0]["exit_code"] == protocol.EXIT_MODEL_UNAVAILABLE
        assert any(e["kind"] == "model_unavailable" for e in events(ws))

        aside.rename(model / "model.safetensors")  # the user puts the weights back
        wait_for(lambda: files_in(ws, "done") == [f"{job}.jsonl"], timeout=180, what="the file to be trained")
    finally:
        assert stop_daemon(proc) == 0
    assert [a["outcome"] for a in attempts(ws, job)] == ["model_unavailable", "done"]
    assert any(e["kind"] == "unblocked" for e in events(ws))
    assert json.loads(ws.current_model_pointer.read_text())["version"] == job


def test_a_hub_model_is_tried_again_and_no_attempt_counts_as_failed(tmp_path):
    """Fake worker: three attempts cannot fetch the model (max_attempts is 2), the fourth can."""
    ws = make_workspace(tmp_path / "ws", {"jobs": {"warm_worker": False, "max_attempts": 2},
                                          "inbox": {"settle_seconds": 0.5}})
    models.set_current(ws, "hub", "some-org/flaky", None, origin="some-org/flaky")
    drop(ws, "data.jsonl", text_lines(5))
    hooks = {"daemon": {"model_recheck_seconds": 0.3},
             "fake": {"steps": 3, "fail_attempts": 3, "exit_code": protocol.EXIT_MODEL_UNAVAILABLE,
                      "error": "model unavailable: some-org/flaky: cannot connect", "error_kind": "model_unavailable"}}
    proc = start_daemon(ws, hooks=hooks)
    try:
        wait_for(lambda: status(ws)["daemon"].get("reason") == "model unavailable: some-org/flaky: cannot connect",
                 timeout=30, what="blocked on the model")
        wait_for(lambda: files_in(ws, "done") == ["00001-data.jsonl"], timeout=30, what="the fourth attempt")
    finally:
        assert stop_daemon(proc) == 0
    outcomes = [a["outcome"] for a in attempts(ws, "00001-data")]
    assert outcomes == ["model_unavailable"] * 3 + ["done"]
    unavailable = [a for a in attempts(ws, "00001-data")[:3]]
    gaps = [b["started_at"] - a["ended_at"] for a, b in zip(unavailable, attempts(ws, "00001-data")[1:])]
    assert all(gap >= 0.3 for gap in gaps), gaps  # each retry waited for the recheck interval
