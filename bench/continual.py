"""Benchmark: forgetting and learning on a five-file stream, for replay 0, 0.05 and 0.25, full and LoRA; and
what held-out evaluation costs. Side by side in one run, on the tiny model, through the real daemon.

The stream: five disjoint synthetic tasks (prompt -> completion, the loss on the completion): animals and their
sounds, fruits and their colours, countries and their capitals, numbers and their digits, words and their
opposites. Each configuration trains the five files in a fresh workspace (`traind daemon --once`, gate off, so
every file is accepted and joins the suite and the pool), then reads each job's `runs/JOB/eval.json`:

- learning: the mean, over the five files, of the relative fall of the eval loss on the file's own held-out
  lines, from the starting model to the candidate;
- forgetting: the mean, over the first four files, of the relative rise of the final model's loss on that
  file's held-out lines against the loss just after that file was learnt (the matrix's last row against its
  diagonal); and the worst such rise.

Cost, for every configuration: the share of each job's time (its first event to its last) spent evaluating
(the `eval` events' `seconds`), at the defaults of [eval]; and the training tokens/s. `--lines` sets each file's
size: the share falls as files grow, since the suite's size is capped (max_suite_examples) and a file's own
held-out lines are a fixed fraction.

    .venv/bin/python bench/continual.py [--lines 240] [--json]     # about 8 minutes here
    .venv/bin/python bench/continual.py --configs full:0,full:0.25 --lines 120    # a shorter look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, build_tiny_model, new_workspace

TASKS = {
    "animals": ("animal", "sound", {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot"}),
    "fruits": ("fruit", "colour", {"banana": "yellow", "apple": "red", "lime": "green", "plum": "purple"}),
    "countries": ("country", "capital", {"france": "paris", "japan": "tokyo", "peru": "lima", "egypt": "cairo"}),
    "numbers": ("number", "digit", {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}),
    "opposites": ("word", "opposite", {"hot": "cold", "up": "down", "big": "small", "fast": "slow"}),
}
CONFIGS = "full:0,full:0.05,full:0.25,lora:0,lora:0.05,lora:0.25"


def task_lines(task: str, n: int, seed: int) -> str:
    key, value, table = TASKS[task]
    rng = random.Random(seed)
    names = sorted(table)
    rows = ((i, rng.choice(names)) for i in range(n))
    return "".join(json.dumps({"prompt": f"#{i} {key}: {name}\n{value}:", "completion": f" {table[name]}"}) + "\n"
                   for i, name in rows)


def settings(method: str, fraction: float, lora_lr: float) -> dict:
    s = {"training": {"max_seq_length": 32, "batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 2, "seed": 7},
         "checkpoint": {"every_steps": 1000}, "jobs": {"warm_worker": True}, "inbox": {"settle_seconds": 0.0},
         "disk": {"reserve": 0}, "snapshots": {"daily_at": "off", "every_files": 0},
         "eval": {"gate": "off"}, "replay": {"fraction": fraction}}
    if method == "lora":
        s["adapter"] = {"method": "lora", "r": 16, "alpha": 32}  # traind's defaults
        s["training"]["learning_rate"] = lora_lr  # LoRA's usual: a higher rate than a full fine-tune's
    return s


def run_stream(tmp: Path, model: Path, method: str, fraction: float, lines: int, lora_lr: float) -> dict:
    ws = new_workspace(tmp, model, settings(method, fraction, lora_lr))
    for n, task in enumerate(TASKS):
        path = ws.inbox / f"{task}.jsonl"
        path.write_text(task_lines(task, lines, seed=n))
        then = time.time() - 60 + n  # claimed in this order
        os.utime(path, (then, then))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "daemon", "--once", "-w", str(ws.root)], env=env,
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"{method} replay {fraction}: the daemon failed:\n{done.stderr[-3000:]}")
    jobs = sorted(p.name for p in ws.runs.iterdir() if (p / "eval.json").is_file())
    if len(jobs) != len(TASKS):
        raise SystemExit(f"{method} replay {fraction}: {len(jobs)} of {len(TASKS)} files evaluated ({ws.root})")
    evals = [json.loads((ws.run_dir(j) / "eval.json").read_text()) for j in jobs]
    learning = [1 - e["sources"][j]["after"]["loss"] / e["sources"][j]["before"]["loss"] for j, e in zip(jobs, evals)]
    final = evals[-1]["sources"]
    forgetting = [final[j]["after"]["loss"] / e["sources"][j]["after"]["loss"] - 1
                  for j, e in zip(jobs[:-1], evals[:-1])]
    eval_s = job_s = 0.0
    tokens, train_s, replayed = 0, 0.0, 0
    for j in jobs:
        events = [json.loads(line) for line in (ws.run_dir(j) / "metrics.jsonl").open()]
        eval_s += sum(e.get("seconds") or 0.0 for e in events if e["event"] == "eval")
        job_s += events[-1]["time"] - events[0]["time"]
        start = next(e for e in events if e["event"] == "job_start")
        steps = [e for e in events if e["event"] == "step"]
        tokens += steps[-1]["tokens_seen"] - steps[0]["tokens_seen"]
        train_s += steps[-1]["time"] - steps[0]["time"]
        replayed += (start.get("replay") or {}).get("examples", 0)
    return {"method": method, "replay": fraction, "learning": statistics.mean(learning),
            "forgetting": statistics.mean(forgetting), "worst_forgetting": max(forgetting),
            "eval_share": eval_s / job_s, "eval_seconds": eval_s, "tokens_per_s": tokens / train_s,
            "replayed_examples": replayed, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=240, help="lines per file")
    parser.add_argument("--configs", default=CONFIGS, help="method:fraction, comma separated")
    parser.add_argument("--lora-lr", type=float, default=2e-2, help="LoRA's learning rate (full: 5e-3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configs = [(m, float(f)) for m, f in (c.split(":") for c in args.configs.split(","))]
    results = []
    with tempfile.TemporaryDirectory(prefix="traind-bench-continual-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        for method, fraction in configs:
            results.append(run_stream(Path(tmp), model, method, fraction, args.lines, args.lora_lr))
            if not args.json:
                print(f"  {method} replay {fraction:g}: done in {results[-1]['wall_s']:.0f}s", file=sys.stderr)
    if args.json:
        print(json.dumps({"lines_per_file": args.lines, "files": len(TASKS), "results": results}, indent=2))
        return 0
    base = {r["method"]: r for r in results if r["replay"] == 0}
    print(f"five files of {args.lines} lines, one task each; forgetting: the final model's loss on each earlier "
          f"file's held-out lines against just after it was learnt")
    print(f"{'method':6} {'replay':>6} {'learning':>9} {'forgetting':>11} {'worst':>8} {'vs replay 0':>12} "
          f"{'eval share':>11} {'tokens/s':>9} {'replayed':>9}")
    for r in results:
        ref = base.get(r["method"])
        ratio = f"{r['forgetting'] / ref['forgetting']:.2f}x" if ref and ref["forgetting"] > 0 else "-"
        print(f"{r['method']:6} {r['replay']:>6g} {r['learning']:>8.1%} {r['forgetting']:>+10.1%} "
              f"{r['worst_forgetting']:>+7.1%} {ratio:>12} {r['eval_share']:>10.1%} {r['tokens_per_s']:>9,.0f} "
              f"{r['replayed_examples']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
