"""A scripted stand-in for engine.worker: the same protocol, no torch, instant.

Supervisor tests run the daemon with the test switch worker_module = "fake_worker"
(engine/core/testing.py). The job spec's test_hooks["fake"] scripts it:
  steps (int, default 20)        steps in the job
  step_seconds (float)           time per step
  checkpoint_every (int)         write a (marked) checkpoint every N steps
  exit_code (int)                exit with this code after `fail_after` steps
  fail_after (int)               default 0
  fail_attempts (int)            only the first N attempts exit or kill themselves; later ones succeed
  kill_self (str)                a signal name to send itself after `fail_after` steps
  error (str), error_kind (str)  an `error` event before failing
  ignore_term (bool)             ignore SIGTERM (a worker that will not stop)
  allocate_mb (int)              allocate this much after `fail_after` steps (for the OOM killer)
  anomaly_at (int)               report a NaN at this step and exit 76 (a rollback skips past it)
  anomaly_every (bool)           report a NaN at the first step of every attempt
  eval_after ({source: loss})    the candidate's eval loss on these sources (default 1.9 on every source,
                                 from 2.0 before: a model the gate passes)
  holdout (bool, default true)   leave a held-out line in RUN_DIR/holdout.jsonl, as a real job does
  need_free_bytes (int)          a checkpoint waits until this much is free on the run's filesystem, as the
                                 real worker's disk gate does: `blocked`, then `unblocked` (a stop gives it up)
The data file is read as the real worker reads it (reading.records: blank lines and the spec's skip_lines
passed over); a line that does not parse fails the attempt with a `data` error, as tokenizing it would.
Control requests on stdin (pause, resume, checkpoint, stop) are honoured at step
boundaries, as the real worker does (a pause and a resume within one step hold
nothing). Each attempt appends a line to RUN_DIR/fake_attempts.log: the step it
resumed from and its micro-batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import orjson

from engine.core import protocol, reading
from engine.store import checkpoints
from engine.core.atomic import write_json_atomic


class Control:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.pending: list[str] = []

    def read(self) -> None:
        for line in sys.stdin:
            try:
                cmd = json.loads(line)["cmd"]
            except (ValueError, KeyError, TypeError):
                continue
            with self.lock:
                self.pending.append(cmd)
                self.lock.notify_all()
        with self.lock:
            self.pending.append("stop")
            self.lock.notify_all()

    def pending_stop(self) -> bool:
        with self.lock:
            return "stop" in self.pending

    def take(self, wait: bool = False) -> list[str]:
        """Every request that came since the last take (waiting up to 0.1 s for one when `wait`)."""
        with self.lock:
            if wait:
                self.lock.wait_for(lambda: self.pending, timeout=0.1)
            taken, self.pending = self.pending, []
            return taken


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events-fd", type=int, required=True)
    args = parser.parse_args()
    out = os.fdopen(args.events_fd, "wb", buffering=0)

    def emit(event: str, /, **fields) -> None:
        out.write(protocol.encode_event(protocol.make_event(event, **fields)))

    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    emit("ready", pid=os.getpid())
    line = sys.stdin.readline()
    if not line:
        return protocol.EXIT_INTERRUPTED
    spec = protocol.JobSpec.from_json(line)
    log_fd = os.open(spec.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    control = Control()
    threading.Thread(target=control.read, daemon=True).start()
    script = spec.test_hooks.get("fake", {})
    if script.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_dir = Path(spec.run_dir)
    steps = script.get("steps", 20)
    every = script.get("checkpoint_every", 5)
    newest = checkpoints.newest_complete(run_dir)
    start = newest[0] if newest else 0
    extra = {}
    if spec.rollback:
        bad = spec.rollback["bad_step"]
        extra = {"rolled_back_from": start, "skipped": [start + 1, bad]}
        start = bad
    with open(run_dir / "fake_attempts.log", "a") as f:
        f.write(f"{start} {spec.training['batch_size']}\n")
    attempt = len((run_dir / "fake_attempts.log").read_text().splitlines())
    fails = attempt <= script.get("fail_attempts", attempt)
    print(f"traind-worker: fake worker for {spec.job_id} (PID {os.getpid()}), resuming from {start}", flush=True)
    with reading.open_jsonl(spec.data_file) as f:
        for n, raw in reading.records(f, frozenset(spec.skip_lines)):
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                emit("error", message=f"line {n}: not valid JSON: {e}", kind="data")
                return protocol.EXIT_FAILED
    emit("job_start", job_id=spec.job_id, total_steps=steps, resumed_from_step=start, examples=steps, **extra)

    def free() -> int:
        st = os.statvfs(run_dir)
        return st.f_bavail * st.f_frsize

    def room_for(what: str) -> bool:
        """The disk gate: True once the write fits, False if a stop comes first (nothing else is heard)."""
        need = script.get("need_free_bytes", 0)
        if free() >= need:
            return True
        if stop["requested"]:
            return False
        emit("blocked", reason=f"disk: need {need} B free on {run_dir}, have {free()} B", path=str(run_dir),
             need_bytes=need, free_bytes=free(), what=what)
        while free() < need:
            if stop["requested"] or control.pending_stop():
                return False
            time.sleep(0.05)
        emit("unblocked", path=str(run_dir), free_bytes=free())
        return True

    def save(step: int) -> None:
        if not room_for(f"checkpoint-{step}"):
            return
        ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "weights.bin").write_bytes(b"w" * 16)
        checkpoints.write_marker(ckpt, {"step": step, "loss": 2.0 / step})
        emit("checkpoint", step=step, path=str(ckpt))

    wanted = held = False  # paused: as asked, and as done
    for step in range(start + 1, steps + 1):
        time.sleep(script.get("step_seconds", 0.0))
        if step == script.get("anomaly_at") or (script.get("anomaly_every") and step == start + 1):
            emit("anomaly", step=step, kind="nan", loss=None, grad_norm=None, message="loss nan")
            return protocol.EXIT_ROLLBACK
        emit("step", step=step, total_steps=steps, epoch=step / steps, loss=2.0 / step, learning_rate=1e-3,
             grad_norm=1.0, tokens_per_s=1000.0)
        if step - start >= script.get("fail_after", 0) and "allocate_mb" in script:
            hog = b"x" * (script["allocate_mb"] << 20)  # touched pages: the OOM killer's business
            print(f"traind-worker: fake worker holds {len(hog) >> 20} MiB", flush=True)
        if fails and step - start >= script.get("fail_after", 0) and ("exit_code" in script or "kill_self" in script):
            if "error" in script:
                emit("error", message=script["error"], kind=script.get("error_kind"))
            print("traind-worker: fake worker failing on purpose", flush=True)
            if "kill_self" in script:
                os.kill(os.getpid(), getattr(signal, script["kill_self"]))
            return script["exit_code"]
        while True:  # the step boundary: pause is a wanted state, as the real worker's flag
            for cmd in control.take(wait=held):
                if cmd in ("pause", "resume"):
                    wanted = cmd == "pause"
                elif cmd == "checkpoint":
                    save(step)
                elif cmd == "stop":
                    stop["requested"] = True
            if stop["requested"]:
                break
            if wanted != held:
                held = wanted
                emit("paused" if held else "resumed", step=step)
            if not held:
                break
        if step % every == 0 or stop["requested"]:
            save(step)
        if stop["requested"]:
            emit("job_end", outcome="interrupted", step=step)
            return protocol.EXIT_INTERRUPTED
    model_out = Path(spec.model_out)
    model_out.mkdir(parents=True, exist_ok=True)
    (model_out / "config.json").write_text(json.dumps({"fake": True}))
    marker = {"job_id": spec.job_id, "step": steps, "chain_steps": spec.chain_steps + steps}
    if spec.eval is not None:  # figures as a real worker's evaluation gives them: by default, better everywhere
        after = script.get("eval_after", {})
        names = [s["name"] for s in spec.eval["sources"]] + [spec.job_id]
        marker["eval"] = {"step": steps, "own": spec.job_id, "sources": {
            name: {"before": {"loss": 2.0, "lines": 8}, "after": {"loss": after.get(name, 1.9), "lines": 8}}
            for name in names}}
        if script.get("holdout", True):
            (run_dir / "holdout.jsonl").write_text(json.dumps({"text": f"held out of {spec.job_id}"}) + "\n")
    write_json_atomic(model_out / protocol.MODEL_MARKER, marker)
    emit("job_end", outcome="done", step=steps)
    return protocol.EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
