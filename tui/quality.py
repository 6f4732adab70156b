"""What the quality view shows: the forgetting matrix (engine/quality/forgetting.py), the gate's thresholds, and
how each figure is judged.

`QualityReader.read` belongs in the UI's listing thread, never on the event loop.
The matrix reads every evaluated version's marker, so it is read again only when
a file it comes from changed: models/ (a version renamed in), models/current.json
(a promotion, a rollback), queue/held/ (a file held, promoted or requeued) and
traind.toml (the thresholds). A marker is written before its folder is renamed
into models/ and never after, so no figure changes under a version already read.

Read here rather than summarised into status.json: the daemon rewrites status
every second while training, the matrix changes only when a file ends, and this
way it costs the daemon nothing and shows with no daemon running.

This module must never write to the workspace, nor import textual or torch.
"""

from __future__ import annotations

import os
import time
import tomllib
from typing import Any

from engine.core import config as config_mod
from engine.quality import forgetting
from engine.store import snapshots
from engine.quality.gate import change
from engine.store.workspace import Workspace

RACY_S = 2.0  # a change within this long of a stat may share its mtime: look again next time


def read_thresholds(ws: Workspace) -> dict[str, Any]:
    """eval.gate, eval.max_forgetting and eval.min_improvement from traind.toml (the defaults, and the
    problem, when it does not parse). Checked as the daemon checks it, less the GPU probe `load` makes
    for QLoRA: the UI only needs the [eval] figures."""
    try:
        with open(ws.config_path, "rb") as f:
            evaluated, problem = config_mod.from_dict(tomllib.load(f), ws.config_path).eval, None
    except (OSError, tomllib.TOMLDecodeError, config_mod.ConfigError) as e:
        evaluated, problem = config_mod.EvalConfig(), (
            str(e) if isinstance(e, config_mod.ConfigError) else f"{ws.config_path}: {e}")
    return {"gate": evaluated.gate, "max_forgetting": evaluated.max_forgetting,
            "min_improvement": evaluated.min_improvement, "config_problem": problem}


class QualityReader:
    """The quality document, cached until one of the files it comes from changes."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.doc: dict[str, Any] | None = None
        self.reads = 0  # full reads so far (tests check that an unchanged workspace is not read again)
        self._key: tuple | None = None

    def _watched_key(self) -> tuple[tuple, bool]:
        """(what the watched paths look like now, whether any of them changed very recently)."""
        key, newest = [], 0.0
        for path in (self.ws.models, self.ws.current_model_pointer, self.ws.queue("held"), self.ws.config_path):
            try:
                st = os.stat(path)
            except OSError:
                key.append(None)
                continue
            key.append((st.st_ino, st.st_mtime_ns, st.st_size))
            newest = max(newest, st.st_mtime)
        return tuple(key), time.time() - newest < RACY_S

    def read(self) -> dict[str, Any]:
        """{matrix: `traind quality --json`, current: the current version (None: not under models/),
        gate, max_forgetting, min_improvement, config_problem}; the same object while nothing changed."""
        key, racy = self._watched_key()
        if self.doc is None or key != self._key:
            self.doc = {"matrix": forgetting.matrix(self.ws), "current": snapshots.current_version(self.ws),
                        **read_thresholds(self.ws)}
            self.reads += 1
        self._key = None if racy else key  # racily clean: read again next round
        return self.doc


# -- judging a figure: the colours of the view ---------------------------------------------------

BAD, GOOD = "bad", "good"
VERDICT_STYLE = {BAD: "bold red", GOOD: "green", None: ""}  # the alert and the good colours, as elsewhere in the UI


def verdict(change: float | None, source: str, own: str | None, doc: dict[str, Any]) -> str | None:
    """BAD, GOOD or None for a relative change of eval loss on `source`, as the gate sees it: on an earlier
    source a rise past max_forgetting is forgetting and any fall is learning; on the file's own held-out
    lines it must fall by more than min_improvement."""
    if change is None:
        return None
    if source == own:
        return GOOD if -change > doc["min_improvement"] else BAD
    if change > doc["max_forgetting"]:
        return BAD
    return GOOD if change < 0 else None


def by_source(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row a source: the current model's eval loss, and the newest version's before and after with
    the change between them (as the gate judged it: from the starting model) and its verdict."""
    versions = doc["matrix"]["versions"]
    current = next((r for r in versions if r["current"]), {})
    newest = versions[-1] if versions else {}
    out = []
    for source in doc["matrix"]["sources"]:
        now = current.get("losses", {}).get(source)
        before, after = newest.get("before", {}).get(source), newest.get("losses", {}).get(source)
        if now is None and after is None:
            continue  # e.g. a held file's own lines: no source of the suite, and nothing to compare
        moved = change(before, after) if before and after is not None else None
        out.append({"source": source, "own": source == newest.get("own"), "current": now, "before": before,
                    "after": after, "change": moved, "verdict": verdict(moved, source, newest.get("own"), doc)})
    return out
