"""Pause and resume latency of a running worker, through its control channel (stdin), as the daemon sends them.

One worker trains a long tiny-model job; `pause` is sent at a random moment
within a step, held for `--hold` seconds, then `resume`. For each cycle:
- to `paused`: from the pause command to the `paused` event (the worker holds at
  the next step boundary, after that step's log and any save);
- to frozen: from the pause command to the last `step` event before `paused`
  (the step counter's last move; negative when no step ended in between);
- to next step: from the resume command to the next `step` event (one step's
  work plus the wake-up).
Steps are made measurable with the `step_sleep_seconds` test hook (`--step`,
default 0.1 s, standing in for a bigger model's step). Median (and max) of the
cycles; the target is `paused` within one step + 0.5 s.

    .venv/bin/python bench/pause_latency.py [--cycles 20] [--step 0.1] [--hold 0.3] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import build_tiny_model
from worker_driver import Worker, job_spec

from engine.data import demo_data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--step", type=float, default=0.1, help="extra seconds per step (step_sleep_seconds hook)")
    parser.add_argument("--hold", type=float, default=0.3, help="seconds paused in each cycle")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(1)
    cycles: list[dict[str, float]] = []
    step_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_model(tmp / "tiny")
        data = tmp / "data.jsonl"
        demo_data.write_demo_file(data, 20000, "text", seed=3)
        spec = job_spec(tmp, base, data, "pause", training={"max_seq_length": 64, "batch_size": 8},
                        checkpoint={"every_steps": 10**9, "every_minutes": 10**6},
                        test_hooks={"step_sleep_seconds": args.step})
        with Worker(spec, threads=1) as worker:
            events = worker.events()

            def next_of(kind: str, track: list | None = None) -> dict:
                for event in events:
                    if event["event"] == kind:
                        return event
                    if event["event"] == "step" and track is not None:
                        track.append(event)
                raise RuntimeError(f"the worker exited before a {kind} event: see {spec.log_path}")

            previous = next_of("step")
            for _ in range(5):  # the step time, unpaused
                step = next_of("step")
                step_times.append(step["time"] - previous["time"])
                previous = step
            for _ in range(args.cycles):
                time.sleep(rng.uniform(0, args.step))  # the command lands anywhere within a step
                moved: list[dict] = [previous]
                sent = worker.send("pause")
                paused = next_of("paused", moved)
                time.sleep(args.hold)
                resume_sent = worker.send("resume")
                resumed = next_of("resumed")
                previous = next_of("step")
                cycles.append({"to_paused": paused["time"] - sent, "to_frozen": moved[-1]["time"] - sent,
                               "to_resumed": resumed["time"] - resume_sent,
                               "to_next_step": previous["time"] - resume_sent})
            worker.send("stop")
            for _ in events:
                pass
    step_time = statistics.median(step_times)
    result = {"step_s": round(step_time, 4), "cycles": len(cycles)}
    for key in ("to_paused", "to_frozen", "to_resumed", "to_next_step"):
        values = [c[key] for c in cycles]
        result[key] = {"median_s": round(statistics.median(values), 4), "max_s": round(max(values), 4)}
    result["target_s"] = round(step_time + 0.5, 4)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"pause/resume latency over {len(cycles)} cycles (tiny model, CPU; one step = {step_time:.3f} s)")
        for key, label in (("to_paused", "pause -> paused event"), ("to_frozen", "pause -> last step event"),
                           ("to_resumed", "resume -> resumed event"), ("to_next_step", "resume -> next step event")):
            print(f"  {label:<27} median {result[key]['median_s']:.3f} s   max {result[key]['max_s']:.3f} s")
        print(f"  target: paused within one step + 0.5 s = {result['target_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
