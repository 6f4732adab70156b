"""What an ended attempt means, and what becomes of its job.

`classify` reads how an attempt ended (its exit code or signal, the worker's
last events, whether it wrote a new complete checkpoint, what the daemon or a
user asked for) and names the outcome recorded in the job's attempt: done,
skipped, changed, interrupted, stopped, rollback, OOM-killed, oom (retried with
a smaller micro-batch), model_unavailable or failed. Attempts count failures,
not interruptions: an attempt that saved progress first does not count.

The other functions end a job or plan its next attempt: publish its model
(`finish_done`), fail it with its reason, skip it, give it up, or record a
rollback after an anomaly. Each writes the job's record before its file moves
(engine/store/jobs.py) and says what it did through a Reporter. None of them
touches the supervisor's state, starts or signals a worker: they return what
happened, and the daemon applies it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from engine.core import atomic, protocol, resources
from engine.core.config import Config
from engine.quality import gate, replay
from engine.store import checkpoints, jobs, models, statefiles
from engine.store.eventlog import Reporter
from engine.store.workspace import Workspace
from engine.supervisor.attempt import Attempt

LOG_TAIL_LINES = 30  # worker.log lines kept in a failed file's reason


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, window: int = 64 * 1024) -> list[str]:
    return atomic.read_tail(path, window).decode("utf-8", "replace").splitlines()[-lines:]


@dataclass
class Ended:
    """How an attempt ended: the outcome recorded in its job, the details beside it, and what holds the next
    attempt back if the cause is the machine's rather than the job's (a GPU or the model unavailable)."""
    outcome: str
    details: dict[str, Any]
    blocked: str | None = None


def training_settings(config: Config, job: jobs.Job) -> dict[str, Any]:
    """[training] as the job's next attempt uses it: a smaller micro-batch after a CUDA OOM."""
    training = config.to_dict()["training"]
    training.update(job.record.get("batch") or {})
    return training


def classify(ws: Workspace, config: Config, job: jobs.Job, attempt: Attempt, oom: resources.OomCounter,
             stopping: bool, report: Reporter, model_recheck_seconds: float) -> Ended:
    """The outcome of an ended attempt and the details recorded with it; a failure is alerted here."""
    code = attempt.exit_code
    killed_by_oom = oom.killed_by_oom() if code == -signal.SIGKILL else None
    newest = checkpoints.newest_complete(job.run_dir)
    before = job.record["attempts"][-1].get("checkpoint_at_start")
    progress = newest is not None and (before is None or newest[0] > before)  # a new complete checkpoint
    details: dict[str, Any] = {"exit": attempt.exit_text(killed_by_oom), "exit_code": code if code >= 0 else None,
                               "signal": signal.Signals(-code).name if code < 0 else None, "step": attempt.step,
                               "progress": progress}
    if code == protocol.EXIT_DONE and models.is_complete(models.partial_dir(ws, job.id)):
        return Ended("done", details)
    if attempt.skip_requested:
        return Ended("skipped", details)
    if attempt.file_changed:
        return Ended("changed", {**details, "changed": attempt.file_changed})
    if stopping:  # asked to stop: whatever the exit, not the job's fault
        return Ended("interrupted", details)
    if attempt.stop_requested:
        return Ended("stopped", details)
    if code == protocol.EXIT_ROLLBACK and attempt.anomaly:
        return Ended("rollback", {**details, "anomaly": attempt.anomaly})
    error = attempt.error or {}
    details.update(error=error.get("message"), log_tail=log_tail(job.run_dir / "worker.log"))
    if killed_by_oom:
        details["error"] = "killed by the OOM killer: the machine ran out of memory"
        kills = job.failures(jobs.OOM_KILLED) + (0 if progress else 1)
        report.alert("attempt_failed", f"{job.name}: attempt {len(job.record['attempts'])} killed by the OOM "
                     f"killer ({kills}/{config.jobs.max_oom_kills} in a row without progress)", job_id=job.id)
        return Ended(jobs.OOM_KILLED, details)
    if code == protocol.EXIT_INTERRUPTED or (code < 0 and progress):
        # Stopped from outside (a signal not sent by this daemon) after it made progress: an interruption.
        report.emit("job_interrupted", f"{job.name}: attempt {len(job.record['attempts'])} ended "
                    f"({details['exit']}) after saving progress; resuming from its checkpoint", "warning",
                    job_id=job.id)
        return Ended("interrupted", details)
    if code == protocol.EXIT_CUDA_OOM and config.training.auto_batch:
        training = training_settings(config, job)
        if training["batch_size"] > 1:
            smaller = {"batch_size": training["batch_size"] // 2,
                       "gradient_accumulation_steps": training["gradient_accumulation_steps"] * 2}
            job.save(batch=smaller)
            report.alert("cuda_oom", f"{job.name}: CUDA out of memory at step {attempt.step}; retrying with "
                         f"micro-batch {smaller['batch_size']} x {smaller['gradient_accumulation_steps']} "
                         "accumulation (same effective batch)", "warning", job_id=job.id)
            return Ended("oom", details)
    blocked = None
    if code == protocol.EXIT_GPU_UNAVAILABLE:
        blocked = error.get("message") or "GPU unavailable"
    if code == protocol.EXIT_MODEL_UNAVAILABLE:  # not the file's fault: it waits at the head of the queue
        blocked = error.get("message") or "model unavailable"
        report.alert("model_unavailable", f"{job.name}: {blocked}; the file waits in queue/active/ (no failed "
                     f"attempt counted), the model is looked at again every {model_recheck_seconds:g}s",
                     "warning", job_id=job.id)
        return Ended("model_unavailable", details, blocked)
    failures = 0 if progress else job.failures() + 1
    detail = f": {details['error']}" if details.get("error") else ""
    count = (f"failure {failures}/{config.jobs.max_attempts} in a row without progress" if failures
             else "it saved progress first, so it does not count")
    report.alert("attempt_failed", f"{job.name}: attempt {len(job.record['attempts'])} failed "
                 f"({details['exit']}{detail}); {count}", job_id=job.id)
    return Ended(jobs.FAILED, details, blocked)


