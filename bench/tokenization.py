"""Building the token cache against the tokenizer's own batch speed on the same lines.

For each format, the same generated file (the demo data, N lines) is tokenized
two ways, in alternation, the median of the repeats reported:

- the tokenizer alone: the records already parsed and in memory, encoded by the
  transformers tokenizer a batch of 1,000 at a time, its Rust threads on
  (TOKENIZERS_PARALLELISM=true): `tokenizer(texts)` for text, prompts and
  completions for prompt_completion, `apply_chat_template(conversations,
  tokenize=True)` for messages (the template rendered once per conversation);
- traind's `data.build_cache`: the file read and parsed, records encoded (for
  messages the template also rendered up to each trained message, to find what is
  trained), the loss masks made, the cache written and fsynced.

Target: build_cache's lines/s at least 0.8 of the tokenizer's.

    .venv/bin/python bench/tokenization.py [--lines 20000] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)

FORMATS = ("text", "prompt_completion", "messages")
BATCH = 1000


def tokenizer_alone(tok, records: list[dict], fmt: str) -> float:
    began = time.perf_counter()
    for i in range(0, len(records), BATCH):
        batch = records[i: i + BATCH]
        if fmt == "text":
            tok([r["text"] for r in batch])
        elif fmt == "prompt_completion":
            tok([r["prompt"] for r in batch])
            tok([r["completion"] for r in batch], add_special_tokens=False)
        else:
            tok.apply_chat_template([r["messages"] for r in batch], tokenize=True)
    return time.perf_counter() - began


def through_build_cache(tok, path: Path, fmt: str, cache: Path) -> float:
    from engine.worker import data

    shutil.rmtree(cache, ignore_errors=True)
    began = time.perf_counter()
    data.build_cache(path, fmt, tok, 256, cache, log=lambda _m: None)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from engine.data.demo_data import write_demo_file

    logging.set_verbosity_error()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = common.build_tiny_model(tmp / "model")
        tok = AutoTokenizer.from_pretrained(model)
        for fmt in FORMATS:
            path = write_demo_file(tmp / f"{fmt}.jsonl", args.lines, fmt, seed=1)
            records = [json.loads(line) for line in path.open()]
            alone, built = [], []
            for _ in range(args.repeats):
                alone.append(tokenizer_alone(tok, records, fmt))
                built.append(through_build_cache(tok, path, fmt, tmp / f"cache-{fmt}"))
            a, b = statistics.median(alone), statistics.median(built)
            results[fmt] = {"lines": args.lines, "tokenizer_lines_per_s": round(args.lines / a),
                            "build_cache_lines_per_s": round(args.lines / b), "ratio": round(a / b, 2)}
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{'format':<18} {'tokenizer lines/s':>18} {'build_cache lines/s':>20} {'ratio':>6}")
        for fmt, r in results.items():
            print(f"{fmt:<18} {r['tokenizer_lines_per_s']:>18,} {r['build_cache_lines_per_s']:>20,} {r['ratio']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
