"""Replay in the worker: the job's own sample for the pool, and the mixed dataset the job trains on.

- `write_sample`: a seeded random order of the job's own training examples (the
  cache holds no held-out line), cut where it reaches `sample_tokens`, written
  in that order to `runs/JOB/replay/` (tokens, mask, offsets; meta.json last).
  Any prefix of it is a uniform sample: the daemon shrinks a source to its share
  of the pool by cutting it (engine/quality/replay.py).
- `mix`: the job's examples followed by `round(N * f / (1 - f))` examples drawn
  without replacement from the plan's sources (f of the mixed set), by a
  generator seeded with the seed and the job id. The same plan gives the same
  dataset on every attempt: the Trainer's seeded sampler then resumes, and a
  rollback skips, at the same data position. A source tokenized with another
  tokenizer is left out, and said so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core import atomic
from engine.store import statefiles
from engine.quality.replay import META, SAMPLE
from engine.worker import data

__all__ = ["SAMPLE", "Mixed", "mix", "write_sample"]


def _rng(seed: int, job_id: str, purpose: str) -> np.random.Generator:
    salt = hashlib.blake2b(f"{purpose}\0{job_id}".encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(salt, "big")])


def write_sample(dataset: data.TokenDataset, out: Path, sample_tokens: int, seed: int, job_id: str,
                 fingerprint: str, max_seq_length: int, log) -> dict[str, Any] | None:
    """The job's sample for the pool in `out` (kept if already there for the same examples); its meta."""
    key = {"tokenizer": fingerprint, "max_seq_length": max_seq_length, "sample_tokens": sample_tokens,
           "of_examples": len(dataset), "seed": seed}
    meta = statefiles.read_or_none(out / META, statefiles.REPLAY_SAMPLE)
    if meta is not None and {k: meta.get(k) for k in key} == key:
        return meta
    if sample_tokens <= 0:
        return None
    lengths = np.diff(np.asarray(dataset.offsets))
    order = _rng(seed, job_id, "sample").permutation(len(dataset))
    keep = int(np.searchsorted(np.cumsum(lengths[order]), sample_tokens, side="right"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ends, total = [0], 0
    with open(out / "tokens.bin", "wb") as tokens, open(out / "mask.bin", "wb") as mask:
        for i in order[:keep]:
            start, end = int(dataset.offsets[i]), int(dataset.offsets[i + 1])
            tokens.write(np.asarray(dataset.tokens[start:end]).tobytes())
            mask.write(np.asarray(dataset.mask[start:end]).tobytes())
            total += end - start
            ends.append(total)
        for f in (tokens, mask):
            f.flush()
            os.fsync(f.fileno())
    atomic.write_bytes_atomic(out / "offsets.bin", np.asarray(ends, np.int64).tobytes())
    meta = {**key, "examples": keep, "tokens": total, "job_id": job_id}
    atomic.write_json_atomic(out / META, meta)  # last: a sample without it is no sample
    log(f"replay: {keep} of {len(dataset)} examples ({total} tokens) kept for the replay pool")
    return meta


class Mixed(torch.utils.data.Dataset):
    """The job's own examples, then the replayed ones (cut to max_seq_length)."""

    def __init__(self, own: data.TokenDataset, parts: list[data.TokenDataset], which: np.ndarray,
                 where: np.ndarray, max_seq_length: int):
        self.own, self.parts, self.which, self.where, self.max_len = own, parts, which, where, max_seq_length

    def __len__(self) -> int:
        return len(self.own) + len(self.which)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i < len(self.own):
            return self.own[i]
        j = i - len(self.own)
        item = self.parts[int(self.which[j])][int(self.where[j])]
        return {name: value[: self.max_len] for name, value in item.items()}

    def lengths(self) -> np.ndarray:
        theirs = np.zeros(len(self.which), np.int64)
        for k, part in enumerate(self.parts):
            chosen = self.which == k
            theirs[chosen] = np.minimum(part.lengths()[self.where[chosen]], self.max_len)
        return np.concatenate([self.own.lengths(), theirs])

    def replayed_tokens(self) -> int:
        return int(self.lengths()[len(self.own):].sum())


def mix(own: data.TokenDataset, plan: dict[str, Any] | None, fingerprint: str, max_seq_length: int, job_id: str,
        log) -> tuple[torch.utils.data.Dataset, dict[str, Any] | None]:
    """The dataset to train on, and what was replayed ({examples, wanted, tokens, sources: {name: count}})."""
    if not plan or not plan.get("fraction") or not plan.get("sources"):
        return own, None
    parts, names, sizes = [], [], []
    for source in plan["sources"]:
        meta = statefiles.read_or_none(Path(source["path"]) / META, statefiles.REPLAY_SAMPLE)
        if meta is None or meta["tokenizer"] != fingerprint:
            why = "missing or damaged" if meta is None else "tokenized with another tokenizer"
            log(f"replay: source {source['name']} left out: {why}")
            continue
        n = min(int(source["examples"]), meta["examples"])
        if n > 0:
            parts.append(data.TokenDataset(source["path"], limit=n))
            names.append(source["name"])
            sizes.append(n)
    fraction = float(plan["fraction"])
    wanted = round(len(own) * fraction / (1 - fraction))
    take = min(wanted, sum(sizes))
    picks = np.sort(_rng(int(plan["seed"]), job_id, "mix").choice(sum(sizes), take, replace=False))
    bounds = np.cumsum([0, *sizes])
    which = np.searchsorted(bounds, picks, side="right") - 1
    mixed = Mixed(own, parts, which, picks - bounds[which], max_seq_length)
    counts = np.bincount(which, minlength=len(parts))
    info = {"examples": take, "wanted": wanted, "tokens": mixed.replayed_tokens(), "fraction": fraction,
            "sources": {name: int(c) for name, c in zip(names, counts) if c}}
    short = f" (the pool holds {sum(sizes)})" if take < wanted else ""
    log(f"replay: {take} examples from {len(info['sources'])} earlier files mixed into {len(own)} "
        f"({fraction:g} of the mix wanted: {wanted}){short}")
    return mixed, info