def plan_rollback(config: Config, job: jobs.Job, anomaly: dict[str, Any], report: Reporter) -> bool:
    """After an anomaly: roll back and go on (True), or give the file up (False)."""
    what = {"nan": "NaN loss or gradient", "inf": "infinite loss or gradient", "spike": "loss spike"}.get(anomaly.get("kind"), "anomaly")
    step = anomaly.get("step")
    rollbacks = job.record.setdefault("rollbacks", [])
    rollbacks.append({"step": step, "kind": anomaly.get("kind"), "message": anomaly.get("message"), "time": time.time()})
    limit = config.guard.max_rollbacks
    if len(rollbacks) > limit:
        job.save()
        dst = job.finish("failed", {"reason": f"{what} at step {step} after {limit} rollbacks", "rollbacks": rollbacks})
        report.alert("job_failed", f"{job.record['original_name']}: {what} at step {step} again after {limit} "
                     f"rollbacks; moved to queue/failed/{dst.name}; the model stays at the last good state",
                     job_id=job.id)
        return False
    job.save(pending_rollback={"bad_step": step, "kind": anomaly.get("kind")})
    base = checkpoints.newest_complete(job.run_dir)
    origin = f"the checkpoint at step {base[0]}" if base and base[0] < step else "the job's starting model"
    report.alert("rollback", f"{job.name}: {what} at step {step}: rolling back to {origin} and skipping the "
                 f"batches through step {step} (rollback {len(rollbacks)} of {limit})", "warning", job_id=job.id,
                 step=step)
    return True


def skip(job: jobs.Job, step: int | None, report: Reporter) -> None:
    dst = job.finish("failed", {"reason": "skipped by user", "step": step})
    report.emit("job_skipped", f"{job.record['original_name']}: skipped by user; moved to queue/failed/{dst.name}",
                "warning", job_id=job.id)


def given_up(config: Config, job: jobs.Job) -> str | None:
    """Why the job gets no further attempt, if it does not."""
    c = config.jobs
    if (n := job.failures()) >= c.max_attempts:
        return f"{n} failed attempt(s) in a row without progress"
    if (n := job.failures(jobs.OOM_KILLED)) >= c.max_oom_kills:
        return f"killed by the OOM killer {n} time(s) in a row without progress"
    return None


def fail(job: jobs.Job, why: str, report: Reporter) -> None:
    last = job.record["attempts"][-1] if job.record["attempts"] else {}
    reason = {"reason": f"{why}; last: {last.get('exit', 'unknown')}",
              "exit_code": last.get("exit_code"), "signal": last.get("signal"),
              "error": last.get("error"), "log_tail": last.get("log_tail", [])}
    dst = job.finish("failed", reason)
    report.alert("job_failed", f"{job.record['original_name']}: {why} ({last.get('exit')}); moved to "
                 f"queue/failed/{dst.name}", job_id=job.id)


def fail_changed(job: jobs.Job, why: str, report: Reporter) -> None:
    """The file is not what was claimed: nothing trained on it is published, and it is kept as it is now."""
    dst = job.finish("failed", {"reason": f"changed while training: {why}"})
    where = f"moved to queue/failed/{dst.name}" if why != "removed" else f"its reason is in queue/failed/{dst.name}.reason.json"
    report.alert("file_changed", f"{job.record['original_name']}: changed while training ({why}); nothing "
                 f"trained on it is published; {where}", job_id=job.id)


