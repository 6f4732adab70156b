"""`traind eval`: any version or snapshot measured on today's eval suite by a worker, with the real tiny model.

One small prompt -> completion file is trained once (full fine-tuning, and once with a LoRA adapter); the
version's marker holds its evaluation, which `traind eval` must reproduce on the same sources, and it must
leave the queue and the runs as they were.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from engine.tools import evaluate
from workspaces import drop, files_in, make_workspace, run_cli

pytestmark = pytest.mark.e2e

JOB = "00001-animals"
ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot"}
SETTINGS = {"training": {"max_seq_length": 32, "batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 2},
            "checkpoint": {"every_steps": 50}, "inbox": {"settle_seconds": 0.5}, "disk": {"reserve": 0},
            "snapshots": {"daily_at": "off"}}


def lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [json.dumps({"prompt": f"#{i} animal: {name}\nsound:", "completion": f" {ANIMALS[name]}"})
            for i, name in ((i, rng.choice(sorted(ANIMALS))) for i in range(n))]


def train_one(root: Path, model_dir: Path, settings: dict) -> object:
    ws = make_workspace(root, settings, model_dir=model_dir)
    drop(ws, "animals.jsonl", lines(120, seed=1), age=30)
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_in(ws, "done") == [f"{JOB}.jsonl"]
    return ws


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    return train_one(tmp_path_factory.mktemp("full") / "ws", tiny_model_dir, SETTINGS)


def eval_cli(ws, *args: str):
    return run_cli("eval", *args, "-w", str(ws.root), fake=False)


def recorded_after(ws, version: str = JOB) -> dict[str, dict]:
    """The version's figures per source as its job measured them; the starting model's differ, so a figure
    matched proves the trained weights were the ones measured."""
    marker = json.loads((ws.models / version / "traind-model.json").read_text())
    own = marker["eval"]["sources"][JOB]
    assert abs(own["before"]["loss"] - own["after"]["loss"]) > 0.01 * own["after"]["loss"]
    return {name: figures["after"] for name, figures in marker["eval"]["sources"].items()}


def tree(folder: Path) -> dict[str, tuple]:
    """Every entry under a folder: its kind, size, mtime and content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        found[str(path.relative_to(folder))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return found


def test_the_current_version_measures_what_its_marker_recorded_and_nothing_moves(trained):
    ws = trained
    before = {name: tree(ws.root / name) for name in ("queue", "runs", "models")}
    result = eval_cli(ws, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == 1 and doc["target"]["kind"] == "version" and doc["target"]["name"] == JOB
    assert doc["target"]["current"] and doc["target"]["type"] == "model"
    recorded = recorded_after(ws)
    assert [row["name"] for row in doc["sources"]] == [JOB] == list(recorded)
    for row in doc["sources"]:
        figures = recorded[row["name"]]
        assert row["loss"] == pytest.approx(figures["loss"], rel=1e-4), row["name"]
        assert (row["lines"], row["tokens"]) == (figures["lines"], figures["tokens"])
        assert row["recorded"]["loss"] == figures["loss"] and abs(row["change"]) < 1e-4
    assert "measuring 00001-animals" in result.stderr and "tokenizing" in result.stderr  # progress, on stderr

    assert {name: tree(ws.root / name) for name in ("queue", "runs", "models")} == before
    assert not [n for n in os.listdir(ws.state) if n.startswith(".eval.tmp-")], "the temp folder is removed"

    table = evaluate.render(doc)
    assert f"models/{JOB} (current)" in table and f"{recorded[JOB]['loss']:.4f}" in table


def test_a_snapshot_is_measured_and_an_eval_file_added_later_is_a_new_source(trained):
    ws = trained
    taken = run_cli("snapshot", "--name", "first", "-w", str(ws.root), fake=False)
    assert taken.returncode == 0, taken.stderr
    (ws.eval_dir / "sounds.jsonl").write_text("\n".join(lines(30, seed=9)) + "\n")
    try:
        result = eval_cli(ws, "first", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
    finally:
        (ws.eval_dir / "sounds.jsonl").unlink()
    assert doc["target"]["kind"] == "snapshot" and doc["target"]["job_id"] == JOB
    rows = {row["name"]: row for row in doc["sources"]}
    assert list(rows) == [JOB, "eval/sounds"]
    assert rows[JOB]["loss"] == pytest.approx(recorded_after(ws)[JOB]["loss"], rel=1e-4)
    new = rows["eval/sounds"]
    assert new["recorded"] is None and new["change"] is None and new["lines"] == 30
    assert new["loss"] > 0 and new["tokens"] > 0
    assert "measuring eval/sounds" in result.stderr


def test_an_unknown_target_or_an_incomplete_version_exits_1_naming_it(trained):
    ws = trained
    result = eval_cli(ws, "nope")
    assert result.returncode == 1 and "'nope': no model version or snapshot" in result.stderr
    assert f"(versions: {JOB}; snapshots: " in result.stderr

    broken = ws.models / "00002-broken"
    shutil.copytree(ws.models / JOB, broken)
    try:
        (broken / "model.safetensors").unlink()
        result = eval_cli(ws, "models/00002-broken")
        assert result.returncode == 1
        assert "models/00002-broken is incomplete: model.safetensors is missing" in result.stderr
    finally:
        shutil.rmtree(broken)


def test_a_worker_that_fails_says_why_and_leaves_no_temp_folder(trained):
    ws = trained
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: the setting that makes the worker fail here is valid")
    config = ws.config_path.read_text()
    # Without flash-attn, the worker refuses this setting once it resolves it: after it has started.
    ws.config_path.write_text(config.replace('attn_implementation = "auto"',
                                             'attn_implementation = "flash_attention_2"'))
    assert ws.config_path.read_text() != config
    try:
        result = eval_cli(ws)
    finally:
        ws.config_path.write_text(config)
    assert result.returncode == 1
    assert "traind eval: the evaluation worker failed: ValueError: traind.toml: training.attn_implementation" \
        in result.stderr
    assert not [n for n in os.listdir(ws.state) if n.startswith(".eval.tmp-")]


def test_an_empty_suite_is_said_so(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", SETTINGS, model_dir=tiny_model_dir)
    result = eval_cli(ws)
    assert result.returncode == 1 and f"traind eval: {evaluate.EMPTY}" in result.stderr


def test_an_adapter_version_loads_on_its_base_as_training_did(tmp_path, tiny_model_dir):
    ws = train_one(tmp_path / "ws", tiny_model_dir, {**SETTINGS, "adapter": {"method": "lora"}})
    result = eval_cli(ws, JOB, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["target"]["type"] == "adapter" and doc["target"]["base"] == str(tiny_model_dir)
    recorded = recorded_after(ws)
    assert [row["name"] for row in doc["sources"]] == list(recorded)
    for row in doc["sources"]:
        assert row["loss"] == pytest.approx(recorded[row["name"]]["loss"], rel=1e-4), row["name"]


def test_sigterm_mid_evaluation_ends_the_worker_and_removes_the_temp_folder(trained, fork_server):
    import signal
    import subprocess
    import sys

    from workspaces import ROOT, daemon_env

    def children(pid: int) -> set[int]:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}

    ws = trained
    forked_before = children(fork_server.proc.pid)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "eval", "-w", str(ws.root)], env=daemon_env(False),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "tokenizing" in line:  # the worker runs, and its temp folder is there
                break
        temps = [ws.state / n for n in os.listdir(ws.state) if n.startswith(".eval.tmp-")]
        assert len(temps) == 1 and temps[0].is_dir()
        # The worker: forked by the test's fork server (as a daemon's would fork it), or the command's own child.
        workers = sorted(children(proc.pid) | (children(fork_server.proc.pid) - forked_before))
        assert len(workers) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not temps[0].exists()
    assert not Path(f"/proc/{workers[0]}").exists(), "the worker ended with the command"
