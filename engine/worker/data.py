"""Input file to training examples: tokenize once into an on-disk cache, serve it by memory map.

The JSONL file is read line by line in batches and tokenized with the fast
tokenizer; token ids (uint32) and a loss mask (uint8) are appended to binary
files in `run_dir/data/`, with an index of example offsets (int64). The files
are written under temporary names and renamed when complete, and `meta.json`,
written last, says which tokenizer, format, length and input they came from, so
a resumed attempt reuses the cache and a changed config or file rebuilds it.

Formats (docs/formats.md):
- `text`: each document (+EOS) an example, one longer than `max_seq_length`
  split into pieces of that length (never cut); with `cross_document`
  (`training.packing_cross_document`), documents joined and cut into blocks of
  `max_seq_length` tokens instead, attending across their boundaries, the final
  partial block kept.
- `prompt_completion`: prompt + completion + EOS; loss on the completion only.
- the chat formats (`messages`, `chat_prompt_completion`, `sharegpt`, `alpaca`;
  engine/data/formats.py makes each record plain messages marked trained or not):
  the tokenizer's chat template, tools included; loss on the trained messages
  only (engine/worker/chat.py finds their character spans), mapped to tokens
  with the offsets mapping. An alpaca record for a tokenizer without a chat
  template is a prompt and a completion.
Longer examples are cut to `max_seq_length`; one left with no loss token is skipped.
Which lines are records is reading.py's rule (`reading.records`): blank lines
are passed over, and so are the bad lines validation skipped (`skip_lines`,
from the job record): exactly those, by number.

`TokenDataset` is a map-style dataset over `np.memmap`s: memory stays flat
whatever the file size, and the Trainer's resume (seeded sampler replayed,
consumed batches skipped) lands on the exact data position. `Collator` pads a
batch of examples; packing them into rows instead is packing.py's.

`build_cache` reports its progress (the share of the file's bytes read) to a
callback, at most every `PROGRESS_SECONDS`.

This module never trains and never writes outside its cache directory.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from engine.core import atomic, reading
from engine.data import formats
from engine.store import statefiles
from engine.worker import chat
from engine.worker.chat import DataError

CACHE_VERSION = 3  # 2: the chat formats, weights and tools; 3: text documents kept apart
FORMATS = formats.FORMATS
IGNORE_INDEX = -100

_FILES = ("tokens.bin", "mask.bin", "offsets.bin")
META = "meta.json"
BATCH_LINES = 1000
BATCH_BYTES = 8 * 2**20
PROGRESS_SECONDS = 1.0
PARALLELISM = "TOKENIZERS_PARALLELISM"


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever tokenization could: vocabulary, merges, normalizer, template, special tokens."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()[:32]


# --- encoders: records -> (ids, mask) examples ------------------------------------------------


class _Encoder:
    """Records to examples. `records` gives each record's tokens and loss mask whole; `encode` the training
    examples (cut to max_seq_length; one with nothing left to train on is skipped and counted)."""

    def __init__(self, tokenizer, max_seq_length: int):
        self.tok = tokenizer
        self.max_len = max_seq_length
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token: cannot mark the end of an example")
        self.eos = tokenizer.eos_token_id
        self.skipped = 0  # examples with no loss token left after cutting
        self.cut = 0  # examples longer than max_seq_length
        # The Rust tokenizer itself, a batch at a time, without the Python wrapper's per-example work: the same
        # ids (the wrapper calls it so too), where nothing (truncation, padding) is set on it.
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self.backend = backend if backend is not None and not backend.truncation and not backend.padding else None

    def ids(self, texts: list[str], special: bool) -> list[list[int]]:
        if self.backend is None:
            return self.tok(texts, add_special_tokens=special)["input_ids"]
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=special)]

    def ids_and_offsets(self, texts: list[str]) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
        if self.backend is None:
            enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
            return zip(enc["input_ids"], enc["offset_mapping"])
        return ((e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False))

    def records(self, records: list[tuple[int, dict]]) -> Iterator[tuple[int, list[int], list[int]]]:
        raise NotImplementedError

    def encode(self, records: list[tuple[int, dict]]) -> Iterator[tuple[list[int], list[int]]]:
        for _, ids, mask in self.records(records):
            yield from self._cut(ids, mask)

    def flush(self) -> Iterator[tuple[list[int], list[int]]]:
        return iter(())

    def _cut(self, ids: list[int], mask: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        if len(ids) > self.max_len:
            self.cut += 1
            ids, mask = ids[: self.max_len], mask[: self.max_len]
        if any(mask[1:]):  # the first token is never a target: the model shifts labels left
            yield ids, mask
        else:
            self.skipped += 1


class _TextEncoder(_Encoder):
    """Each document (+EOS) an example, split into pieces of max_seq_length (a last piece of one token has
    nothing to predict and is left out)."""

    def records(self, records):
        texts = [_field(line, r, "text") for line, r in records]
        for (line, _), ids in zip(records, self.ids(texts, special=True)):
            if not ids or ids[-1] != self.eos:
                ids = ids + [self.eos]
            yield line, ids, [1] * len(ids)

    def encode(self, records):
        for _, ids, mask in self.records(records):
            for start in range(0, len(ids), self.max_len):
                if len(ids) - start >= 2:
                    yield ids[start : start + self.max_len], mask[start : start + self.max_len]


class _TextBlockEncoder(_TextEncoder):
    """Documents (+EOS) concatenated and cut into full blocks; the remainder carries to the next batch."""

    def __init__(self, tokenizer, max_seq_length):
        super().__init__(tokenizer, max_seq_length)
        self.carry: list[int] = []

    def encode(self, records):
        for _, ids, _ in self.records(records):
            self.carry.extend(ids)
        n_full = len(self.carry) // self.max_len
        for i in range(n_full):
            block = self.carry[i * self.max_len : (i + 1) * self.max_len]
            yield block, [1] * len(block)
        del self.carry[: n_full * self.max_len]

    def flush(self):
        if len(self.carry) >= 2:
            yield self.carry, [1] * len(self.carry)
        self.carry = []


class _PromptCompletionEncoder(_Encoder):
    def records(self, records):
        prompts = [_field(line, r, "prompt") for line, r in records]
        completions = [_field(line, r, "completion") for line, r in records]
        yield from self._pairs([line for line, _ in records], prompts, completions)

    def _pairs(self, lines, prompts, completions):
        p_ids = self.ids(prompts, special=True)
        c_ids = self.ids(completions, special=False)
        for line, p, c in zip(lines, p_ids, c_ids):
            yield line, p + c + [self.eos], [0] * len(p) + [1] * (len(c) + 1)


class _ChatEncoder(_PromptCompletionEncoder):
    """The chat formats (engine/data/formats.py) through the chat template (engine/worker/chat.py); an alpaca
    record for a tokenizer with no chat template as a prompt and a completion."""

    def __init__(self, tokenizer, max_seq_length, fmt: str):
        super().__init__(tokenizer, max_seq_length)
        self.fmt = fmt
        self.renderer = chat.ChatRenderer(tokenizer)
        self.plain_alpaca = fmt == formats.ALPACA and not chat.has_chat_template(tokenizer)

    def records(self, records):
        for line, record in records:
            found, problem, _ = formats.check(record)
            if problem is not None or found != self.fmt:
                raise DataError(f"line {line}: {problem or f'not in the {self.fmt!r} format of the file'}")
        if self.plain_alpaca:
            pairs = [formats.alpaca_prompt_completion(r) for _, r in records]
            yield from self._pairs([line for line, _ in records], [p for p, _ in pairs], [c for _, c in pairs])
            return
        texts, spans = [], []
        for line, record in records:
            text, s = self.renderer.render(line, formats.conversation(self.fmt, record))
            texts.append(text)
            spans.append(s)
        for (line, _), (ids, offsets), s in zip(records, self.ids_and_offsets(texts), spans):
            yield line, ids, _trained(offsets, s)


def _trained(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap a trained span. Offsets run in order (as transformers'
    own assistant mask assumes), so each span is one run of tokens, found by bisection."""
    mask = [0] * len(offsets)
    for start, end in spans:
        first = bisect.bisect_right(offsets, start, key=_end)  # the first token ending after the span starts
        last = bisect.bisect_left(offsets, end, lo=first, key=_start)  # the first token starting at its end
        mask[first:last] = [1] * (last - first)
    return mask


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _end(offset: tuple[int, int]) -> int:
    return offset[1]


