"""The replay pool: a bounded sample of every accepted file's training examples, mixed into later jobs.

Each job's worker writes a sample of its own training examples (never its
held-out lines) into `runs/JOB/replay/`: tokenized as the cache is (tokens.bin,
mask.bin, offsets.bin) and in a seeded random order, so that any prefix of it is
itself a uniform sample (engine/worker/replay.py). When the file is accepted
(queue/done/, or promoted from queue/held/) the sample joins the pool as
`replay/JOB/`, and every source is cut to its share: min(per_source_cap,
max_pool_tokens / sources) tokens, by truncating it to a prefix (meta.json,
rewritten first, says how much of it counts). The pool on disk stays within
max_pool_tokens whatever the length of the stream.

A job's replay plan (the sources and how many examples of each it may draw,
the fraction, the seed) is fixed at its first attempt and kept in its job.json,
so every attempt trains on the same mixed dataset and a resume or a rollback
lands on the same data position. The pool is cut only between jobs, when no
worker has it open.

Daemon side: file names, JSON and byte offsets only (no numpy, no torch).
"""

from __future__ import annotations

import bisect
import mmap
import os
from pathlib import Path
from typing import Any

from engine.core import atomic
from engine.store import jobs, statefiles
from engine.core.config import Config
from engine.store.workspace import Workspace

SAMPLE = "replay"  # in runs/JOB/: the job's own sample, until its file is accepted
META = "meta.json"
FILES = {"tokens.bin": 4, "mask.bin": 1}  # bytes a token; offsets.bin holds examples + 1 int64s


def share(config: Config, sources: int) -> int:
    """Tokens each of `sources` sources may keep."""
    r = config.replay
    equal = r.max_pool_tokens // max(1, sources)
    return min(r.per_source_cap, equal) if r.per_source_cap else equal


def pooled(ws: Workspace) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, folder, meta) of every source in the pool, in job order; damaged ones are left out."""
    try:
        names = sorted(p.name for p in ws.replay.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        meta = statefiles.read_or_none(ws.replay / name / META, statefiles.REPLAY_SAMPLE)
        if meta is not None:
            found.append((name, ws.replay / name, meta))
    return found


def add(ws: Workspace, config: Config, job_id: str) -> None:
    """The accepted job's sample joins the pool, and every source is cut to its new share."""
    sample = ws.run_dir(job_id) / SAMPLE
    if not (sample / META).is_file():
        return  # trained without one (max_pool_tokens = 0), or it is in already
    ws.replay.mkdir(exist_ok=True)
    atomic.durable_rename(sample, ws.replay / job_id)
    trim(ws, config)


def trim(ws: Workspace, config: Config) -> list[tuple[str, Path, dict[str, Any]]]:
    """Cut every source to its share; returns the pool as it is then."""
    found = pooled(ws)
    limit = share(config, len(found))
    return [(name, folder, _cut(folder, meta, limit)) for name, folder, meta in found]


def _cut(folder: Path, meta: dict[str, Any], limit: int) -> dict[str, Any]:
    if meta["tokens"] <= limit:
        return meta
    try:
        with open(folder / "offsets.bin", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            offsets = memoryview(m).cast("q")
            try:
                keep = bisect.bisect_right(offsets, limit, 0, meta["examples"] + 1) - 1  # offsets[keep] <= limit
                tokens = offsets[keep]
            finally:
                offsets.release()
        cut = {**meta, "examples": keep, "tokens": tokens}
        atomic.write_json_atomic(folder / META, cut)  # first: past it, the tail no longer counts
        for name, width in FILES.items():
            os.truncate(folder / name, tokens * width)
        os.truncate(folder / "offsets.bin", (keep + 1) * 8)
        return cut
    except (OSError, ValueError):  # atomic.WriteFailed is an OSError
        return meta  # left as it was: it is cut the next time the pool is


def plan(ws: Workspace, config: Config, job: jobs.Job) -> dict[str, Any]:
    """The job spec's `replay`: fixed at the job's first attempt, the same on every later one."""
    if isinstance(job.record.get("replay"), dict):
        return job.record["replay"]
    r = config.replay
    found = trim(ws, config)
    spec = {"fraction": r.fraction, "seed": config.training.seed,
            "sources": [{"name": name, "path": str(folder), "examples": meta["examples"]}
                        for name, folder, meta in found if meta["examples"] and name != job.id] if r.fraction else [],
            "sample_tokens": share(config, len(found) + 1)}  # this job's own sample, as a source among them
    job.save(replay=spec)
    return spec


def summary(ws: Workspace) -> dict[str, Any]:
    """What the pool holds, for the status and the docs' bound: sources, examples, tokens."""
    found = pooled(ws)
    return {"sources": len(found), "examples": sum(m["examples"] for _, _, m in found),
            "tokens": sum(m["tokens"] for _, _, m in found)}
