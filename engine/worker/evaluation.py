"""Held-out evaluation in the worker: the eval suite measured with the Trainer's own `evaluate`.

The daemon names the suite's sources in `spec.eval` (engine/quality/suite.py): every
earlier file's held-out lines and every file in eval/, each with the share of
lines it gets. They are tokenized per job into `run_dir/data/eval/` (a few
thousand lines: a second), with the job's own held-out lines as one more.

- "before": the starting model on the job's own held-out lines, and on every
  source the current model has no figure for (the daemon hands over what the
  current version measured, `baseline`). Once per job, `run_dir/eval-before.json`,
  by the first attempt, when the Trainer has prepared the model for training
  and before its first step (trainer.py says why then); a resumed attempt,
  whose model is a checkpoint's, never measures it.
- "after": the candidate on every source, at the end (and every
  `every_steps`, for the chart). The result goes into the model's marker, written
  last, so no saved candidate is ever without its evaluation, and into
  `run_dir/eval.json`.

Each figure is the Trainer's eval loss (mean over the source's examples of the
token-mean loss), with the tokens and lines it covered; an `eval` event per
source and phase goes to metrics.jsonl. Rank 0 alone writes; every rank evaluates.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core import atomic
from engine.store import statefiles
from engine.core.protocol import EVAL_BEFORE
from engine.worker import data
from engine.worker.events import EventSink

RESULT = "eval.json"


def _rng_kept():
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


@contextmanager
def _padded(trainer):
    """Sources are measured as padded batches of examples, whatever the training collates (packed rows)."""
    training = trainer.data_collator
    trainer.data_collator = data.Collator(trainer.processing_class.pad_token_id)
    try:
        yield
    finally:
        trainer.data_collator = training


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class Suite:
    """The job's eval sources, tokenized, and how to measure a model on them."""

    def __init__(self, spec_eval: dict[str, Any], own: tuple[str, Path, str] | None, tokenizer, max_seq_length: int,
                 run_dir: Path, log, sleep_before_final: float = 0.0) -> None:
        self.spec, self.run_dir, self.log = spec_eval, run_dir, log
        self.sleep_before_final = sleep_before_final  # test hook eval_sleep_seconds
        self.own = own[0] if own else None
        self.datasets: dict[str, data.TokenDataset] = {}
        self.lines: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        sources = [(s["name"], Path(s["path"]), s["format"], s["lines"]) for s in spec_eval.get("sources", [])]
        if own:
            sources.append((*own, None))
        for name, path, fmt, limit in sources:
            folder = run_dir / "data" / "eval" / _folder_name(name)
            try:
                meta = data.build_cache(path, fmt, tokenizer, max_seq_length, folder, log=lambda _m: None,
                                        max_lines=limit)
            except (data.DataError, OSError) as e:
                log(f"eval: source {name} left out: {e}")
                continue
            self.datasets[name] = data.TokenDataset(folder)
            self.lines[name] = meta["lines_used"]
            self.tokens[name] = int(np.count_nonzero(self.datasets[name].mask))
        log(f"eval: {len(self.datasets)} sources, {sum(self.lines.values())} lines"
            + (f" (own held-out: {self.lines.get(self.own, 0)} lines)" if self.own else ""))

    def measure(self, trainer, names: list[str], phase: str, events: EventSink, rank0: bool) -> dict[str, dict]:
        step = trainer.state.global_step
        out = {}
        for name in names:
            if name not in self.datasets:
                continue
            if phase == "after" and self.sleep_before_final:
                time.sleep(self.sleep_before_final)
            began = time.monotonic()
            with _rng_kept(), _padded(trainer):  # evaluating must not move the training's random streams
                metrics = trainer.evaluate(eval_dataset=self.datasets[name], metric_key_prefix="eval")
            seconds = round(time.monotonic() - began, 3)
            loss = float(metrics["eval_loss"])
            out[name] = {"loss": loss if math.isfinite(loss) else None, "tokens": self.tokens[name],
                         "lines": self.lines[name], "step": step}  # None: not finite (the gate refuses it)
            if rank0:
                events.emit("eval", source=name, phase=phase, step=step, loss=out[name]["loss"],
                            tokens=self.tokens[name], lines=self.lines[name], seconds=seconds)
        return out

    def before(self, trainer, events: EventSink, rank0: bool) -> dict[str, dict]:
        """The starting model's figures: the baseline's where they cover the same lines, measured otherwise."""
        path = self.run_dir / EVAL_BEFORE
        recorded = statefiles.read_or_none(path, statefiles.EVAL_RESULT)
        if recorded is not None:
            return recorded["sources"]
        baseline = self.spec.get("baseline") or {}
        known = {name: dict(baseline[name], from_baseline=True) for name in self.datasets
                 if name != self.own and name in baseline and baseline[name].get("lines") == self.lines[name]}
        unknown = [n for n in self.datasets if n not in known]
        if unknown and trainer.state.global_step:
            self.log(f"eval: no figures of the starting model for {', '.join(unknown)} ({path.name} missing) and "
                     f"the model is step {trainer.state.global_step}'s: those sources are not judged")
            unknown = []
        measured = self.measure(trainer, unknown, "before", events, rank0)
        result = {**known, **measured}
        if rank0:
            atomic.write_json_atomic(path, {"sources": result})
        return result

    def after(self, trainer, events: EventSink, rank0: bool) -> dict[str, dict]:
        return self.measure(trainer, list(self.datasets), "after", events, rank0)


def result(suite: Suite, before: dict[str, dict], after: dict[str, dict], step: int) -> dict[str, Any]:
    """What the marker and eval.json keep: per source, the starting model's and the candidate's figures."""
    return {"step": step, "own": suite.own,
            "sources": {name: {"before": before.get(name), "after": after[name]} for name in after}}


def write_result(run_dir: Path, doc: dict[str, Any]) -> None:
    atomic.write_json_atomic(run_dir / RESULT, doc)
