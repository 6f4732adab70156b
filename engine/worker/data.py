"""Input file to training examples: tokenize once into an on-disk cache, serve it by memory map.

The JSONL file is read line by line in batches and tokenized with the fast
tokenizer; token ids (uint32) and a loss mask (uint8) are appended to binary
files in `run_dir/data/`, with an index of example offsets (int64). The files
are written under temporary names and renamed when complete, and `meta.json`,
written last, says which tokenizer, format, length and input they came from, so
a resumed attempt reuses the cache and a changed config or file rebuilds it.

Formats (docs: DESIGN.md "Data formats"):
- `text`: documents joined with EOS and packed into blocks of `max_seq_length`
  tokens; the final partial block is kept (the collator pads and masks it).
- `prompt_completion`: prompt + completion + EOS; loss on the completion only.
- `messages`: the tokenizer's chat template; loss on assistant turns only. The
  assistant spans are found in characters by rendering the conversation up to
  each assistant turn, then mapped to tokens with the offsets mapping, so no
  `{% generation %}` support is needed from the template.
Longer examples are cut to `max_seq_length`; one left with no loss token is skipped.

`TokenDataset` is a map-style dataset over `np.memmap`s: memory stays flat
whatever the file size, and the Trainer's resume (seeded sampler replayed,
consumed batches skipped) lands on the exact data position.

This module never trains and never writes outside its cache directory.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import atomic, reading, statefiles

CACHE_VERSION = 1
FORMATS = ("text", "prompt_completion", "messages")
IGNORE_INDEX = -100

_FILES = ("tokens.bin", "mask.bin", "offsets.bin")
META = "meta.json"
BATCH_LINES = 1000
BATCH_BYTES = 8 * 2**20


class DataError(Exception):
    """The input cannot be trained on; the message says why, with a line number where there is one."""


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
    def __init__(self, tokenizer, max_seq_length: int):
        self.tok = tokenizer
        self.max_len = max_seq_length
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token: cannot mark the end of an example")
        self.eos = tokenizer.eos_token_id
        self.skipped = 0  # examples with no loss token left after cutting

    def encode(self, records: list[tuple[int, dict]]) -> Iterator[tuple[list[int], list[int]]]:
        raise NotImplementedError

    def flush(self) -> Iterator[tuple[list[int], list[int]]]:
        return iter(())

    def _cut(self, ids: list[int], mask: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        ids, mask = ids[: self.max_len], mask[: self.max_len]
        if any(mask[1:]):  # the first token is never a target: the model shifts labels left
            yield ids, mask
        else:
            self.skipped += 1


class _TextEncoder(_Encoder):
    """Documents (+EOS) concatenated and cut into full blocks; the remainder carries to the next batch."""

    def __init__(self, tokenizer, max_seq_length):
        super().__init__(tokenizer, max_seq_length)
        self.carry: list[int] = []

    def encode(self, records):
        texts = [_field(line, r, "text") for line, r in records]
        for ids in self.tok(texts, add_special_tokens=True)["input_ids"]:
            self.carry.extend(ids)
            if not ids or ids[-1] != self.eos:
                self.carry.append(self.eos)
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
    def encode(self, records):
        prompts = [_field(line, r, "prompt") for line, r in records]
        completions = [_field(line, r, "completion") for line, r in records]
        p_ids = self.tok(prompts, add_special_tokens=True)["input_ids"]
        c_ids = self.tok(completions, add_special_tokens=False)["input_ids"]
        for p, c in zip(p_ids, c_ids):
            ids = p + c + [self.eos]
            yield from self._cut(ids, [0] * len(p) + [1] * (len(c) + 1))


class _MessagesEncoder(_Encoder):
    def encode(self, records):
        texts, spans = [], []
        for line, record in records:
            messages = record.get("messages")
            if not isinstance(messages, list) or not messages:
                raise DataError(f"line {line}: 'messages' must be a non-empty list")
            text, s = self._render(line, messages)
            texts.append(text)
            spans.append(s)
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, s in zip(enc["input_ids"], enc["offset_mapping"], spans):
            mask = [1 if any(a < end and b > start for start, end in s) else 0 for a, b in offsets]
            yield from self._cut(ids, mask)

    def _chat(self, line: int, messages: list, generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises its own errors, e.g. a template that requires alternating roles
            raise DataError(f"line {line}: the tokenizer's chat template failed: {e}") from None

    def _render(self, line: int, messages: list) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns (with their end tokens)."""
        text = self._chat(line, messages)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") != "assistant":
                continue
            content = str(m.get("content", ""))
            start = end = -1
            try:
                prefix = self._chat(line, messages[:i], generation_prompt=True) if i else ""
                upto = self._chat(line, messages[: i + 1])
            except DataError:
                prefix = upto = None
            if prefix is not None and text.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor:
                start, end = len(prefix), len(upto)
            else:  # a template whose prefixes do not render as prefixes: find the content itself
                start = text.find(content, cursor)
                if start >= 0:
                    end = start + len(content)
                    eos = self.tok.eos_token or ""
                    if eos and text.startswith(eos, end):
                        end += len(eos)
            if start < 0 or end <= start:
                raise DataError(f"line {line}: cannot locate assistant message {i} in the chat template's output")
            spans.append((start, end))
            cursor = end
        return text, spans


_ENCODERS = {"text": _TextEncoder, "prompt_completion": _PromptCompletionEncoder, "messages": _MessagesEncoder}


