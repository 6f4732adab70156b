"""What a file trains, token by token, for `traind preview` and `traind validate`.

    python -m engine.worker.preview < SPEC.json

Run by engine/tools/preview.py, which never imports transformers: it validates the
files, finds the workspace's tokenizer (the current model's) and its
`max_seq_length`, and hands this process a spec on stdin: `model`,
`max_seq_length`, `n` (examples to show per file), `files` ([{path,
format}]) and `training` (packing, packing_cross_document, seed: the rows
each file would train as are counted too). The examples are the training worker's own (engine/worker/data.py's
encoders), so what is shown is what is trained: the token ids after the chat
template, the loss mask, the cut at `max_seq_length`.

The result is one JSON document on stdout; progress and warnings go to stderr;
a failure is one line `error: ...` on stderr and exit 1. It reads the files
and the tokenizer only: it never trains and writes nothing.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

SCHEMA = 1


def _char_ends(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The decoded text and where each token ends in it (a token inside a multi-byte character ends where
    the character does)."""
    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(ids)
    ends, last = [], 0
    for k in range(1, len(ids) + 1):
        prefix = decode(ids[:k]).rstrip("\ufffd")
        last = max(last, min(len(prefix), len(text)))
        ends.append(last)
    return text, ends


def spans(mask: list[int], ends: list[int]) -> list[dict[str, list[int]]]:
    """Runs of trained tokens as token and character offsets ([start, end), both)."""
    out = []
    for i, m in enumerate(mask):
        if not m:
            continue
        if out and out[-1]["tokens"][1] == i:
            out[-1]["tokens"][1] = i + 1
            out[-1]["chars"][1] = ends[i]
        else:
            out.append({"tokens": [i, i + 1], "chars": [ends[i - 1] if i else 0, ends[i]]})
    return out


def training_rows(lengths: list[int], fmt: str, training: dict[str, Any]) -> int:
    """The rows a file's examples make (of these token lengths): a text split into pieces of max_seq_length (or
    the documents joined into blocks), then packed as the worker packs them, or one row an example."""
    import numpy as np

    from engine.worker.packing import plan_rows

    size = training["max_seq_length"]
    if fmt == "text" and training.get("packing_cross_document"):
        return -(-sum(lengths) // size)
    pieces: list[int] = []
    for n in lengths:
        if fmt == "text":
            pieces += [size] * (n // size) + ([n % size] if n % size else [])
        else:
            pieces.append(min(n, size))
    if not training.get("packing", True):
        return len(pieces)
    return len(plan_rows(np.asarray(pieces, np.int64), size, training.get("seed", 0))[0]) - 1


def preview_file(tokenizer, path: str, fmt: str, max_seq_length: int, n: int, skip_lines: list[int] = (),
                 training: dict[str, Any] | None = None) -> dict[str, Any]:
    """`training` (packing, packing_cross_document, seed): also count the rows the examples would train as."""
    from engine.worker import data

    encoder = data.make_encoder(fmt, tokenizer, max_seq_length)
    packed = fmt == "text"  # texts are packed into blocks: never cut, every token trained
    shown: list[dict[str, Any]] = []
    lengths: list[int] = []
    counts = {"examples": 0, "tokens": 0, "trained_tokens": 0, "cut": 0, "nothing_to_train": 0}
    for batch in data.read_batches(Path(path), bad=frozenset(skip_lines)):  # as training reads it
        for line, ids, mask in encoder.records(batch):
            lengths.append(len(ids))
            cut = not packed and len(ids) > max_seq_length
            if cut:
                ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            trained = sum(mask[1:]) if not packed else len(ids)
            counts["examples"] += 1
            counts["tokens"] += len(ids)
            counts["trained_tokens"] += trained
            counts["cut"] += cut
            counts["nothing_to_train"] += trained == 0
            if len(shown) < n:
                text, ends = _char_ends(tokenizer, ids)
                shown.append({"line": line, "text": text, "tokens": len(ids), "trained_tokens": trained,
                              "cut": cut, "nothing_to_train": trained == 0, "spans": spans(mask, ends)})
    if training is not None:
        counts["rows"] = training_rows(lengths, fmt, dict(training, max_seq_length=max_seq_length))
    return {"path": path, "format": fmt, "max_seq_length": max_seq_length, "packed": packed,
            "counts": counts, "examples": shown}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    from engine.worker.chat import DataError

    files = []
    for f in spec["files"]:
        try:
            files.append(preview_file(tokenizer, f["path"], f["format"], spec["max_seq_length"], spec["n"],
                                      f.get("skip_lines", []), spec.get("training")))
        except DataError as e:
            raise DataError(f"{f['path']}: {e}") from None
    return {"schema": SCHEMA, "model": spec["model"], "files": files}


def main() -> int:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(sys.stdin.readline())
    try:
        doc = run(spec)
    except Exception as e:  # a data error, a tokenizer that cannot load: one line for the caller to show
        from engine.worker.chat import DataError

        print(f"error: {e}" if isinstance(e, DataError) else f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
