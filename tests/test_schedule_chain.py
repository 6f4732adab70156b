"""The stream's learning rate: one warm-up for the chain of files, counted in optimizer steps across them and
recorded with each model version; re-warming per file as an option; never a step at learning rate 0."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from engine.core import protocol
from engine.store import models
from engine.core.config import TrainingConfig
from engine.data.demo_data import write_demo_file
from worker_runs import TRAINING, make_spec, of, run_worker

KINDS = ("constant_with_warmup", "linear", "cosine", "warmup_stable_decay")


def rates(kind: str, total: int, chain_steps: int, warmup: int = 6, per_file: bool = False) -> list[float]:
    """The multiplier of each of a file's steps, as the Trainer's scheduler gives it (step k at k - 1 done)."""
    import torch

    from engine.worker.lr_schedule import Schedule

    t = TrainingConfig(lr_scheduler=kind, warmup_steps=warmup, warmup_per_file=per_file)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = Schedule.of(t, chain_steps).create(optimizer, total)
    out = []
    for _ in range(total):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_no_step_of_any_schedule_trains_at_learning_rate_0(kind):
    for total in range(1, 9):
        for chain in (0, 3, 50):
            assert min(rates(kind, total, chain)) > 0, (kind, total, chain)


def test_the_warm_up_goes_on_across_files_and_a_later_file_starts_at_the_peak():
    whole = rates("constant_with_warmup", 10, 0)
    assert whole[:7] == pytest.approx([1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1.0])
    # The same ten steps as two files of 4 and 6: the second goes on where the first left the warm-up.
    assert rates("constant_with_warmup", 4, 0) + rates("constant_with_warmup", 6, 4) == pytest.approx(whole)
    assert rates("constant_with_warmup", 3, 20) == [1.0, 1.0, 1.0]


def test_warmup_per_file_warms_every_file_up_again():
    assert rates("constant_with_warmup", 3, 20, per_file=True) == pytest.approx([1 / 7, 2 / 7, 3 / 7])


def test_a_decaying_schedule_is_the_files_shape_times_the_chains_warm_up():
    later = rates("linear", 4, 100)
    assert later == pytest.approx([1.0, 0.75, 0.5, 0.25])  # the peak first: the chain warmed up long ago
    first = rates("linear", 4, 0, warmup=2)
    assert first == pytest.approx([1 / 3 * 1.0, 2 / 3 * 0.75, 0.5, 0.25])


def test_constant_has_no_warm_up_at_all():
    assert rates("constant", 3, 0) == [1.0, 1.0, 1.0]


def test_the_chain_count_comes_from_the_model_marker(tmp_path):
    assert models.chain_steps(str(tmp_path)) == 0  # a base: no marker
    (tmp_path / protocol.MODEL_MARKER).write_text(json.dumps({"step": 7}))
    assert models.chain_steps(str(tmp_path)) == 7  # a version from before the count: its own job's steps
    (tmp_path / protocol.MODEL_MARKER).write_text(json.dumps({"step": 7, "chain_steps": 31}))
    assert models.chain_steps(str(tmp_path)) == 31
    assert models.chain_steps("Org/some-hub-model") == 0


def test_the_daemon_hands_each_job_the_chain_count_of_the_model_it_starts_from(tmp_path):
    from workspaces import drop, make_workspace, start_daemon, text_lines

    ws = make_workspace(tmp_path / "ws", {"jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.5}})
    drop(ws, "a.jsonl", text_lines(20, "a"), age=30)
    drop(ws, "b.jsonl", text_lines(20, "b"), age=20)
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 4}})
    assert proc.wait(60) == 0
    assert models.current(ws)["version"] == "00002-b"
    assert models.chain_steps(str(ws.models / "00001-a")) == 4
    assert models.chain_steps(str(ws.models / "00002-b")) == 8  # b started where a's chain stood


# --- the real worker -------------------------------------------------------------------------


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.e2e
def test_a_one_step_file_trains_and_the_next_file_goes_on_with_the_warm_up(tmp_path, tiny_model_dir):
    """A file that packs into one optimizer step moved the model (it once trained at rate 0 and was held as
    'no improvement'); its version records the chain's steps, and a file trained on it takes its warm-up on."""
    data = write_demo_file(tmp_path / "short.jsonl", 6, "text", seed=5)
    training = dict(TRAINING, warmup_steps=4)
    first = dataclasses.replace(make_spec(tmp_path, tiny_model_dir, "text", data, "first"), training=training)
    rc, events = run_worker(first)
    assert rc == protocol.EXIT_DONE, Path(first.log_path).read_text()[-3000:]
    assert [e["step"] for e in of(events, "step")] == [1]
    assert of(events, "step")[0]["learning_rate"] == pytest.approx(TRAINING["learning_rate"] / 5)
    out = Path(first.model_out)
    before, after = weights(tiny_model_dir), weights(out)
    assert any(not after[k].equal(before[k]) for k in before), "one step trained and changed nothing"
    assert json.loads((out / protocol.MODEL_MARKER).read_text())["chain_steps"] == 1

    second = dataclasses.replace(make_spec(tmp_path, out, "text", data, "second"), training=training,
                                 chain_steps=models.chain_steps(str(out)))
    rc, events = run_worker(second)
    assert rc == protocol.EXIT_DONE, Path(second.log_path).read_text()[-3000:]
    assert of(events, "step")[0]["learning_rate"] == pytest.approx(TRAINING["learning_rate"] * 2 / 5)
    assert json.loads((Path(second.model_out) / protocol.MODEL_MARKER).read_text())["chain_steps"] == 2
    assert "warm-up 1 of 4 steps done before this file, 1 in it" in Path(second.log_path).read_text()


@pytest.mark.e2e
def test_validate_and_preview_say_how_many_optimizer_steps_a_file_makes(tmp_path, tiny_model_dir):
    from workspaces import make_workspace, run_cli

    settings = {"training": {"packing": False, "batch_size": 4, "gradient_accumulation_steps": 2,
                             "warmup_steps": 10, "max_seq_length": 64}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20)))
    shown = run_cli("validate", str(path), "-w", str(ws.root))
    assert shown.returncode == 0, shown.stderr
    # 20 rows, micro-batches of 4, two a step: 3 optimizer steps, all in the chain's first 10
    assert f"{path}: trains in about 3 optimizer steps (20 rows; 3 of them warming up;" in shown.stdout
    doc = json.loads(run_cli("preview", str(path), "-n", "0", "--json", "-w", str(ws.root)).stdout)
    assert doc["files"][0]["training"] == {"rows": 20, "optimizer_steps": 3, "warmup_steps": 3}