_ENCODERS = {"text": _TextEncoder, "prompt_completion": _PromptCompletionEncoder}


def _field(line: int, record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise DataError(f"line {line}: '{name}' must be a string")
    return value


def encode_records(records: list[dict], fmt: str, tokenizer, max_seq_length: int,
                   cross_document: bool = False) -> list[tuple[list[int], list[int]]]:
    """Examples for in-memory records (tests, tools); the cache uses the same encoders."""
    encoder = make_encoder(fmt, tokenizer, max_seq_length, cross_document)
    numbered = list(enumerate(records, start=1))
    return [*encoder.encode(numbered), *encoder.flush()]


def make_encoder(fmt: str, tokenizer, max_seq_length: int, cross_document: bool = False) -> _Encoder:
    if fmt == "text" and cross_document:
        return _TextBlockEncoder(tokenizer, max_seq_length)
    if fmt in formats.CHAT_FORMATS:
        return _ChatEncoder(tokenizer, max_seq_length, fmt)
    if fmt not in _ENCODERS:
        raise DataError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return _ENCODERS[fmt](tokenizer, max_seq_length)


def read_batches(path: Path, skip: frozenset[int] = frozenset(), max_lines: int | None = None,
                 kept: Callable[[bytes], None] | None = None,
                 progress: Callable[[int | None], None] | None = None,
                 bad: frozenset[int] = frozenset()) -> Iterator[list[tuple[int, dict]]]:
    """Records in batches; lines in `skip` go to `kept` instead; lines in `bad` (those validation skipped) are
    passed over; at most `max_lines` records. `progress` is given the bytes of the file read so far before
    each batch is handed on."""
    batch, size, taken = [], 0, 0
    with reading.open_jsonl(path) as f:
        consumed = len(reading.BOM) if f.bom else 0  # a plain file's bytes handed on
        for n, raw in reading.records(f, bad):
            consumed += len(raw)
            if n in skip:
                if kept is not None:
                    kept(raw if raw.endswith(b"\n") else raw + b"\n")
                continue
            if max_lines is not None and taken >= max_lines:
                break
            taken += 1
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise DataError(f"line {n}: not valid JSON: {e}") from None
            if not isinstance(record, dict):
                raise DataError(f"line {n}: expected a JSON object")
            batch.append((n, record))
            size += len(raw)
            if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
                if progress is not None:
                    progress(f.bytes_read() if f.compression else consumed)
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def holdout_lines(path: str | os.PathLike, fraction: float, minimum: int, maximum: int, seed: int,
                  bad: frozenset[int] = frozenset()) -> frozenset[int]:
    """The line numbers held out from training: the k records (bad lines passed over) whose hash (with the
    seed) is smallest, k = fraction of them, within [minimum, maximum] and never over half of them.
    Deterministic, one pass, memory for `maximum` lines only."""
    if maximum <= 0 or (fraction <= 0 and minimum <= 0):
        return frozenset()
    salt = str(seed).encode() + b"\0"
    heap: list[tuple[int, int]] = []  # (-hash, line): the `maximum` smallest hashes seen
    count = 0
    with reading.open_jsonl(path) as f:
        for n, raw in reading.records(f, bad):
            count += 1
            key = int.from_bytes(hashlib.blake2b(salt + raw.rstrip(b"\r\n"), digest_size=8).digest(), "big")
            if len(heap) < maximum:
                heapq.heappush(heap, (-key, n))
            elif -heap[0][0] > key:
                heapq.heapreplace(heap, (-key, n))
    k = min(max(round(count * fraction), minimum), maximum, count // 2)
    return frozenset(n for _, n in heapq.nsmallest(k, heap, key=lambda item: -item[0]))


# --- the cache ----------------------------------------------------------------------------------


def cache_key(data_file: str | os.PathLike, fmt: str, tokenizer, max_seq_length: int,
              cross_document: bool = False) -> dict[str, Any]:
    st = os.stat(data_file)
    return {
        "version": CACHE_VERSION,
        "format": fmt,
        "max_seq_length": max_seq_length,
        "cross_document": cross_document and fmt == "text",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data_file": {"name": Path(data_file).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
    }


def _valid_cache(cache_dir: Path, key: dict) -> dict | None:
    meta = statefiles.read_or_none(cache_dir / META, statefiles.TOKEN_CACHE)  # damaged: tokenized again
    if meta is None or meta["key"] != key:
        return None
    try:
        sizes = [(cache_dir / name).stat().st_size for name in _FILES]
    except FileNotFoundError:
        return None
    if sizes != [meta["tokens"] * 4, meta["tokens"], (meta["examples"] + 1) * 8]:
        return None
    return meta


def build_cache(data_file: str | os.PathLike, fmt: str, tokenizer, max_seq_length: int,
                cache_dir: str | os.PathLike, log: Callable[[str], None] = print, *,
                holdout: dict[str, Any] | None = None, holdout_out: str | os.PathLike | None = None,
                max_lines: int | None = None, cross_document: bool = False,
                progress: Callable[[float], None] | None = None, skip_lines: list[int] = ()) -> dict[str, Any]:
    """Tokenize `data_file` into `cache_dir` unless a cache for the same key is already there; returns meta.

    `holdout` ({fraction, min, max, seed}): those lines (holdout_lines) are not tokenized but written, as they
    are, to `holdout_out` (atomically). `max_lines`: tokenize the first lines only (an eval source's share).
    `cross_document`: text documents joined into blocks (make_encoder). `progress(share)`: the share of the
    file read, 0 to 1, at most every PROGRESS_SECONDS while it is tokenized. `skip_lines`: the bad lines
    validation skipped, never read as records.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(data_file, fmt, tokenizer, max_seq_length, cross_document)
    key.update(holdout=holdout, max_lines=max_lines)
    if skip_lines:  # only then: a cache made before skipping existed stays valid for a file with no bad lines
        key["skip_lines"] = sorted(skip_lines)
    meta = _valid_cache(cache_dir, key)
    if meta is not None and holdout and not Path(holdout_out).exists():
        meta = None  # the held-out lines must be there too
    if meta is not None:
        log(f"data: reusing the tokenized cache in {cache_dir} ({meta['examples']} examples, {meta['tokens']} tokens)")
        return meta
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True)
    encoder = make_encoder(fmt, tokenizer, max_seq_length, cross_document)
    tmp = {name: cache_dir / (atomic.TEMP_PREFIX + name) for name in _FILES}
    handles = {name: open(path, "wb") for name, path in tmp.items()}
    tokens = examples = lines = 0
    held: list[bytes] = []
    bad = frozenset(skip_lines)
    skip = holdout_lines(data_file, holdout["fraction"], holdout["min"], holdout["max"], holdout["seed"], bad) \
        if holdout else frozenset()
    try:
        handles["offsets.bin"].write(np.zeros(1, np.int64).tobytes())

        def write(found):
            nonlocal tokens, examples
            all_ids, all_masks, ends = [], [], []
            for ids, mask in found:  # a batch's examples in one write a file
                all_ids.extend(ids)
                all_masks.extend(mask)
                tokens += len(ids)
                examples += 1
                ends.append(tokens)
            handles["tokens.bin"].write(np.asarray(all_ids, np.uint32).tobytes())
            handles["mask.bin"].write(np.asarray(all_masks, np.uint8).tobytes())
            handles["offsets.bin"].write(np.asarray(ends, np.int64).tobytes())

        used = 0
        with _tokenizer_threads():
            for batch in read_batches(Path(data_file), skip, max_lines, held.append, _Progress(data_file, progress), bad):
                lines, used = batch[-1][0], used + len(batch)
                write(encoder.encode(batch))
            write(encoder.flush())
        for f in handles.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in handles.values():
            f.close()
    if examples == 0:
        shutil.rmtree(cache_dir, ignore_errors=True)
        why = {"text": "it holds no text",
               "prompt_completion": "no completion survives the cut to max_seq_length",
               "alpaca": "no output survives the cut to max_seq_length"}.get(
                   fmt, "no trained assistant turn survives the cut to max_seq_length")
        raise DataError(f"{Path(data_file).name}: no usable examples after tokenization ({lines} lines read, "
                        f"{encoder.skipped} skipped): {why}")
    for name, path in tmp.items():
        os.replace(path, cache_dir / name)
    atomic.fsync_dir(cache_dir)
    if holdout:
        atomic.write_bytes_atomic(holdout_out, b"".join(held))
    meta = {"key": key, "examples": examples, "tokens": tokens, "skipped": encoder.skipped, "cut": encoder.cut,
            "bad_lines_skipped": len(bad),
            "lines": lines, "lines_used": used, "held_out": len(held)}
    atomic.write_json_atomic(cache_dir / META, meta)
    log(f"data: tokenized {used} lines into {examples} examples, {tokens} tokens ({encoder.skipped} skipped, "
        f"{encoder.cut} cut at max_seq_length)"
        + (f"; {len(held)} lines held out for evaluation" if holdout else "")
        + (f"; {len(bad)} bad lines passed over, as validation skipped them" if bad else ""))
    return meta


@contextmanager
def _tokenizer_threads():
    """The Rust tokenizer encodes a batch on every core while the cache is built (the worker's environment
    turns that off for the rest of the job: forked data loaders cannot keep its threads)."""
    before = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARALLELISM, None)
        else:
            os.environ[PARALLELISM] = before


class _Progress:
    """Bytes read to a share of the file, handed on at most every PROGRESS_SECONDS."""

    def __init__(self, path: str | os.PathLike, report: Callable[[float], None] | None):
        self.report, self.size, self.last = report, os.stat(path).st_size or 1, time.monotonic()

    def __call__(self, read: int | None) -> None:
        now = time.monotonic()
        if self.report is not None and read is not None and now - self.last >= PROGRESS_SECONDS:
            self.last = now
            self.report(min(1.0, read / self.size))


class TokenDataset(torch.utils.data.Dataset):
    """Examples of a complete cache (its first `limit` only, if given), read through memory maps."""

    def __init__(self, cache_dir: str | os.PathLike, limit: int | None = None):
        cache_dir = Path(cache_dir)
        self.offsets = np.memmap(cache_dir / "offsets.bin", dtype=np.int64, mode="r")
        if limit is not None:
            self.offsets = self.offsets[: limit + 1]
        self.tokens = np.memmap(cache_dir / "tokens.bin", dtype=np.uint32, mode="r")
        self.mask = np.memmap(cache_dir / "mask.bin", dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.tokens[start:end].astype(np.int64), "loss_mask": np.array(self.mask[start:end])}


class Collator:
    """Pads a batch to its longest example; labels are -100 on padding and on masked tokens."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            n = len(ids)
            input_ids[row, :n] = ids
            attention[row, :n] = 1
            labels[row, :n] = torch.where(torch.as_tensor(f["loss_mask"], dtype=torch.bool), ids, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
