"""Padding-free packing: examples placed into rows of `max_seq_length` tokens, each keeping its own positions.

- `plan_rows`: best-fit decreasing over the examples' lengths. Examples are put in
  a seeded random order, then stably sorted longest first, so equal lengths are
  grouped differently for each seed but the same for the same seed; each goes
  into the row with the least room left that still fits it (a segment tree over
  room sizes finds it in log(max_seq_length) steps), else a new row.
- `row_plan`: that plan for a job's dataset, computed once and stored beside the
  token cache (`rows.bin`, `row_offsets.bin`, `rows.json` last), keyed by the
  examples' lengths, the row size and the seed: every attempt of the job, a
  resume after kill -9 or a NaN rollback, trains on the same rows in the same
  order, so the Trainer's seeded sampler lands on the same data position.
- `PackedDataset`: row r is its examples, concatenated, with their lengths.
- `PackedCollator`: a micro-batch of rows as the model takes packed input, the
  way transformers' `DataCollatorWithFlattening` does: `position_ids` restart
  at 0 for every example and no `attention_mask`, so transformers builds a
  block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`, for
  sdpa and eager too) and no example attends to another; labels are -100 at
  every example's first token (nothing before it in its own example predicts
  it) and on untrained tokens. For sdpa and eager the rows are stacked, each
  padded to the longest with tokens at position 0 (each attends to itself
  only, and is no target); for flash_attention_2 the micro-batch is one
  sequence with the FlashAttention kwargs (`cu_seq_lens_q/k`, `max_length_q/k`):
  no padding at all.

The block-diagonal mask is built only when the model has no KV cache: the
Trainer sets `config.use_cache = False` (args.use_cache) before training;
anything else that runs packed batches must do the same.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core import atomic
from engine.store import statefiles
from engine.worker.data import IGNORE_INDEX

PLAN = "rows.json"
_ITEMS, _OFFSETS = "rows.bin", "row_offsets.bin"


class _RoomTree:
    """Room sizes 1..capacity that some open row has: `smallest_at_least(n)` in O(log capacity)."""

    def __init__(self, capacity: int):
        self.size = 1 << max(capacity - 1, 0).bit_length()
        self.best = [0] * (2 * self.size)  # a node holds the largest room present below it

    def set(self, room: int, present: bool) -> None:
        i = self.size + room - 1
        self.best[i] = room if present else 0
        while i > 1:
            i >>= 1
            left, right = self.best[2 * i], self.best[2 * i + 1]
            self.best[i] = left if left >= right else right

    def smallest_at_least(self, n: int) -> int:
        if self.best[1] < n:
            return 0
        i = 1
        while i < self.size:
            i = 2 * i if self.best[2 * i] >= n else 2 * i + 1
        return self.best[i]


def plan_rows(lengths: np.ndarray, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of at most `capacity` tokens by best-fit decreasing: (offsets into items, example indices)."""
    lengths = np.minimum(np.asarray(lengths, np.int64), capacity)
    order = np.random.default_rng(seed).permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    tree = _RoomTree(capacity)
    open_rows: dict[int, list[int]] = {}  # room left -> rows with exactly that room (last opened last)
    rows: list[list[int]] = []
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        room = tree.smallest_at_least(n)
        if room:
            row = open_rows[room].pop()
            if not open_rows[room]:
                tree.set(room, False)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        room -= n
        if room:
            open_rows.setdefault(room, []).append(row)
            tree.set(room, True)
    offsets = np.cumsum([0, *map(len, rows)], dtype=np.int64)
    items = np.fromiter((i for row in rows for i in row), np.int64, count=int(offsets[-1]))
    return offsets, items


