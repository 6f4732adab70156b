"""Supervisor overhead: the same tiny-model job through `traind daemon --once` and through a bare Trainer script.

Both train the same tiny model on the same file, tokenized by the same code,
with the same hyper-parameters; traind adds its callbacks (an event per step,
the checkpoint clock, the stop check, the guards), the events socket and the
daemon. Tokens/s is measured the same way in both: tokens seen between the end
of the first optimizer step and the end of the last, over the wall time between
them (start-up and saving excluded). Checkpoints are off in both (every_steps
above the job's length): their cost is the Trainer's own, not the supervisor's.

The bare script runs twice a repeat: logging at traind's cadence
(`training.log_every_steps`, 1: the Trainer's own log and its printed line every
step), which is the same Trainer setup and the target's baseline, and at the
Trainer's default (every 500 steps), to show what logging every step costs. The
three cases rotate, each going first in turn; the ratio is the median over the
repeats of traind / the same-setup script in that repeat (a slow spell of the
shared machine then weighs on both sides of a ratio), and the tokens/s are the
medians of the runs.

Both sides pad each micro-batch to its longest example (training.packing off);
with `--packing` both pack instead: traind with training.packing on, the script
with the same row plan and collator (engine/worker/packing.py), so the figure is
still the supervisor's cost alone.

`--batch-size` sets the micro-batch of both (default 8): traind's cost is mostly
a fixed one per optimizer step, so the ratio depends on how long a step takes.

    .venv/bin/python bench/supervisor_overhead.py [--examples 4000] [--repeats 3] [--packing] [--batch-size 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, build_tiny_model, new_workspace

from engine.data import demo_data

TRAINING = {"max_seq_length": 128, "batch_size": 8, "seed": 7, "log_every_steps": 1}


def through_traind(base: Path, data: Path, tmp: Path, training: dict) -> float:
    ws = new_workspace(tmp, base, {"training": training, "checkpoint": {"every_steps": 10**9, "every_minutes": 10**6},
                                   "jobs": {"warm_worker": False}})
    (ws.inbox / "data.jsonl").write_bytes(data.read_bytes())
    subprocess.run([sys.executable, "-m", "engine.cli", "daemon", "--once", "-w", str(ws.root)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    [run] = list(ws.runs.iterdir())
    steps = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "step"]
    first, last = steps[0], steps[-1]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["time"] - first["time"])


BARE = r'''
import json, sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from engine.core.config import TrainingConfig
from engine.worker import data, packing
from engine.worker.train import resolve_precision

base, data_file, out, cfg = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(base)
data.build_cache(data_file, "text", tokenizer, cfg["max_seq_length"], out / "data", log=lambda m: None)
dataset = data.TokenDataset(out / "data")
collator = data.Collator(tokenizer.pad_token_id)
if cfg["packing"]:  # traind's rows and collator; pad_token_id never occurs in text, so tokens seen are real ones
    dataset = packing.row_plan(dataset, out / "data", cfg["max_seq_length"], cfg["seed"], log=lambda m: None)
    collator = packing.PackedCollator(tokenizer.pad_token_id)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
marks = []

class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        marks.append((time.time(), state.num_input_tokens_seen))

t = TrainingConfig()  # traind's defaults for all the bench does not set (the optimizer matters most)
args = TrainingArguments(output_dir=str(out / "ckpt"), per_device_train_batch_size=cfg["batch_size"],
                         optim=t.optim, max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
                         learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
                         num_train_epochs=1, seed=cfg["seed"], use_cpu=not torch.cuda.is_available(),
                         bf16=resolve_precision("auto") == "bf16", save_strategy="no", report_to="none",
                         include_num_input_tokens_seen="non_padding", remove_unused_columns=False, disable_tqdm=True,
                         **({"logging_steps": cfg["log_every_steps"], "logging_first_step": True, "log_level": "warning"}
                            if cfg["logged"] else {}))
Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
        processing_class=tokenizer, callbacks=[Clock()]).train()
(t0, s0), (t1, s1) = marks[0], marks[-1]
print(json.dumps({"tokens_per_s": (s1 - s0) / (t1 - t0)}))
'''


def bare(base: Path, data: Path, tmp: Path, training: dict, logged: bool) -> float:
    out = Path(tempfile.mkdtemp(dir=tmp))
    cfg = json.dumps({**training, "logged": logged})
    result = subprocess.run([sys.executable, "-c", BARE, str(base), str(data), str(out), cfg],
                            check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


CASES = {"bare": lambda *a: bare(*a, logged=True), "bare_default_logging": lambda *a: bare(*a, logged=False),
         "traind": through_traind}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--packing", action="store_true", help="both sides pack examples into rows")
    parser.add_argument("--batch-size", type=int, default=TRAINING["batch_size"], help="micro-batch, both sides")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    training = {**TRAINING, "packing": args.packing, "batch_size": args.batch_size}
    names = list(CASES)
    runs: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_model(tmp / "tiny")
        data = tmp / "data.jsonl"
        demo_data.write_demo_file(data, args.examples, "text", seed=3)
        for repeat in range(args.repeats):  # each case goes first in turn: a run's place in the round tells
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                runs[name].append(CASES[name](base, data, tmp, training))
    result = {name: {"median_tokens_per_s": round(statistics.median(v)), "runs": [round(x) for x in v]}
              for name, v in runs.items()}
    result["packing"], result["batch_size"] = args.packing, args.batch_size
    for key, baseline in (("ratio", "bare"), ("ratio_to_default_logging", "bare_default_logging")):
        result[key] = round(statistics.median(t / b for t, b in zip(runs["traind"], runs[baseline])), 3)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"tokens/s, median of {args.repeats} (tiny model, {'packed rows' if args.packing else 'padded'}, "
              f"micro-batch {args.batch_size})")
        rows = (("bare Trainer, logging every step", "bare"),
                ("bare Trainer, default logging", "bare_default_logging"), ("traind daemon --once", "traind"))
        for label, name in rows:
            print(f"  {label:<34} {result[name]['median_tokens_per_s']:>9,}   {result[name]['runs']}")
        print(f"  traind / the same setup:           {result['ratio']:.3f}  (median of the repeats' ratios; "
              f"target >= 0.98)")
        print(f"  traind / default logging:          {result['ratio_to_default_logging']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
