"""Measure one model version on the eval suite, for `traind eval`.

    python -m engine.worker.evaluate < SPEC.json

Run by engine/tools/evaluate.py, which never imports torch: it resolves the target,
names the suite's sources (engine/quality/suite.py) and hands this process a spec on
stdin: `model` (the folder or hub id to load), `adapter` (the version's marker
entry, its base pinned, or null for a whole model), `training` (traind.toml's
[training]), `sources`, `batch_size` (the eval micro-batch) and `tmp` (a folder
of its own, outside the queue, that the caller removes).

The figures are the training worker's: the same TrainingArguments
(train.training_arguments: precision, eval micro-batch), the same collator and
the same `evaluation.Suite` (tokenizing, then the Trainer's own `evaluate`). An
adapter loads as a job loads it (engine/worker/adapters.py: the base in the
compute dtype, the adapter's trainable weights in fp32); a whole model with
AutoModelForCausalLM in fp32, the master weights' dtype.

Progress lines on stdout start with `traind-worker: `; the result goes to
`tmp/result.json`; a failure is one line `error: ...` and exit 1. It writes
only into `tmp`, never trains, and dies with its parent.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

RESULT = "result.json"
PROGRESS = "traind-worker: "


def log(message: str) -> None:
    print(f"{PROGRESS}{message}", flush=True)


def load_model(spec: dict[str, Any], precision: str, attn_implementation: str):
    import torch
    from transformers import AutoModelForCausalLM

    from engine.worker import adapters

    if spec["adapter"]:
        record = spec["adapter"]
        base = adapters.load_base(record, precision, attn_implementation=attn_implementation)
        # As a job loads it (dropout is off in evaluation anyway), so the figures are the ones it measured.
        return adapters.with_adapter(base, {**record, "adapter_in": spec["model"], "dropout": 0.0}, seed=0)
    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32,
                                                attn_implementation=attn_implementation)


def evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer, Trainer
    from transformers.utils import logging

    from engine.core.config import CheckpointConfig, TrainingConfig
    from engine.worker import data, evaluation, train
    from engine.worker.events import EventSink

    logging.disable_progress_bar()
    t = TrainingConfig(**spec["training"])
    tmp = Path(spec["tmp"])
    precision = train.resolve_precision(t.precision)
    attn_implementation = train.resolve_attn_implementation(t.attn_implementation, precision)
    args = train.training_arguments(tmp, t, CheckpointConfig(), precision, spec["batch_size"], bool(spec["adapter"]))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log(f"tokenizing {len(spec['sources'])} sources")
    suite = evaluation.Suite({"sources": spec["sources"]}, None, tokenizer, t.max_seq_length, tmp,
                             lambda message: log(message.removeprefix("eval: ")))
    log(f"loading {spec['model']}" + (f" on its base {spec['adapter']['base']['path']}" if spec["adapter"] else "")
        + f" ({precision}, {args.device})")
    model = load_model(spec, precision, attn_implementation)
    trainer = Trainer(model=model, args=args, data_collator=data.Collator(tokenizer.pad_token_id),
                      processing_class=tokenizer)
    figures = {}
    for name in suite.datasets:
        log(f"measuring {name} ({suite.lines[name]} lines, {suite.tokens[name]} tokens)")
        figures.update(suite.measure(trainer, [name], "eval", EventSink(None), rank0=False))
    return {"sources": figures, "precision": precision, "device": str(args.device)}


def main() -> int:
    from engine.worker.control import die_with_parent

    if not die_with_parent():
        return 1
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    warnings.simplefilter("ignore", FutureWarning)
    try:
        spec = json.loads(sys.stdin.readline())
        result = evaluate(spec)
        from engine.core import atomic

        atomic.write_json_atomic(Path(spec["tmp"]) / RESULT, result)
    except Exception as e:  # the process's one handler: whatever loading or measuring raised, said in one line
        text = str(e).strip()
        print(f"error: {type(e).__name__}: {text.splitlines()[0] if text else ''}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
