"""The quality gate and the eval suite, through the daemon with the scripted fake worker (fast).

The fake worker reports the figures a real evaluation would (eval_after scripts a candidate that forgets);
test_continual.py runs the real tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.core import config, testing
from engine.quality import gate, suite
from engine.store import models
from engine.core.config import EvalConfig
from engine.core.protocol import EVAL_HOLDOUT
from workspaces import (ROOT, daemon_env, drop, events, files_in, make_workspace, reason, run_cli, start_daemon,
                        stop_daemon, text_lines, wait_for)

FAST = {"jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.5}}


def hooks(**script) -> dict:
    return {"fake": {"steps": 4, **script}}


def evaluated(own: str, **figures: tuple[float, float]) -> dict:
    return {"own": own, "sources": {name: {"before": {"loss": b}, "after": {"loss": a}}
                                    for name, (b, a) in figures.items()}}


def test_the_verdict_names_the_forgotten_source_and_the_figures():
    e = EvalConfig()
    ok = gate.judge(evaluated("00002-b", **{"00001-a": (1.20, 1.25), "00002-b": (2.0, 1.5)}), e)
    assert ok.ok and ok.worst["source"] == "00001-a"
    bad = gate.judge(evaluated("00002-b", **{"00001-a": (1.23, 1.41), "00002-b": (2.0, 1.5)}), e)
    assert not bad.ok and bad.reason == "forgetting: eval loss on 00001-a 1.23 -> 1.41, +15% > 5%"
    flat = gate.judge(evaluated("00002-b", **{"00001-a": (1.2, 1.2), "00002-b": (2.0, 2.1)}), e)
    assert not flat.ok and "no improvement on its own held-out lines" in flat.reason
    slight = gate.judge(evaluated("00002-b", **{"00002-b": (2.0, 1.9999)}), EvalConfig(min_improvement=0.01))
    assert "(-0.0050%; needs a fall of more than 1%)" in slight.reason  # never '-0.0%'
    same = gate.judge(evaluated("00002-b", **{"00001-a": (1.2, 1.2), "00002-b": (2.0, 2.0)}), e)
    assert not same.ok and same.reason == ("unchanged: the candidate's eval loss equals its starting model's on "
                                           "every source (2): its training did not move the model")
    assert not gate.judge(None, e).ok  # never current unmeasured
    assert gate.judge(evaluated("x", **{"00001-a": (1.0, 1.04), "x": (2.0, 1.9)}), EvalConfig(max_forgetting=0.03)).ok is False


def test_the_summary_and_the_matrix_keep_what_the_file_did_from_the_starting_model():
    from engine.quality import forgetting

    second = evaluated("00002-b", **{"00001-a": (1.2, 1.5), "00002-b": (2.0, 1.5)})
    summary = gate.summary(second)
    assert summary["own_change"] == pytest.approx(-0.25) and summary["own_loss"] == 1.5
    assert summary["worst_source"] == "00001-a" and summary["worst_change"] == pytest.approx(0.25)
    doc = forgetting.build([("00001-a", {"eval": evaluated("00001-a", **{"00001-a": (3.0, 1.0)})}),
                         ("00002-b", {"eval": second})], "00001-a", {"00002-b"})
    held = doc["versions"][-1]
    assert held["held"] and held["before"] == {"00001-a": 1.2, "00002-b": 2.0}
    assert held["changes"]["00001-a"] == pytest.approx(0.5), "against the version before it: 1.0 -> 1.5"


def test_a_forgetting_candidate_is_held_and_the_next_file_trains_from_the_unchanged_model(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "a.jsonl", text_lines(20, "a"), age=30)
    proc = start_daemon(ws, "--once", hooks=hooks())
    assert proc.wait(60) == 0
    before = models.current(ws)
    assert before["version"] == "00001-a"

    drop(ws, "b.jsonl", text_lines(20, "b"), age=30)
    proc = start_daemon(ws, "--once", hooks=hooks(eval_after={"00001-a": 2.4}))
    assert proc.wait(60) == 0
    assert files_in(ws, "held") == ["00002-b.jsonl"]
    why = reason(ws, "held", "b.jsonl")
    assert why["reason"] == "forgetting: eval loss on 00001-a 2 -> 2.4, +20% > 5%"
    assert why["version"] == "models/00002-b" and (ws.models / "00002-b").is_dir()
    assert models.current(ws)["version"] == "00001-a"
    assert any(e["kind"] == "job_held" and "traind promote 00002-b" in e["message"] for e in events(ws))
    status = json.loads(run_cli("status", "--json", "-w", str(ws.root)).stdout)
    assert status["queue"]["held"] == 1

    drop(ws, "c.jsonl", text_lines(20, "c"), age=30)
    proc = start_daemon(ws, "--once", hooks=hooks())
    assert proc.wait(60) == 0
    record = json.loads((ws.run_dir("00003-c") / "job.json").read_text())
    assert record["attempts"][-1]["model_in"] == str(ws.models / "00001-a")  # not the held one
    assert (ws.models / "00002-b").is_dir(), "a held version is never pruned"
    spec_sources = [s["name"] for s in suite.sources(ws, ws.load_config())[0]]
    assert spec_sources == ["00001-a", "00003-c"]  # a held file's lines are no source: nothing learned them

    # b started from a, and c was accepted since: promoting b would drop c's training. Refused, with the ways out.
    started = lambda: sum(e["kind"] == "daemon_started" for e in events(ws))  # noqa: E731
    earlier = started()  # the --once runs above started daemons too
    proc = start_daemon(ws, hooks=hooks())
    try:
        wait_for(lambda: started() > earlier, what="this daemon to start")
        refused = run_cli("promote", "00002-b", "-w", str(ws.root))
        assert refused.returncode == 1
        assert ("00002-b: its model started from models/00001-a, and the current model has since been trained on "
                "c.jsonl (00003-c): promoting it would drop that training") in refused.stderr
        assert "'traind requeue 00002-b'" in refused.stderr and "'traind promote --force 00002-b'" in refused.stderr
        assert models.current(ws)["version"] == "00003-c" and files_in(ws, "held") == ["00002-b.jsonl"]
        forced = run_cli("promote", "--force", "00002-b", "-w", str(ws.root))
        assert forced.returncode == 0, forced.stderr
        assert "forced: the training of c.jsonl (00003-c) is not in it" in forced.stdout
    finally:
        assert stop_daemon(proc) == 0
    assert models.current(ws)["version"] == "00002-b" and files_in(ws, "done")[-1] == "00003-c.jsonl"
    assert "00002-b.jsonl" in files_in(ws, "done") and files_in(ws, "held") == []
    record = json.loads((ws.run_dir("00002-b") / "job.json").read_text())
    assert record["state"] == "done" and record["dropped_training"] == ["00003-c"]
    again = run_cli("promote", "00002-b", "-w", str(ws.root))
    assert again.returncode == 1 and "not held" in again.stderr


def test_a_candidate_that_did_not_change_is_held_saying_so_and_why(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "a.jsonl", text_lines(20, "a"), age=30)
    proc = start_daemon(ws, "--once", hooks=hooks(eval_after={"00001-a": 2.0}))  # as it started: 2.0
    assert proc.wait(60) == 0
    why = reason(ws, "held", "a.jsonl")["reason"]
    assert why.startswith("unchanged: the candidate's eval loss equals its starting model's on every source (1)")
    assert "no improvement" not in why and "its 4 logged steps trained at learning rates 0.001 to 0.001" in why


def test_a_promote_would_drop_what_the_current_models_line_holds_and_the_held_versions_lacks(tmp_path):
    from engine.quality import held
    from engine.store import jobs
    from engine.core.protocol import MODEL_MARKER

    ws = make_workspace(tmp_path / "ws", FAST)  # its base is models/base-fake, which no job made

    def version(name: str, started_from: str | None = None, **marker) -> None:
        (ws.models / name).mkdir()
        (ws.models / name / MODEL_MARKER).write_text(json.dumps(marker or {"job_id": name}))
        if started_from:
            ws.run_dir(name).mkdir(parents=True)
            (ws.run_dir(name) / "job.json").write_text(json.dumps(
                {"id": name, "original_name": name[6:] + ".jsonl", "state": "done",
                 "attempts": [{"n": 1, "model_in": str(ws.models / started_from)}]}))

    def dropped(held_id: str, current: str) -> list[str]:
        models.set_current(ws, "local", f"models/{current}", current)
        return [name for _, name in held.dropped(ws, jobs.Job(ws, held_id, json.loads(
            (ws.run_dir(held_id) / "job.json").read_text())))]

    version("00001-a", "base-fake")
    version("00002-b", "00001-a")  # held
    version("00003-c", "00001-a")
    version("00004-d", "00003-c")
    assert dropped("00002-b", "00001-a") == []  # nothing accepted since its start
    assert dropped("00002-b", "00004-d") == ["d.jsonl", "c.jsonl"]
    version("restored-daily-1", job_id="00001-a", restored_from="daily-1")  # a rollback to its start
    assert dropped("00002-b", "restored-daily-1") == []
    assert dropped("00002-b", "base-fake") == []  # a rollback to before its start: nothing of its line is lost
    version("rebase-1", rebased_from="00004-d")
    version("00005-e", "rebase-1")
    assert dropped("00002-b", "00005-e") == ["e.jsonl", "d.jsonl", "c.jsonl"]
    assert dropped("00001-a", "00004-d") == ["d.jsonl", "c.jsonl", "a.jsonl"]  # a started from the base


def test_promote_while_a_file_trains_restarts_it_on_the_promoted_model(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "a.jsonl", text_lines(20, "a"), age=30)
    assert start_daemon(ws, "--once", hooks=hooks()).wait(60) == 0
    drop(ws, "b.jsonl", text_lines(20, "b"), age=30)
    assert start_daemon(ws, "--once", hooks=hooks(eval_after={"00001-a": 2.4})).wait(60) == 0
    assert files_in(ws, "held") == ["00002-b.jsonl"]
    proc = start_daemon(ws, hooks=hooks(steps=30, step_seconds=0.1))
    try:
        drop(ws, "c.jsonl", text_lines(20, "c"), age=30)
        wait_for(lambda: (ws.run_dir("00003-c") / "checkpoints" / "checkpoint-10").is_dir(), what="c trains")
        answer = run_cli("promote", "00002-b", "-w", str(ws.root))
        assert answer.returncode == 0, answer.stderr
        assert "00003-c.jsonl starts again from step 0 on it" in answer.stdout
        assert models.current(ws)["version"] == "00002-b"
        wait_for(lambda: "00003-c.jsonl" in files_in(ws, "done"), what="c trained on the promoted model")
    finally:
        proc.terminate()
        proc.wait(30)
    attempts = json.loads((ws.run_dir("00003-c") / "job.json").read_text())["attempts"]
    assert [a["outcome"] for a in attempts] == ["stopped", "done"]
    assert attempts[-1]["model_in"] == str(ws.models / "00002-b") and attempts[-1]["checkpoint_at_start"] is None
    assert (ws.run_dir("00003-c") / "fake_attempts.log").read_text().splitlines()[-1].startswith("0 ")
    assert any(e["kind"] == "restarted" and "00003-c" in e["message"] for e in events(ws))


def test_requeue_sends_a_held_file_back_to_be_trained_again(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "a.jsonl", text_lines(20, "a"), age=30)
    assert start_daemon(ws, "--once", hooks=hooks()).wait(60) == 0
    proc = start_daemon(ws, hooks=hooks(eval_after={"00001-a": 9.0}))
    try:
        drop(ws, "b.jsonl", text_lines(20, "b"), age=20)
        wait_for(lambda: files_in(ws, "held") == ["00002-b.jsonl"], what="b held")
        answer = run_cli("requeue", "00002-b", "-w", str(ws.root))
        assert answer.returncode == 0, answer.stderr
        assert "back in the inbox as b.jsonl" in answer.stdout
        # Trained again as a new job (and, as scripted, held again: the fake forgets every time).
        wait_for(lambda: files_in(ws, "held") == ["00003-b.jsonl"], what="b trained again")
        record = json.loads((ws.run_dir("00002-b") / "job.json").read_text())
        assert record["state"] == "requeued" and record["requeued_as"] == "b.jsonl"
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_promote_cut_short_by_a_refused_write_is_said_in_one_line_and_finished_by_the_next_daemon(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "a.jsonl", text_lines(20, "a"), age=30)
    assert start_daemon(ws, "--once", hooks=hooks(eval_after={"00001-a": 2.4})).wait(60) == 0
    assert files_in(ws, "held") == ["00001-a.jsonl"]
    # No daemon: the command writes itself. Its 3rd write (models/current.json, after the lock's and the job
    # record's) is refused with a full disk.
    env = testing.with_switches(daemon_env(), faults={"nth": 3, "errno": "ENOSPC"})
    answer = subprocess.run([sys.executable, "-m", "engine.cli", "promote", "00001-a", "-w", str(ws.root)], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert answer.returncode == 1 and "Traceback" not in answer.stderr, answer.stderr
    assert answer.stderr.startswith("traind promote: not done: disk full: cannot write ") and "current.json" in answer.stderr
    assert files_in(ws, "held") == ["00001-a.jsonl"] and models.current(ws)["version"] != "00001-a"
    proc = start_daemon(ws, "--once", hooks=hooks())  # the record says done: the daemon finishes what it decided
    assert proc.wait(60) == 0
    assert files_in(ws, "held") == [] and files_in(ws, "done") == ["00001-a.jsonl"]
    assert models.current(ws)["version"] == "00001-a"
    assert any(e["kind"] == "recovered" and "a promote cut short is finished" in e["message"] for e in events(ws))


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_with_warn_or_off_the_candidate_is_published(tmp_path, mode):
    ws = make_workspace(tmp_path / "ws", {**FAST, "eval": {"gate": mode}})
    drop(ws, "a.jsonl", text_lines(20, "a"), age=30)
    assert start_daemon(ws, "--once", hooks=hooks()).wait(60) == 0
    drop(ws, "b.jsonl", text_lines(20, "b"), age=20)
    assert start_daemon(ws, "--once", hooks=hooks(eval_after={"00001-a": 9.0})).wait(60) == 0
    assert files_in(ws, "done") == ["00001-a.jsonl", "00002-b.jsonl"] and models.current(ws)["version"] == "00002-b"
    warned = [e for e in events(ws) if e["kind"] == "quality_warning"]
    assert (len(warned) == 1 and "forgetting: eval loss on 00001-a" in warned[0]["message"]) == (mode == "warn")


def test_the_suite_stays_bounded_on_a_long_stream(tmp_path):
    ws = make_workspace(tmp_path / "ws", {"eval": {"per_source_examples": 200, "max_suite_examples": 300}})
    for n in range(1, 51):
        job = f"{n:05d}-f{n}"
        (ws.queue("done") / f"{job}.jsonl").write_text("{}\n")
        ws.run_dir(job).mkdir(parents=True)
        (ws.run_dir(job) / "job.json").write_text(json.dumps({"id": job, "original_name": f"f{n}.jsonl",
                                                              "state": "done", "attempts": [], "format": "text"}))
        (ws.run_dir(job) / EVAL_HOLDOUT).write_text("".join(json.dumps({"text": f"{n} {i}"}) + "\n" for i in range(50)))
    (ws.eval_dir / "general.jsonl").write_text("".join(json.dumps({"text": f"general {i}"}) + "\n" for i in range(900)))
    (ws.eval_dir / "broken.jsonl").write_text("not json\n")
    found, problems = suite.sources(ws, config.load(ws.config_path))
    assert len(found) == 51 and found[-1]["name"] == "eval/general"
    assert sum(s["lines"] for s in found) <= 300 and all(s["lines"] >= 1 for s in found)
    assert len(problems) == 1 and problems[0].startswith("eval/broken.jsonl left out of the eval suite")
