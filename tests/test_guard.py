"""Anomalies and hardware faults in the worker: NaN/inf guard and rollback, loss spikes, CUDA OOM, GPU check.

Real tiny model on the CPU (see test_worker.py); faults are injected by test
hooks that make them real (a NaN loss flows through backward; a real
torch.cuda.OutOfMemoryError is raised). Invariant 2 is asserted on the files
themselves: no saved checkpoint or model ever holds a non-finite tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest

from engine.core import protocol
from engine.store import checkpoints
from engine.data.demo_data import write_demo_file
from worker_runs import eval_suite, losses, make_spec, of, run_worker

pytestmark = pytest.mark.e2e


def log_tail(spec) -> str:
    return Path(spec.log_path).read_text()[-3000:]


def assert_all_saved_tensors_finite(spec) -> None:
    """Every checkpoint and the final model on disk (complete or not): weights and optimizer state finite."""
    import torch
    from safetensors.torch import load_file

    dirs = [p for _s, p in checkpoints.complete_checkpoints(spec.run_dir) + checkpoints.incomplete_checkpoints(spec.run_dir)]
    if Path(spec.model_out).exists():
        dirs.append(Path(spec.model_out))
    for d in dirs:
        for name, tensor in load_file(d / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), f"{d.name}: {name} is not finite"
        if (d / "optimizer.pt").exists():
            state = torch.load(d / "optimizer.pt", weights_only=True)["state"]
            for i, entry in state.items():
                for key, value in entry.items():
                    assert torch.isfinite(value).all(), f"{d.name}: optimizer {i}.{key} is not finite"


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_loss_is_caught_before_it_is_applied_and_rollback_skips_past_it(
        tmp_path, tiny_model_dir, text_data, text_reference, value):
    bad = 15  # after checkpoint-10, before checkpoint-20
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, value,
                     inject_nonfinite={"step": bad, "value": value})
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_ROLLBACK, log_tail(spec)
    [anomaly] = of(events, "anomaly")
    assert anomaly["step"] == bad and anomaly["kind"] == value and anomaly["loss"] is None
    assert value in anomaly["message"]
    assert max(e["step"] for e in of(events, "step")) == bad - 1  # the bad step was never applied nor logged
    assert [s for s, _ in checkpoints.complete_checkpoints(spec.run_dir)] == [10]
    assert checkpoints.incomplete_checkpoints(spec.run_dir) == [] and not Path(spec.model_out).exists()
    reference = losses(text_reference[2])
    for step, loss in losses(events).items():  # the guard changes nothing before the anomaly
        assert loss == pytest.approx(reference[step], abs=1e-6), f"step {step}"

    # The daemon's retry: same hooks (step `bad` is now skipped, so the injection never fires again).
    rc, second = run_worker(dataclasses.replace(spec, rollback={"bad_step": bad, "kind": value}))
    assert rc == protocol.EXIT_DONE, log_tail(spec)
    start = of(second, "job_start")[0]
    assert start["resumed_from_step"] == bad and start["rolled_back_from"] == 10 and start["skipped"] == [11, bad]
    steps = [e["step"] for e in of(second, "step")]
    assert steps == list(range(bad + 1, start["total_steps"] + 1))
    assert all(math.isfinite(e["loss"]) for e in of(second, "step"))
    assert second[-1]["event"] == "job_end" and second[-1]["outcome"] == "done"
    assert_all_saved_tensors_finite(spec)


@pytest.mark.long
def test_two_ranks_roll_back_past_a_nan_and_a_kill_to_the_weights_of_an_uninterrupted_rollback(
        tmp_path, tiny_model_dir):
    """Two ranks (gloo): a NaN at step 7 rolls back to checkpoint-4 and skips steps 5-7 on every rank. One job
    measures the starting model first (the eval suite) and its rollback attempt is killed -9 after checkpoint-8,
    then resumed; the other is neither evaluated nor killed. Both publish the same weights, byte for byte."""
    data = write_demo_file(tmp_path / "text.jsonl", 200, "text", seed=1)  # 13 steps of two ranks
    source = write_demo_file(tmp_path / "earlier.jsonl", 40, "text", seed=2)
    nan = {"step": 7, "value": "nan"}

    def roll_back(spec: protocol.JobSpec, on_event=None) -> tuple[int, list[dict]]:
        rc, events = run_worker(spec, processes=2)
        assert rc == protocol.EXIT_ROLLBACK, log_tail(spec)
        assert [s for s, _ in checkpoints.complete_checkpoints(spec.run_dir)] == [4]
        return run_worker(dataclasses.replace(spec, rollback={"bad_step": 7, "kind": "nan"}), on_event, processes=2)

    plain = make_spec(tmp_path, tiny_model_dir, "text", data, "plain", checkpoint=dict(every_steps=4, keep=2),
                      inject_nonfinite=nan)
    rc, reference = roll_back(plain)
    assert rc == protocol.EXIT_DONE, log_tail(plain)
    assert of(reference, "job_start")[0]["skipped"] == [5, 7]

    def kill_group(proc, event):
        if event["event"] == "step" and event["step"] == 9:
            os.killpg(proc.pid, signal.SIGKILL)

    spec = make_spec(tmp_path, tiny_model_dir, "text", data, "killed", checkpoint=dict(every_steps=4, keep=2),
                     inject_nonfinite=nan, step_sleep_seconds=0.05)
    spec = dataclasses.replace(spec, eval=eval_suite(source, 40))
    rc, killed = roll_back(spec, kill_group)
    assert rc == -signal.SIGKILL
    rc, resumed = run_worker(dataclasses.replace(spec, rollback={"bad_step": 7, "kind": "nan"}), processes=2)
    assert rc == protocol.EXIT_DONE, log_tail(spec)
    assert of(resumed, "job_start")[0]["resumed_from_step"] == 8

    whole = losses(reference)
    assert sorted(whole) == list(range(8, of(reference, "job_start")[0]["total_steps"] + 1))
    assert {s: whole[s] for s in losses(killed)} == losses(killed)
    assert {s: whole[s] for s in losses(resumed)} == losses(resumed)
    weights = "model.safetensors"
    assert (Path(spec.model_out) / weights).read_bytes() == (Path(plain.model_out) / weights).read_bytes()


def test_nonfinite_at_every_step_fails_every_attempt_even_with_no_checkpoint_to_roll_back_to(
        tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "every",
                     inject_nonfinite={"step": 4, "value": "nan", "every": True})
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_ROLLBACK, log_tail(spec)
    assert of(events, "anomaly")[0]["step"] == 4 and of(events, "checkpoint") == []

    # Nothing before step 4 was saved: checkpoint-4 is derived from the starting model itself.
    rc, events = run_worker(dataclasses.replace(spec, rollback={"bad_step": 4}))
    assert rc == protocol.EXIT_ROLLBACK, log_tail(spec)
    start = of(events, "job_start")[0]
    assert start["resumed_from_step"] == 4 and start["rolled_back_from"] == 0 and start["skipped"] == [1, 4]
    assert of(events, "anomaly")[0]["step"] == 5 and of(events, "step") == []
    marker = checkpoints.read_marker(checkpoints.checkpoint_path(spec.run_dir, 4))
    assert marker["derived_from"] == 0 and marker["skipped"] == [1, 4]
    assert_all_saved_tensors_finite(spec)
    assert not Path(spec.model_out).exists()


def test_with_the_guard_off_a_nonfinite_model_is_still_never_saved(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "unguarded", inject_nonfinite={"step": 12})
    spec = dataclasses.replace(spec, guard={"nonfinite": False})
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_ROLLBACK, log_tail(spec)
    [anomaly] = of(events, "anomaly")
    assert anomaly["step"] == 20 and anomaly["kind"] == "nan" and "checkpoint-20 not written" in anomaly["message"]
    assert of(events, "step")[11]["loss"] is None  # step 12's NaN loss is reported as it is, not hidden
    assert [s for s, _ in checkpoints.complete_checkpoints(spec.run_dir)] == [10]
    assert not checkpoints.checkpoint_path(spec.run_dir, 20).exists()
    assert_all_saved_tensors_finite(spec)


@pytest.mark.parametrize("spikes", [True, False])
def test_a_loss_spike_is_an_anomaly_only_when_spikes_are_guarded(tmp_path, tiny_model_dir, text_data, spikes):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, f"spike-{spikes}",
                     inject_loss_scale={"step": 15, "factor": 100.0})
    spec = dataclasses.replace(spec, guard={"spikes": spikes, "spike_factor": 10.0, "spike_window": 5})
    rc, events = run_worker(spec)
    if not spikes:
        assert rc == protocol.EXIT_DONE, log_tail(spec)
        assert losses(events)[15] > 10 * losses(events)[14]  # the spike was real, and trained through
        return
    assert rc == protocol.EXIT_ROLLBACK, log_tail(spec)
    [anomaly] = of(events, "anomaly")
    assert anomaly["kind"] == "spike" and anomaly["step"] == 15 and anomaly["loss"] > 100
    assert "spike" in anomaly["message"] and 15 not in losses(events)
    assert [s for s, _ in checkpoints.complete_checkpoints(spec.run_dir)] == [10]


def test_cuda_oom_exits_77_and_a_half_batch_retry_resumes_at_the_same_data_position(
        tmp_path, tiny_model_dir, text_data, text_reference):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "oom", cuda_oom_at_step=14, fail_times=1)
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_CUDA_OOM, log_tail(spec)
    [error] = of(events, "error")
    assert error["kind"] == "cuda_oom" and "CUDA out of memory" in error["message"]
    assert checkpoints.newest_complete(spec.run_dir)[0] == 10

    # What the daemon does with training.auto_batch: half the micro-batch, twice the accumulation.
    training = dict(spec.training, batch_size=spec.training["batch_size"] // 2, gradient_accumulation_steps=2)
    rc, second = run_worker(dataclasses.replace(spec, training=training))
    assert rc == protocol.EXIT_DONE, log_tail(spec)
    start = of(second, "job_start")[0]
    reference = losses(text_reference[2])
    assert start["resumed_from_step"] == 10 and start["total_steps"] == max(reference)
    resumed = losses(second)
    assert sorted(resumed) == list(range(11, max(reference) + 1))
    for step, loss in resumed.items():  # the same examples in every step: same losses, up to summation order
        assert loss == pytest.approx(reference[step], abs=1e-5), f"step {step}"


def test_a_gpu_that_does_not_answer_exits_78_with_a_hint(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "gpu",
                     gpu_check_error="CUDA error: unspecified launch failure")
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_GPU_UNAVAILABLE, log_tail(spec)
    [error] = of(events, "error")
    assert error["kind"] == "gpu_unavailable"
    assert error["message"].startswith("GPU unavailable: ") and "unspecified launch failure" in error["message"]
    assert "Hint: " in error["message"]


# --- rollback derive (no torch) ---------------------------------------------------------------


def fake_checkpoint(run_dir: Path, step: int, loss) -> Path:
    d = checkpoints.checkpoint_path(run_dir, step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w" * 100)
    (d / "optimizer.pt").write_bytes(b"o" * 200)
    (d / checkpoints.TRAINER_STATE).write_text(json.dumps({"global_step": step, "epoch": step / 40, "max_steps": 40}))
    checkpoints.write_marker(d, {"step": step, "loss": loss, "loss_step": step})
    return d


def test_derive_links_the_base_checkpoint_and_rewrites_only_the_trainer_state(tmp_path):
    base = fake_checkpoint(tmp_path, 10, 2.5)
    fake_checkpoint(tmp_path, 20, 2.0)
    assert checkpoints.rollback_base(tmp_path, 20)[0] == 10
    assert checkpoints.rollback_base(tmp_path, 21)[0] == 20
    assert checkpoints.rollback_base(tmp_path, 10) is None

    derived = checkpoints.derive(tmp_path, 10, 17)
    assert derived.name == "checkpoint-17" and checkpoints.newest_complete(tmp_path)[0] == 20
    assert checkpoints.is_complete(17, derived)
    for name in ("model.safetensors", "optimizer.pt"):
        assert os.path.samefile(base / name, derived / name)  # linked, not copied
    state = json.loads((derived / checkpoints.TRAINER_STATE).read_text())
    assert state["global_step"] == 17 and state["max_steps"] == 40
    assert json.loads((base / checkpoints.TRAINER_STATE).read_text())["global_step"] == 10  # base untouched
    marker = checkpoints.read_marker(derived)
    assert marker["derived_from"] == 10 and marker["skipped"] == [11, 17] and marker["loss"] == 2.5
    with pytest.raises(FileExistsError):
        checkpoints.derive(tmp_path, 10, 17)

    # From the starting model: populate writes the weights, the trainer state is given.
    from_model = checkpoints.derive(tmp_path, 0, 3, populate=lambda d: (d / "model.safetensors").write_bytes(b"m"),
                                    trainer_state={"train_batch_size": 8})
    assert checkpoints.is_complete(3, from_model)
    assert json.loads((from_model / checkpoints.TRAINER_STATE).read_text()) == {"train_batch_size": 8, "global_step": 3}
    assert checkpoints.read_marker(from_model)["skipped"] == [1, 3]
