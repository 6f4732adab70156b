"""Cost of the NaN/inf guard: the same worker job with `guard.nonfinite` on and off.

The guard adds, per optimizer step, a sum of the micro-batch losses and one
host sync (finite loss and gradient norm?) before `optimizer.step()`; with it
off the Trainer's own per-micro-batch NaN filter is off too (traind always
turns `logging_nan_inf_filter` off, so a NaN is never hidden). Tokens/s is
measured from the worker's step events: tokens seen between the end of the first
optimizer step and the end of the last, over the wall time between them. Cases
alternate; the median of the repeats is reported, and the ratio on/off.

    .venv/bin/python bench/nan_guard.py [--examples 4000] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import build_tiny_model
from worker_driver import Worker, job_spec

from engine.data import demo_data

TRAINING = {"max_seq_length": 128, "batch_size": 8, "seed": 7}
CHECKPOINT = {"every_steps": 10**9, "every_minutes": 10**6}  # checkpoints off: the Trainer's cost, not the guard's


def tokens_per_s(tmp: Path, base: Path, data: Path, name: str, guard: bool) -> float:
    spec = job_spec(tmp, base, data, name, training=TRAINING, checkpoint=CHECKPOINT, guard={"nonfinite": guard})
    with Worker(spec) as worker:
        steps = [e for e in worker.events() if e["event"] == "step"]
    assert worker.returncode == 0, f"worker exited {worker.returncode}: see {spec.log_path}"
    first, last = steps[0], steps[-1]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["time"] - first["time"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_model(tmp / "tiny")
        data = tmp / "data.jsonl"
        demo_data.write_demo_file(data, args.examples, "text", seed=3)
        for i in range(args.repeats):
            for case in (("off", "on") if i % 2 == 0 else ("on", "off")):
                runs[case].append(tokens_per_s(tmp, base, data, f"{case}-{i}", guard=case == "on"))
    result = {name: {"median_tokens_per_s": round(statistics.median(v)), "runs": [round(x) for x in v]}
              for name, v in runs.items()}
    result["ratio"] = round(result["on"]["median_tokens_per_s"] / result["off"]["median_tokens_per_s"], 3)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"tokens/s, median of {args.repeats} (tiny model, CPU)")
        print(f"  guard off:         {result['off']['median_tokens_per_s']:>9,}   {result['off']['runs']}")
        print(f"  guard on:          {result['on']['median_tokens_per_s']:>9,}   {result['on']['runs']}")
        print(f"  ratio on/off:      {result['ratio']:.3f}  (target >= 0.98)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
