"""Generated training data for the demo and the tests: tasks a tiny model learns in a minute.

Every task is a pure function of a seeded `random.Random`, so the same seed gives
the same bytes on every machine: addition ("17+25=42"), counting on ("count 3:
3 4 5 6 7"), reversing a word ("reverse abcd: dcba") and doubling ("double 12:
24"). `write_demo_file` writes N examples in one of the three input formats.

This module must never import torch or transformers: the CLI and the daemon use it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.core import atomic

FORMATS = ("text", "prompt_completion", "messages")

_LETTERS = "abcdefghij"
_SYSTEM = "You answer in as few characters as possible."


def _task(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair; question + answer reads as one line of text."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"{a}+{b}=", str(a + b)
    if kind == 1:
        start = rng.randrange(20)
        return f"count {start}:", " " + " ".join(str(start + i) for i in range(1, 6))
    if kind == 2:
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randrange(3, 7)))
        return f"reverse {word}:", " " + word[::-1]
    n = rng.randrange(50)
    return f"double {n}:", f" {2 * n}"


def tasks(n: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield _task(rng)


def demo_texts(n: int, seed: int = 0, lines_per_text: int = 4) -> Iterator[str]:
    """Plain text: each document is a few task lines."""
    rng = random.Random(seed)
    for _ in range(n):
        yield "\n".join(q + a for q, a in (_task(rng) for _ in range(lines_per_text)))


def demo_records(n: int, fmt: str, seed: int = 0) -> Iterator[dict[str, Any]]:
    """n records in `fmt`; ValueError at once for an unknown format."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return _records(n, fmt, seed)


def _records(n: int, fmt: str, seed: int) -> Iterator[dict[str, Any]]:
    if fmt == "text":
        for text in demo_texts(n, seed):
            yield {"text": text}
        return
    rng = random.Random(seed)
    for _ in range(n):
        q, a = _task(rng)
        if fmt == "prompt_completion":
            yield {"prompt": q, "completion": a}
        else:
            messages = [{"role": "system", "content": _SYSTEM}] if rng.random() < 0.3 else []
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}]
            yield {"messages": messages}


def write_demo_file(path: str | os.PathLike, n: int, fmt: str = "text", seed: int = 0) -> Path:
    """Write n examples of `fmt` as JSONL to `path`, whole or not at all (temp file, then rename)."""
    path = Path(path)
    records = demo_records(n, fmt, seed)  # validates fmt before any file is made
    with atomic.replacing(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.data.demo_data", description="Write generated demo data as JSONL.")
    parser.add_argument("path")
    parser.add_argument("-n", type=int, default=1000, help="examples (default 1000)")
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_demo_file(args.path, args.n, args.format, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
