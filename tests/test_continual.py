"""Continual learning with the real tiny model: held-out lines, the eval suite, the forgetting matrix, the gate.

Three small tasks the tiny model learns in a few dozen steps (prompt -> completion, loss on the completion):
animals and their sounds, fruits and their colours, countries and their capitals; and a file that overwrites
the first one's answers, which the gate must hold.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from engine.core import config, hashing
from engine.store import models
from engine.core.config import render_template
from engine.store.workspace import Workspace
from workspaces import drop, files_in, make_workspace, reason, run_cli, start_daemon, stop_daemon, wait_for

pytestmark = pytest.mark.e2e

TASKS = {
    "animals": ("animal", "sound", {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot"}),
    "fruits": ("fruit", "colour", {"banana": "yellow", "apple": "red", "lime": "green", "plum": "purple"}),
    "countries": ("country", "capital", {"france": "paris", "japan": "tokyo", "peru": "lima", "egypt": "cairo"}),
}
SETTINGS = {"training": {"max_seq_length": 32, "batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 2},
            "checkpoint": {"every_steps": 20}, "jobs": {"warm_worker": True}, "inbox": {"settle_seconds": 0.5},
            "disk": {"reserve": 0}, "snapshots": {"daily_at": "off"}}


def lines(task: str, n: int = 240, seed: int = 0, answers: dict | None = None) -> list[str]:
    key, value, table = TASKS[task]
    table = answers or table
    rng = random.Random(seed)
    names = sorted(table)
    return [json.dumps({"prompt": f"#{i} {key}: {name}\n{value}:", "completion": f" {table[name]}"})
            for i, name in ((i, rng.choice(names)) for i in range(n))]


def run_once(ws, timeout: float = 240) -> None:
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def test_held_out_lines_are_never_trained_on(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.worker import data

    path = tmp_path / "animals.jsonl"
    path.write_text("\n".join(lines("animals", 300)) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    holdout = {"fraction": 0.05, "min": 8, "max": 500, "seed": 42}
    meta = data.build_cache(path, "prompt_completion", tokenizer, 32, tmp_path / "cache", holdout=holdout,
                            holdout_out=tmp_path / "holdout.jsonl")
    held = (tmp_path / "holdout.jsonl").read_text().splitlines()
    assert meta["held_out"] == len(held) == 15 and meta["lines_used"] == 285
    trained = data.TokenDataset(tmp_path / "cache")
    texts = {tokenizer.decode(trained[i]["input_ids"]) for i in range(len(trained))}
    for line in held:
        prompt = json.loads(line)["prompt"]
        assert not any(prompt in text for text in texts), prompt
    # The same lines again, whatever the run: chosen by a hash of the line and the seed.
    again = data.holdout_lines(path, 0.05, 8, 500, 42)
    numbered = path.read_text().splitlines()
    assert sorted(numbered[n - 1] for n in again) == sorted(held)


def test_a_stream_of_three_tasks_fills_the_forgetting_matrix(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", {**SETTINGS, "eval": {"gate": "warn"}}, model_dir=tiny_model_dir)
    for n, task in enumerate(TASKS):
        drop(ws, f"{task}.jsonl", lines(task, seed=n), age=30 - n)
    run_once(ws)
    assert files_in(ws, "done") == ["00001-animals.jsonl", "00002-fruits.jsonl", "00003-countries.jsonl"]

    third = json.loads((ws.run_dir("00003-countries") / "eval.json").read_text())
    assert set(third["sources"]) == {"00001-animals", "00002-fruits", "00003-countries"}
    own = third["sources"]["00003-countries"]
    assert own["before"]["loss"] > own["after"]["loss"], "the file's own held-out lines got better"
    for name in ("00001-animals", "00002-fruits"):
        assert third["sources"][name]["before"]["from_baseline"]  # the current model's figure, not measured again

    doc = json.loads(run_cli("quality", "--json", "-w", str(ws.root), fake=False).stdout)
    assert doc["sources"] == ["00001-animals", "00002-fruits", "00003-countries"]
    assert [row["version"] for row in doc["versions"]] == ["00001-animals", "00002-fruits", "00003-countries"]
    assert [len(row["losses"]) for row in doc["versions"]] == [1, 2, 3]  # the matrix's lower triangle, 3x3
    assert doc["versions"][-1]["current"]
    table = run_cli("quality", "-w", str(ws.root), fake=False).stdout
    assert "*00003-countries" in table

    # A snapshot says how good its model was, for whoever restores it.
    assert run_cli("snapshot", "--name", "third", "-w", str(ws.root), fake=False).returncode == 0
    listed = json.loads(run_cli("snapshots", "--json", "-w", str(ws.root), fake=False).stdout)["snapshots"]
    summary = next(s for s in listed if s["name"] == "third")["source"]["eval"]
    assert summary["sources"] == 3 and summary["own_loss"] == pytest.approx(own["after"]["loss"])
    assert summary["worst_source"] in ("00001-animals", "00002-fruits")


def files_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashing.hash_file(p, "sha256") for p in sorted(folder.iterdir()) if p.is_file()}


def forgetting(ws, job_id: str, source: str) -> float:
    figures = json.loads((ws.run_dir(job_id) / "eval.json").read_text())["sources"][source]
    return figures["after"]["loss"] / figures["before"]["loss"] - 1


def test_a_file_that_overwrites_an_earlier_task_is_held_and_replay_forgets_less(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", {**SETTINGS, "replay": {"fraction": 0.0}}, model_dir=tiny_model_dir)
    drop(ws, "animals.jsonl", lines("animals", seed=1), age=30)
    run_once(ws)
    assert models.current(ws)["version"] == "00001-animals"
    good = files_hash(ws.models / "00001-animals")
    # The same workspace, with a third of each job replayed from earlier files.
    replayed = Workspace.at(tmp_path / "replayed")
    shutil.copytree(ws.root, replayed.root, symlinks=True)
    replayed.config_path.write_text(render_template(config.from_dict({**SETTINGS, "replay": {"fraction": 0.3}})))

    wrong = {"cat": "woof", "dog": "moo", "cow": "quack", "duck": "hoot", "owl": "meow"}
    drop(ws, "relabelled.jsonl", lines("animals", seed=2, answers=wrong), age=30)
    drop(ws, "fruits.jsonl", lines("fruits", seed=3), age=20)
    run_once(ws)
    assert "00002-relabelled.jsonl" in files_in(ws, "held")
    why = reason(ws, "held", "relabelled.jsonl")["reason"]
    assert why.startswith("forgetting: eval loss on 00001-animals ") and "> 5%" in why
    record = json.loads((ws.run_dir("00003-fruits") / "job.json").read_text())
    assert record["attempts"][-1]["model_in"] == str(ws.models / "00001-animals")  # not the held model
    assert files_hash(ws.models / "00001-animals") == good, "the current model is untouched"
    the_ui_shows_the_held_model(ws)

    promoted = run_cli("promote", "00002-relabelled", "-w", str(ws.root), fake=False)
    assert promoted.returncode == 0, promoted.stderr
    assert models.current(ws)["version"] == "00002-relabelled"
    assert "00002-relabelled.jsonl" in files_in(ws, "done")
    assert (ws.replay / "00002-relabelled" / "meta.json").is_file(), "an accepted file's sample joins the pool"

    drop(replayed, "relabelled.jsonl", lines("animals", seed=2, answers=wrong), age=30)
    run_once(replayed)
    start = next(e for e in map(json.loads, (replayed.run_dir("00002-relabelled") / "metrics.jsonl").open())
                 if e["event"] == "job_start")
    assert start["replay"]["examples"] > 0 and start["replay"]["sources"] == {"00001-animals": start["replay"]["examples"]}
    without, with_replay = (forgetting(w, "00002-relabelled", "00001-animals") for w in (ws, replayed))
    print(f"rise of the animals' held-out loss: replay 0 {without:+.1%}, replay 0.3 {with_replay:+.1%}")
    assert with_replay < without, f"forgetting with replay 0.3: {with_replay:+.1%}, without: {without:+.1%}"


def the_ui_shows_the_held_model(ws) -> None:
    """The quality view marks the held version and its forgetting in the alert colour; the chart has the
    last job's eval points. (The UI's modules are imported here: the rest of this file needs none.)"""
    import asyncio

    from engine.core.protocol import MODEL_MARKER
    from pilot_waits import until
    from screen_text import RED, YELLOW, on_screen, shows_in
    from tui.app import TraindApp
    from engine.quality.forgetting import percent
    from tui.screens.main import WorkspaceSource
    from tui.widgets.loss_chart import EVAL_MARK

    marker = json.loads((ws.models / "00002-relabelled" / MODEL_MARKER).read_text())
    forgot = marker["eval"]["sources"]["00001-animals"]
    before, after = forgot["before"]["loss"], forgot["after"]["loss"]
    cell = f"{after:.3f} {percent((after - before) / before)}"  # the matrix cell: against 00001-animals' own figure
    app = TraindApp(ws, start_daemon=False, source=WorkspaceSource(ws))

    async def check() -> None:
        async with app.run_test(size=(160, 48)) as pilot:
            chart = app.screen.query_one("#chart")
            await until(pilot, lambda: on_screen(app, EVAL_MARK, chart.region), what="eval points on the chart")
            await pilot.press("e")
            panel = app.screen.query_one("#quality")
            await until(pilot, lambda: panel.region.width and panel.doc, what="the quality view")
            await pilot.pause(0.1)
            assert shows_in(app, "H  00002-relabelled", YELLOW, panel.region)
            assert shows_in(app, cell, RED, panel.region), cell

    asyncio.run(check())


def test_kill_9_during_the_final_evaluation_never_publishes_an_unevaluated_model(tmp_path, tiny_model_dir):
    import os
    import signal

    # A second task makes the tiny model forget the first (the gate would hold it): warn, to see it published.
    ws = make_workspace(tmp_path / "ws", {**SETTINGS, "eval": {"gate": "warn"}}, model_dir=tiny_model_dir)
    drop(ws, "animals.jsonl", lines("animals", seed=1), age=30)
    run_once(ws)
    metrics = ws.run_dir("00002-fruits") / "metrics.jsonl"

    def evaluating() -> bool:
        return metrics.exists() and '"phase": "after"' in metrics.read_text()

    proc = start_daemon(ws, fake=False, hooks={"eval_sleep_seconds": 1.0})
    try:
        drop(ws, "fruits.jsonl", lines("fruits", seed=3), age=30)
        wait_for(evaluating, timeout=240, what="the final evaluation")
        assert not models.is_complete(models.partial_dir(ws, "00002-fruits"))
        worker = json.loads(ws.worker_record.read_text())
        os.killpg(worker["pgid"], signal.SIGKILL)
        wait_for(lambda: files_in(ws, "done") == ["00001-animals.jsonl", "00002-fruits.jsonl"], timeout=120,
                 what="the job resumed, evaluated and published")
    finally:
        assert stop_daemon(proc) == 0
    marker = json.loads((ws.models / "00002-fruits" / "traind-model.json").read_text())
    assert set(marker["eval"]["sources"]) == {"00001-animals", "00002-fruits"}
    record = json.loads((ws.run_dir("00002-fruits") / "job.json").read_text())
    assert [a["outcome"] for a in record["attempts"]][-1] == "done" and len(record["attempts"]) == 2


@pytest.mark.long
@pytest.mark.timeout(1500)
def test_a_stream_of_fifty_small_files_keeps_the_suite_and_the_pool_within_their_caps(tmp_path, tiny_model_dir):
    settings = {**SETTINGS, "eval": {"gate": "off", "per_source_examples": 10, "max_suite_examples": 120},
                "replay": {"fraction": 0.25, "max_pool_tokens": 4000}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    for n in range(50):
        task = list(TASKS)[n % 3]
        drop(ws, f"{n:02d}-{task}.jsonl", lines(task, n=40, seed=n), age=100 - n)
    run_once(ws, timeout=1200)
    assert len(files_in(ws, "done")) == 50
    pool = [json.loads(p.read_text()) for p in sorted(ws.replay.glob("*/meta.json"))]
    assert len(pool) == 50 and sum(m["tokens"] for m in pool) <= 4000
    assert sum(p.stat().st_size for p in ws.replay.rglob("tokens.bin")) <= 4000 * 4
    last = json.loads((ws.run_dir("00050-49-fruits") / "eval.json").read_text())
    earlier = [s for name, s in last["sources"].items() if name != last["own"]]
    assert len(earlier) == 49 and sum(s["after"]["lines"] for s in earlier) <= 120
    start = next(e for e in map(json.loads, (ws.run_dir("00050-49-fruits") / "metrics.jsonl").open())
                 if e["event"] == "job_start")
    assert start["replay"]["examples"] > 0 and len(start["replay"]["sources"]) > 5
