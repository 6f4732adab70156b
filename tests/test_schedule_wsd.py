"""training.lr_scheduler = "warmup_stable_decay" on the real worker: the learning rate each step logs follows the
warm-up, the peak and the anneal over the file's last decay_fraction of steps; a stop and a rerun, or a halved
micro-batch (auto_batch), follow the same schedule step for step."""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path

import pytest

from engine.core import config, protocol
from engine.store import checkpoints
from engine.data.demo_data import write_demo_file
from worker_runs import TRAINING, make_spec, of, run_worker

pytestmark = pytest.mark.e2e

PEAK, WARMUP, FRACTION, FLOOR = TRAINING["learning_rate"], 3, 0.25, 0.1
WSD = dict(TRAINING, lr_scheduler="warmup_stable_decay", warmup_steps=WARMUP, decay_fraction=FRACTION,
           min_lr_ratio=FLOOR)


def expected_lr(step: int, total: int) -> float:
    """The rate optimizer step `step` (from 1) is taken with: the chain's warm-up (this job is its first, so it
    starts here) times transformers' WSD anneal with a 1-sqrt decay, evaluated at the steps done before it (as
    the Trainer logs it)."""
    decay = round(total * FRACTION)
    done = step - 1
    warm = (done + 1) / (WARMUP + 1) if done < WARMUP else 1.0
    factor = 1.0 if done < total - decay else 1.0 - math.sqrt((done - total + decay) / decay)
    return PEAK * warm * (FLOOR + (1.0 - FLOOR) * factor)


def wsd_spec(tmp: Path, model: Path, data: Path, name: str, hooks: dict | None = None,
             **training) -> protocol.JobSpec:
    spec = make_spec(tmp, model, "text", data, name, **(hooks or {}))
    return dataclasses.replace(spec, training=dict(WSD, **training))


def rates(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["learning_rate"] for e in of(events, "step")}


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in of(events, "step")}


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    return write_demo_file(tmp_path_factory.mktemp("data") / "text.jsonl", 160, "text", seed=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, small_file):
    spec = wsd_spec(tmp_path_factory.mktemp("wsd"), tiny_model_dir, small_file, "wsd")
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    return spec, events


def test_the_rate_warms_up_holds_the_peak_and_anneals_over_the_last_quarter(uninterrupted):
    spec, events = uninterrupted
    total = of(events, "job_start")[0]["total_steps"]
    decay = round(total * FRACTION)
    assert total >= 12 and decay >= 3, total
    lr = rates(events)
    assert sorted(lr) == list(range(1, total + 1))
    for step, rate in lr.items():
        assert rate == pytest.approx(expected_lr(step, total), rel=1e-9), f"step {step}"

    warm, peak, anneal = range(1, WARMUP + 2), range(WARMUP + 1, total - decay + 2), range(total - decay + 1, total + 1)
    assert lr[1] == pytest.approx(PEAK / (WARMUP + 1)) and all(lr[a] < lr[b] for a, b in zip(warm, warm[1:]))
    assert all(lr[s] == pytest.approx(PEAK) for s in peak)
    assert all(lr[a] > lr[b] for a, b in zip(anneal, anneal[1:])) and lr[total] < 0.4 * PEAK
    assert min(lr.values()) >= FLOOR * PEAK

    # The last step ends the anneal: the final checkpoint's scheduler stands at min_lr_ratio x the peak.
    import torch

    final = checkpoints.newest_complete(spec.run_dir)
    assert final[0] == total
    scheduler = torch.load(final[1] / "scheduler.pt", weights_only=True)
    assert scheduler["_last_lr"] and all(lr == pytest.approx(FLOOR * PEAK) for lr in scheduler["_last_lr"])
    log = Path(spec.log_path).read_text()
    assert (f"learning rate: warmup_stable_decay over {total} steps: the peak, then {decay} annealing (1-sqrt) to "
            f"{FLOOR:g} x the peak; warm-up 0 of {WARMUP} steps done before this file, {WARMUP} in it") in log


def test_a_stop_and_rerun_keep_the_schedule_and_losses_step_for_step(tmp_path, tiny_model_dir, small_file,
                                                                      uninterrupted):
    reference = uninterrupted[1]
    total = of(reference, "job_start")[0]["total_steps"]
    stop_at = total - round(total * FRACTION) - 1  # the checkpoint falls just before the anneal
    spec = wsd_spec(tmp_path, tiny_model_dir, small_file, "resume", hooks={"step_sleep_seconds": 0.05})

    def stop_mid_job(proc, event):
        if event["event"] == "step" and event["step"] == stop_at:
            proc.send_signal(signal.SIGTERM)

    rc, first = run_worker(spec, stop_mid_job)
    assert rc == protocol.EXIT_INTERRUPTED, Path(spec.log_path).read_text()[-3000:]
    end = first[-1]["step"]
    assert stop_at <= end < total
    rc, second = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    assert of(second, "job_start")[0]["resumed_from_step"] == end
    assert sorted(rates(second)) == list(range(end + 1, total + 1))

    for run in (first, second):
        for step, rate in rates(run).items():
            assert rate == rates(reference)[step], f"step {step}"
        for step, loss in losses(run).items():
            assert loss == pytest.approx(losses(reference)[step], abs=1e-5), f"step {step}"