def trained_rates(job: jobs.Job) -> str:
    """What the job's steps were trained at (from its metrics.jsonl): the cause of a candidate that did not
    change is there, a learning rate of 0 or too small to move the eval loss."""
    rates = []
    try:
        with open(job.run_dir / "metrics.jsonl", "rb") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == "step" and event.get("learning_rate") is not None:
                    rates.append(event["learning_rate"])
    except OSError:
        return "its steps' learning rates are not known (no runs/JOB/metrics.jsonl)"
    if not rates:
        return "it took no optimizer step"
    if max(rates) == 0:
        return f"every one of its {len(rates)} logged steps trained at learning rate 0"
    return (f"its {len(rates)} logged steps trained at learning rates {min(rates):.3g} to {max(rates):.3g} (a rate "
            "too small for the model, or examples with nothing to train, leave it unchanged)")


def finish_done(ws: Workspace, config: Config, job: jobs.Job, loss: float | None, report: Reporter) -> str:
    """Publish a trained job's model; what became of the job: "done" (its model is current), "held" (by the
    gate: kept, not current) or "changed" (its file changed since the claim: nothing published). The caller
    announces a "done" (`announce_done`) once what announces it, status.json, shows the new model."""
    if (why := jobs.changed_since_claim(job)) is not None:
        fail_changed(job, why, report)
        return "changed"
    if config.snapshots.include_optimizer:
        keep_optimizer_state(job, models.partial_dir(ws, job.id))
    mode = config.eval.gate
    verdict = gate.judge(models.saved_marker(ws, job.id).get("eval"), config.eval) if mode != "off" else None
    held = verdict is not None and not verdict.ok and mode == "hold"
    if verdict is not None and verdict.unchanged:
        verdict.problems.append(trained_rates(job))
    models.publish(ws, job.id, make_current=not held, file=job.record["original_name"], loss=loss)
    if held:
        dst = job.finish("held", {"reason": verdict.reason, "worst": verdict.worst, "version": f"models/{job.id}"})
    else:
        job.finish("done")
        replay.add(ws, config, job.id)
    # Its resume points and token cache served their purpose: the model is saved.
    for product in (checkpoints.checkpoints_dir(job.run_dir), job.run_dir / "data"):
        shutil.rmtree(product, ignore_errors=True)
    name = job.record["original_name"]
    if held:
        report.alert("job_held", f"{name}: held by the quality gate ({verdict.reason}); its model is "
                     f"models/{job.id}, not current; the file is in queue/{dst.parent.name}/{dst.name} ('traind "
                     f"promote {job.id}' accepts it, 'traind requeue {job.id}' trains it again)", "warning",
                     job_id=job.id)
        return "held"
    if verdict is not None and not verdict.ok:
        report.alert("quality_warning", f"{name}: {verdict.reason} (eval.gate = warn: made current anyway)",
                     "warning", job_id=job.id)
    return "done"


def announce_done(job: jobs.Job, report: Reporter) -> None:
    report.emit("job_done", f"{job.record['original_name']}: trained; models/{job.id} is now the current model",
                job_id=job.id)


def keep_optimizer_state(job: jobs.Job, model_dir: Path) -> None:
    """Link the job's final optimizer and scheduler state into its model version (snapshots.include_optimizer)."""
    newest = checkpoints.newest_complete(job.run_dir)
    if newest is None:
        return
    for name in ("optimizer.pt", "scheduler.pt"):
        src, dst = newest[1] / name, model_dir / name
        if src.exists() and not dst.exists():
            os.link(src, dst)


def once_result(ws: Workspace, since: float, code: int) -> int:
    """`traind daemon --once`: one summary line of the files that ended since `since`, and the exit code: 1 when
    any failed or was rejected (the run did not do all it was given), else the daemon's own."""
    ended: dict[str, int] = {}
    for run in ws.runs.iterdir():
        record = statefiles.read_or_none(run / "job.json", statefiles.JOB)
        if record and record["state"] in jobs.FINAL_STATES and record.get("updated_at", 0) >= since:
            ended[record["state"]] = ended.get(record["state"], 0) + 1
    total = sum(ended.values())
    told = ", ".join(f"{ended[s]} {s}" for s in jobs.FINAL_STATES if ended.get(s)) or "nothing to do"
    bad = [f"queue/{s}/" for s in ("failed", "rejected") if ended.get(s)]
    print(f"traind daemon --once: {total} file{'s' if total != 1 else ''}: {told}"
          + (f" (reasons beside the files in {' and '.join(bad)})" if bad else ""), file=sys.stderr, flush=True)
    return 1 if bad and code == 0 else code
