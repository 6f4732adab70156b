"""No state file can stop the daemon from starting: damaged ones are quarantined and rebuilt.

Each case leaves a workspace as a killed daemon would (a file mid-training,
checkpoints on disk), damages one state file, and starts a daemon: it must
move the file to state/quarantine/ with an alert naming it, rebuild what it
can from the other files, and train the file to the end, never crash or loop.
The reader itself is fuzzed with generated damage.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from hypothesis import given, settings, strategies as st

from budget import examples
from engine.store import statefiles
from workspaces import drop, events, files_in, make_workspace, start_daemon, text_lines, wait_for

FAST = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.2}}
JOB = "00001-data"


def killed_mid_training(ws) -> None:
    """A daemon and its worker killed with SIGKILL after the job's first checkpoints."""
    drop(ws, "data.jsonl", text_lines(5))
    proc = start_daemon(ws, hooks={"fake": {"steps": 400, "step_seconds": 0.02, "checkpoint_every": 5}})
    ckpts = ws.run_dir(JOB) / "checkpoints"
    wait_for(lambda: ckpts.exists() and len(list(ckpts.glob("*/traind-complete.json"))) >= 2, what="checkpoints")
    worker = json.loads(ws.worker_record.read_text())
    proc.kill()
    proc.wait()
    try:
        os.killpg(worker["pgid"], signal.SIGKILL)
    except ProcessLookupError:
        pass


DAMAGE = {
    "empty job record": (lambda ws: ws.run_dir(JOB) / "job.json", lambda data: b""),
    "torn job record": (lambda ws: ws.run_dir(JOB) / "job.json", lambda data: data[: len(data) // 2]),
    "job record with attempts as an object": (lambda ws: ws.run_dir(JOB) / "job.json",
                                              lambda data: json.dumps({**json.loads(data), "attempts": {}}).encode()),
    "daemon record as a list": (lambda ws: ws.daemon_record, lambda data: b"[1, 2]"),
    "garbage current-model pointer": (lambda ws: ws.current_model_pointer, lambda data: b"\x00garbage{"),
    "worker record of the wrong shape": (lambda ws: ws.worker_record, lambda data: b'{"pid": "x"}'),
    "torn rollback journal": (lambda ws: ws.state / "rollback.json", lambda data: b'{"target": "da'),
    "damaged checkpoint marker": (lambda ws: max((ws.run_dir(JOB) / "checkpoints").glob("*/traind-complete.json")),
                                  lambda data: b"{}"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_state_file_is_quarantined_and_the_file_still_trains(tmp_path, case):
    # traind.toml names the base model, as `traind init --model DIR` does: what a lost pointer falls back to.
    ws = make_workspace(tmp_path / "ws", {**FAST, "model": {"source": str(tmp_path / "ws" / "models" / "base-fake")}})
    killed_mid_training(ws)
    where, damage = DAMAGE[case]
    path = where(ws)
    path.write_bytes(damage(path.read_bytes() if path.exists() else b"{}"))
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 40, "checkpoint_every": 5}})
    assert proc.wait(60) == 0, (ws.root / "daemon.log").read_text()[-3000:]
    assert [files_in(ws, s) for s in ("inbox", "active", "done", "failed")] == [[], [], [f"{JOB}.jsonl"], []]
    quarantined = os.listdir(ws.state / "quarantine")
    assert len(quarantined) == 1 and quarantined[0].endswith(path.name)
    alerts = [e for e in events(ws) if e["kind"] == "quarantined"]
    assert len(alerts) == 1 and ws.relative(path) in alerts[0]["message"]
    assert "Traceback" not in (ws.root / "daemon.log").read_text()
    current = json.loads(ws.current_model_pointer.read_text())
    assert current["version"] == JOB  # the model trained on the file is the current one
    if case == "garbage current-model pointer":
        assert any("the current model is now" in e["message"] for e in events(ws))


SHAPES = [statefiles.JOB, statefiles.DAEMON, statefiles.WORKER, statefiles.CURRENT_MODEL, statefiles.ROLLBACK,
          statefiles.CHECKPOINT_MARKER, statefiles.MANIFEST, statefiles.VERIFICATION, statefiles.TOKEN_CACHE, statefiles.INIT]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
                           max_leaves=20)
GOOD = {"job record": {"id": "00001-a", "original_name": "a.jsonl", "state": "training", "attempts": [{"n": 1}]},
        "current-model pointer": {"kind": "local", "path": "models/x", "version": "x"}}


@settings(max_examples=examples(300), deadline=None)
@given(shape=st.sampled_from(SHAPES), content=st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(list(GOOD.values())).flatmap(lambda good: st.integers(0, len(json.dumps(good))).map(
        lambda cut: json.dumps(good).encode()[:cut]))))
def test_the_reader_returns_a_whole_file_of_its_shape_or_says_it_is_damaged(tmp_path_factory, shape, content):
    path = tmp_path_factory.mktemp("state") / "file.json"
    path.write_bytes(content)
    try:
        doc = statefiles.read(path, shape)
    except statefiles.Damaged as e:
        assert str(path) in str(e) and e.why
        return
    assert isinstance(doc, dict) and shape.problem(doc) is None
    assert all(k in doc for k in shape.required)


def test_in_the_daemon_a_damaged_file_is_moved_aside_never_deleted(tmp_path):
    root = tmp_path / "ws"
    (root / "runs" / "j").mkdir(parents=True)
    path = root / "runs" / "j" / "job.json"
    path.write_bytes(b'{"id": 1')
    reported = []
    statefiles.set_quarantine(root, lambda p, moved, why: reported.append((p, moved, why)))
    try:
        with pytest.raises(statefiles.Damaged):
            statefiles.read(path, statefiles.JOB)
    finally:
        statefiles.set_quarantine(root, None)
    (moved_path,) = (root / "state" / "quarantine").iterdir()
    assert not path.exists() and moved_path.read_bytes() == b'{"id": 1' and moved_path.name.endswith("runs~j~job.json")
    assert reported == [(path, moved_path, reported[0][2])] and "not JSON" in reported[0][2]
    assert statefiles.read(path, statefiles.JOB) is None  # gone from its place: missing, which callers rebuild
