"""The eval suite: what every candidate model is measured on, and each source's share of it.

Sources, in this order:
- every trained file (queue/done/, in job order) whose job held lines out: its
  `runs/JOB/holdout.jsonl`, the lines as they were, never trained on;
- every file in `eval/` that validates as the inbox's files do (an invalid one
  is left out, and said so once), e.g. general chat the model must stay good at.

Each source is measured on its first min(per_source_examples,
max_suite_examples // sources) lines; past max_suite_examples sources, the
oldest trained files leave the suite (eval/ files always stay). The job spec's
`eval` names them, with the current model's own figures (`baseline`, from its
version's marker) so the worker measures the starting model only where none
covers the same lines.

Daemon side: file names, stat and validation only (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.core import reading
from engine.data import prompts, validate
from engine.store import jobs, models, statefiles
from engine.core.config import Config
from engine.core.protocol import EVAL_HOLDOUT, MODEL_MARKER
from engine.store.workspace import Workspace

_formats: dict[str, str | None] = {}  # job id -> its file's format (a job record never changes it)
_checked: dict[tuple, validate.Report] = {}  # eval/ file (path, size, mtime) -> its validation


def _job_format(ws: Workspace, job_id: str) -> str | None:
    if job_id not in _formats:
        record = statefiles.read_or_none(ws.run_dir(job_id) / "job.json", statefiles.JOB) or {}
        _formats[job_id] = record.get("format")
    return _formats[job_id]


def _fixed(ws: Workspace, config: Config) -> tuple[list[tuple[str, Path, str]], list[str]]:
    found, problems = [], []
    try:
        names = sorted(n for n in ws.eval_dir.iterdir() if reading.suffix(n.name) and not n.name.startswith("."))
    except FileNotFoundError:
        return found, problems
    for path in names:
        if path.name == prompts.PROMPTS_NAME:  # the prompts every version answers, not an eval source
            continue
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _checked:
            _checked[key] = validate.validate_file(path, config.validation)
        report = _checked[key]
        if report.ok:
            found.append((f"eval/{reading.stem(path.name)}", path, report.format))
        else:
            problems.append(f"eval/{path.name} left out of the eval suite: {report.summary()}")
    return found, problems


def sources(ws: Workspace, config: Config, exclude: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """([{name, path, format, lines}], problems with eval/ files)."""
    trained = []
    for name in jobs.listing(ws, "done"):
        job_id = reading.stem(name)  # 00001-notes.jsonl.gz too
        path = ws.run_dir(job_id) / EVAL_HOLDOUT
        if job_id != exclude and path.is_file() and path.stat().st_size and (fmt := _job_format(ws, job_id)):
            trained.append((job_id, path, fmt))
    fixed, problems = _fixed(ws, config)
    e = config.eval
    room = max(0, e.max_suite_examples - len(fixed))
    trained = trained[max(0, len(trained) - room):]  # the newest ones, when there are more sources than lines
    chosen = trained + fixed
    share = max(1, min(e.per_source_examples, e.max_suite_examples // max(1, len(chosen))))
    return [{"name": n, "path": str(p), "format": f, "lines": share} for n, p, f in chosen], problems


def baseline(ws: Workspace) -> dict[str, Any]:
    """The current model's figures per source (its version's evaluation), to spare measuring them again."""
    try:
        marker_path = Path(models.current_source(ws)) / MODEL_MARKER
    except (FileNotFoundError, statefiles.Damaged):
        return {}
    marker = statefiles.read_or_none(marker_path, statefiles.MODEL_MARKER) or {}
    evaluated = marker.get("eval") if isinstance(marker.get("eval"), dict) else {}
    out = {}
    for name, figures in (evaluated.get("sources") or {}).items():
        if isinstance(figures, dict) and isinstance(figures.get("after"), dict):
            out[name] = figures["after"]
    return out


def job_spec(ws: Workspace, config: Config, job_id: str) -> tuple[dict[str, Any], list[str]]:
    """The job spec's `eval`, and problems to report (eval/ files left out)."""
    e = config.eval
    found, problems = sources(ws, config, exclude=job_id)
    spec = {"holdout": {"fraction": e.holdout_fraction, "min": e.holdout_min, "max": e.holdout_max,
                        "seed": config.training.seed},
            "sources": found, "baseline": baseline(ws), "batch_size": e.batch_size, "every_steps": e.every_steps}
    return json.loads(json.dumps(spec)), problems