def row_plan(dataset, cache_dir: str | os.PathLike, capacity: int, seed: int, log) -> "PackedDataset":
    """`dataset` (a TokenDataset or replay's Mixed: each has `lengths()`, as it serves its examples) packed into
    rows, by the plan stored in `cache_dir` (made and stored if it is not there)."""
    cache_dir = Path(cache_dir)
    lengths = np.asarray(dataset.lengths(), np.int64)
    key = {"capacity": capacity, "seed": seed, "examples": len(lengths),
           "lengths": hashlib.blake2b(lengths.tobytes(), digest_size=16).hexdigest()}
    meta = statefiles.read_or_none(cache_dir / PLAN, statefiles.ROW_PLAN)
    if meta is not None and meta["key"] == key and _sizes(cache_dir) == (meta["rows"] + 1, len(lengths)):
        offsets = np.fromfile(cache_dir / _OFFSETS, np.int64)
        items = np.fromfile(cache_dir / _ITEMS, np.int64)
        how = "stored"
    else:
        offsets, items = plan_rows(lengths, capacity, seed)
        atomic.write_bytes_atomic(cache_dir / _ITEMS, items.tobytes())
        atomic.write_bytes_atomic(cache_dir / _OFFSETS, offsets.tobytes())
        meta = {"key": key, "rows": len(offsets) - 1, "tokens": int(np.minimum(lengths, capacity).sum())}
        atomic.write_json_atomic(cache_dir / PLAN, meta)  # last: a plan without it is no plan
        how = "made"
    packed = PackedDataset(dataset, offsets, items, capacity)
    fill = meta["tokens"] / max(1, meta["rows"] * capacity)
    log(f"packing: {len(lengths)} examples in {meta['rows']} rows of {capacity} tokens ({fill:.1%} full; "
        f"plan {how})")
    return packed


def _sizes(cache_dir: Path) -> tuple[int, int] | None:
    try:
        return (cache_dir / _OFFSETS).stat().st_size // 8, (cache_dir / _ITEMS).stat().st_size // 8
    except FileNotFoundError:
        return None


class PackedDataset(torch.utils.data.Dataset):
    """Row r: its examples (of `examples`, a map-style dataset of input_ids and loss_mask) end to end."""

    def __init__(self, examples, offsets: np.ndarray, items: np.ndarray, capacity: int):
        self.examples, self.offsets, self.items, self.capacity = examples, offsets, items, capacity

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        parts = [self.examples[int(i)] for i in self.items[self.offsets[r]: self.offsets[r + 1]]]
        parts = [{k: v[: self.capacity] for k, v in p.items()} for p in parts]
        return {"input_ids": np.concatenate([p["input_ids"] for p in parts]),
                "loss_mask": np.concatenate([p["loss_mask"] for p in parts]),
                "lengths": np.asarray([len(p["input_ids"]) for p in parts], np.int64)}

    def example_count(self) -> int:
        return len(self.items)


class PackedCollator:
    """Rows to packed model input: per-example position_ids, no attention_mask (module docstring)."""

    def __init__(self, pad_token_id: int, flash: bool = False):
        self.pad, self.flash = pad_token_id, flash

    def __call__(self, features: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        if self.flash:
            return self._flattened(features)
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            ids, lab, pos = self._row(f)
            input_ids[row, : len(ids)], labels[row, : len(ids)], position_ids[row, : len(ids)] = ids, lab, pos
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    def _row(self, f: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
        lengths = torch.as_tensor(f["lengths"], dtype=torch.long)
        starts = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(len(ids)) - torch.repeat_interleave(starts, lengths)
        labels = torch.where(torch.as_tensor(f["loss_mask"], dtype=torch.bool), ids, IGNORE_INDEX)
        labels[starts] = IGNORE_INDEX  # an example's first token: nothing of its own comes before it
        return ids, labels, position

    def _flattened(self, features: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        rows = [self._row(f) for f in features]
        lengths = torch.cat([torch.as_tensor(f["lengths"], dtype=torch.int32) for f in features])
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        longest = int(lengths.max())
        return {"input_ids": torch.cat([r[0] for r in rows])[None], "labels": torch.cat([r[1] for r in rows])[None],
                "position_ids": torch.cat([r[2] for r in rows])[None],
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def real_tokens(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens of a packed micro-batch that are not padding. Padding sits at position 0, each token alone;
    an example's first token is at position 0 too, but followed by its position 1 (an example has two tokens
    at least: one to read and one to predict)."""
    pos = inputs["position_ids"]
    follows = torch.zeros_like(pos, dtype=torch.bool)
    follows[:, :-1] = pos[:, 1:] == 1
    return ((pos != 0) | follows).sum()