def _field(line: int, record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise DataError(f"line {line}: '{name}' must be a string")
    return value


def encode_records(records: list[dict], fmt: str, tokenizer, max_seq_length: int) -> list[tuple[list[int], list[int]]]:
    """Examples for in-memory records (tests, tools); the cache uses the same encoders."""
    encoder = _encoder(fmt, tokenizer, max_seq_length)
    numbered = list(enumerate(records, start=1))
    return [*encoder.encode(numbered), *encoder.flush()]


def _encoder(fmt: str, tokenizer, max_seq_length: int) -> _Encoder:
    if fmt not in _ENCODERS:
        raise DataError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return _ENCODERS[fmt](tokenizer, max_seq_length)


def _batches(path: Path, skip: frozenset[int] = frozenset(), max_lines: int | None = None,
             kept: Callable[[bytes], None] | None = None) -> Iterator[list[tuple[int, dict]]]:
    """Records in batches; lines in `skip` go to `kept` instead; at most `max_lines` records."""
    batch, size, taken = [], 0, 0
    with reading.open_jsonl(path) as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if n in skip:
                if kept is not None:
                    kept(raw if raw.endswith(b"\n") else raw + b"\n")
                continue
            if max_lines is not None and taken >= max_lines:
                break
            taken += 1
            try:
                record = json.loads(raw)
            except ValueError as e:
                raise DataError(f"line {n}: not valid JSON: {e}") from None
            if not isinstance(record, dict):
                raise DataError(f"line {n}: expected a JSON object")
            batch.append((n, record))
            size += len(raw)
            if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def holdout_lines(path: str | os.PathLike, fraction: float, minimum: int, maximum: int, seed: int) -> frozenset[int]:
    """The line numbers held out from training: the k non-blank lines whose hash (with the seed) is smallest,
    k = fraction of the lines, within [minimum, maximum] and never over half of them. Deterministic, one pass,
    memory for `maximum` lines only."""
    if maximum <= 0 or (fraction <= 0 and minimum <= 0):
        return frozenset()
    salt = str(seed).encode() + b"\0"
    heap: list[tuple[int, int]] = []  # (-hash, line): the `maximum` smallest hashes seen
    count = 0
    with reading.open_jsonl(path) as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            count += 1
            key = int.from_bytes(hashlib.blake2b(salt + raw.rstrip(b"\r\n"), digest_size=8).digest(), "big")
            if len(heap) < maximum:
                heapq.heappush(heap, (-key, n))
            elif -heap[0][0] > key:
                heapq.heapreplace(heap, (-key, n))
    k = min(max(round(count * fraction), minimum), maximum, count // 2)
    return frozenset(n for _, n in heapq.nsmallest(k, heap, key=lambda item: -item[0]))


# --- the cache ----------------------------------------------------------------------------------


def cache_key(data_file: str | os.PathLike, fmt: str, tokenizer, max_seq_length: int) -> dict[str, Any]:
    st = os.stat(data_file)
    return {
        "version": CACHE_VERSION,
        "format": fmt,
        "max_seq_length": max_seq_length,
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
                max_lines: int | None = None) -> dict[str, Any]:
    """Tokenize `data_file` into `cache_dir` unless a cache for the same key is already there; returns meta.

    `holdout` ({fraction, min, max, seed}): those lines (holdout_lines) are not tokenized but written, as they
    are, to `holdout_out` (atomically). `max_lines`: tokenize the first lines only (an eval source's share).
    """
    cache_dir = Path(cache_dir)
    key = cache_key(data_file, fmt, tokenizer, max_seq_length)
    key.update(holdout=holdout, max_lines=max_lines)
    meta = _valid_cache(cache_dir, key)
    if meta is not None and holdout and not Path(holdout_out).exists():
        meta = None  # the held-out lines must be there too
    if meta is not None:
        log(f"data: reusing the tokenized cache in {cache_dir} ({meta['examples']} examples, {meta['tokens']} tokens)")
        return meta
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True)
    encoder = _encoder(fmt, tokenizer, max_seq_length)
    tmp = {name: cache_dir / (atomic.TEMP_PREFIX + name) for name in _FILES}
    handles = {name: open(path, "wb") for name, path in tmp.items()}
    tokens = examples = lines = 0
    held: list[bytes] = []
    skip = holdout_lines(data_file, holdout["fraction"], holdout["min"], holdout["max"], holdout["seed"]) \
        if holdout else frozenset()
    try:
        handles["offsets.bin"].write(np.zeros(1, np.int64).tobytes())

        def write(found):
            nonlocal tokens, examples
            ends = []
            for ids, mask in found:
                handles["tokens.bin"].write(np.asarray(ids, np.uint32).tobytes())
                handles["mask.bin"].write(np.asarray(mask, np.uint8).tobytes())
                tokens += len(ids)
                examples += 1
                ends.append(tokens)
            handles["offsets.bin"].write(np.asarray(ends, np.int64).tobytes())

        used = 0
        for batch in _batches(Path(data_file), skip, max_lines, held.append):
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
               "messages": "no assistant turn survives the cut to max_seq_length"}[fmt]
        raise DataError(f"{Path(data_file).name}: no usable examples after tokenization ({lines} lines read, "
                        f"{encoder.skipped} skipped): {why}")
    for name, path in tmp.items():
        os.replace(path, cache_dir / name)
    atomic.fsync_dir(cache_dir)
    if holdout:
        atomic.write_bytes_atomic(holdout_out, b"".join(held))
    meta = {"key": key, "examples": examples, "tokens": tokens, "skipped": encoder.skipped, "lines": lines,
            "lines_used": used, "held_out": len(held)}
    atomic.write_json_atomic(cache_dir / META, meta)
    log(f"data: tokenized {used} lines into {examples} examples, {tokens} tokens ({encoder.skipped} skipped)"
        + (f"; {len(held)} lines held out for evaluation" if holdout else ""))
    return meta


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