def test_after_a_rollback_the_schedule_goes_on_from_the_step_and_still_anneals(tmp_path, tiny_model_dir, small_file,
                                                                              uninterrupted):
    """A NaN at step 9 rolls back to checkpoint-5 and skips steps 6..9: the skipped steps count as taken for the
    schedule too, so steps 10.. run at the uninterrupted run's rates, anneal included."""
    reference = uninterrupted[1]
    spec = wsd_spec(tmp_path, tiny_model_dir, small_file, "rollback", hooks={"inject_nonfinite": {"step": 9}})
    spec = dataclasses.replace(spec, checkpoint=dict(every_steps=5, keep=2))
    rc, first = run_worker(spec)
    assert rc == protocol.EXIT_ROLLBACK, Path(spec.log_path).read_text()[-3000:]
    assert of(first, "anomaly")[0]["step"] == 9
    rc, second = run_worker(dataclasses.replace(spec, rollback={"bad_step": 9, "kind": "nan"}))
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    start = of(second, "job_start")[0]
    assert start["rolled_back_from"] == 5 and start["skipped"] == [6, 9]
    total = start["total_steps"]
    assert rates(second) == {step: rates(reference)[step] for step in range(10, total + 1)}
    assert rates(second)[total] < 0.4 * PEAK


def test_a_halved_micro_batch_keeps_the_steps_and_the_schedule(tmp_path, tiny_model_dir, small_file, uninterrupted):
    """auto_batch after a CUDA OOM: half batch_size, twice the accumulation; the same steps, the same rates."""
    reference = uninterrupted[1]
    spec = wsd_spec(tmp_path, tiny_model_dir, small_file, "halved", batch_size=TRAINING["batch_size"] // 2,
                    gradient_accumulation_steps=2)
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    assert of(events, "job_start")[0]["total_steps"] == of(reference, "job_start")[0]["total_steps"]
    assert rates(events) == rates(reference)


# --- traind.toml: the new keys (no worker) ---------------------------------------------------


def test_the_schedule_keys_are_read_and_their_defaults_are_documented(tmp_path):
    path = tmp_path / "traind.toml"
    path.write_text('[training]\nlr_scheduler = "warmup_stable_decay"\ndecay_fraction = 1\nmin_lr_ratio = 0\n')
    t = config.load(path).training
    assert (t.lr_scheduler, t.decay_fraction, t.min_lr_ratio) == ("warmup_stable_decay", 1.0, 0.0)
    d = config.TrainingConfig()
    assert (d.decay_fraction, d.min_lr_ratio) == (0.1, 0.0)
    template = config.render_template()
    assert "warmup_stable_decay only" in template and "Expected: a number > 0.0 <= 1.0. Default: 0.1" in template
    assert "Expected: a number >= 0.0 < 1.0. Default: 0.0" in template


@pytest.mark.parametrize("body, expected", [
    ("decay_fraction = 0", "training.decay_fraction = 0: expected a number > 0.0 <= 1.0"),
    ("decay_fraction = 1.5", "training.decay_fraction = 1.5: expected a number > 0.0 <= 1.0"),
    ("min_lr_ratio = 1", "training.min_lr_ratio = 1: expected a number >= 0.0 < 1.0"),
    ("min_lr_ratio = -0.1", "training.min_lr_ratio = -0.1: expected a number >= 0.0 < 1.0"),
    ('min_lr_ratio = "low"', "training.min_lr_ratio = 'low': expected a number >= 0.0 < 1.0"),
    ('lr_scheduler = "wsd"', "training.lr_scheduler = 'wsd': expected one of 'constant', 'constant_with_warmup', "
                             "'linear', 'cosine', 'warmup_stable_decay'"),
])
def test_bad_schedule_values_are_named(tmp_path, body, expected):
    path = tmp_path / "traind.toml"
    path.write_text(f"[training]\n{body}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_every_file_anneals_over_its_share_of_steps_at_least_one():
    from engine.worker.lr_schedule import decay_steps

    assert decay_steps(100, 0.1) == 10
    assert decay_steps(12, 0.25) == 3
    assert decay_steps(1, 0.1) == 1  # at least one step anneals
    assert decay_steps(20, 1.0) == 20
