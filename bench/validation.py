"""Benchmark: validation throughput against `wc -l`, and the validator's peak memory.

Generates realistic JSONL (varied lengths, escapes, non-ASCII text) in a temp
directory: one file per format, since a file must hold one format, together
`--size` bytes (512 MiB by default). Then, side by side on the same files, warm
in the page cache: `wc -l` (the floor: reading and counting newlines) and
`engine.data.validate.validate_file` in a fresh subprocess that reports its own time
and peak RSS (VmHWM). Prints MB/s for both, the ratio, and the peak memory.

    .venv/bin/python bench/validation.py [--size 512MiB] [--repeat 2] [--json] [--keep DIR]

Generated files are deleted afterwards unless --keep names a directory for them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMATS = ("text", "prompt_completion", "messages")

_WORDS = ("the of and to in is was for on that with as by at from it an be this are or which model data "
          "training token batch loss gradient step learning rate checkpoint snapshot inbox daemon worker "
          "function return value error file line JSON schema format example prompt completion assistant "
          "user system please explain how why what when where could would should").split()
_UNICODE = ["café", "naïve", "Größe", "façade", "東京", "数据", "模型", "训练", "Привет", "мир", "données",
            "😀", "🚀", "λ", "∑", "→", "niño", "años", "’", "“quoted”"]
_CODE = ['def f(x):\n    return x * 2\n', 'print("hello, world")\n', 'for i in range(10):\n\tprint(i)\n',
         'if a < b and c > d:\n    s = "\\\\path\\\\to"\n']


def _sentence(rng: random.Random, n_words: int) -> str:
    words = []
    for _ in range(n_words):
        r = rng.random()
        words.append(rng.choice(_UNICODE) if r < 0.04 else rng.choice(_WORDS))
    text = " ".join(words).capitalize() + rng.choice([".", ".", "?", "!", ":"])
    if rng.random() < 0.05:
        text += "\n" + rng.choice(_CODE)
    return text


def _paragraphs(rng: random.Random, target_chars: int) -> str:
    parts, size = [], 0
    while size < target_chars:
        s = _sentence(rng, rng.randint(5, 25))
        parts.append(s)
        size += len(s) + 1
        if rng.random() < 0.15:
            parts.append("\n\n")
    return " ".join(parts)


def _length(rng: random.Random) -> int:
    # Log-normal: median ~ 700 characters, a long tail to tens of kilobytes.
    return int(min(60_000, max(20, rng.lognormvariate(6.5, 1.1))))


def make_line(rng: random.Random, fmt: str) -> bytes:
    import orjson

    if fmt == "text":
        obj = {"text": _paragraphs(rng, _length(rng))}
    elif fmt == "prompt_completion":
        obj = {"prompt": _paragraphs(rng, _length(rng) // 3), "completion": _paragraphs(rng, _length(rng))}
    else:
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": _sentence(rng, rng.randint(5, 30))})
        for _ in range(rng.randint(1, 5)):
            messages.append({"role": "user", "content": _paragraphs(rng, _length(rng) // 3)})
            messages.append({"role": "assistant", "content": _paragraphs(rng, _length(rng) // 2)})
        obj = {"messages": messages}
        if rng.random() < 0.2:
            obj["id"] = f"conv-{rng.randrange(10**9)}"
    return orjson.dumps(obj) + b"\n"


def generate(directory: Path, total_size: int, seed: int = 0) -> list[Path]:
    """One file a format, `total_size` bytes together, from a pool of distinct lines."""
    rng = random.Random(seed)
    paths = []
    per_file = total_size // len(FORMATS)
    for fmt in FORMATS:
        pool = [make_line(rng, fmt) for _ in range(3000)]
        path = directory / f"bench-{fmt}.jsonl"
        written = 0
        with open(path, "wb", buffering=1 << 22) as f:
            while written < per_file:
                batch = b"".join(rng.choices(pool, k=512))
                f.write(batch)
                written += len(batch)
        paths.append(path)
    return paths


def time_wc(paths: list[Path], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(["wc", "-l", *map(str, paths)], check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM belongs to the current address space, so unlike
    ru_maxrss it does not carry over the forking parent's peak across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(paths: list[str]) -> None:
    """In a fresh process: validate each file, report time, results and peak RSS as JSON."""
    from engine.core.config import ValidationConfig
    from engine.data.validate import validate_file

    rss_after_import = peak_rss()
    limits = ValidationConfig()
    files = []
    t_all = time.perf_counter()
    for p in paths:
        t0 = time.perf_counter()
        report = validate_file(p, limits)
        files.append({"path": p, "seconds": time.perf_counter() - t0, "ok": report.ok, "format": report.format,
                      "examples": report.examples, "bytes": report.bytes, "error_count": report.error_count})
    elapsed = time.perf_counter() - t_all
    peak = peak_rss()
    json.dump({"seconds": elapsed, "files": files, "peak_rss": peak, "rss_after_import": rss_after_import},
              sys.stdout)


def time_validate(paths: list[Path], repeat: int) -> dict:
    best = None
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, __file__, "--child", *map(str, paths)], check=True,
                              capture_output=True, text=True, cwd=ROOT)
        result = json.loads(proc.stdout)
        if best is None or result["seconds"] < best["seconds"]:
            best = result
    return best


def main(argv: list[str] | None = None) -> int:
    from engine.core.config import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512MiB", help="total size of the generated files (default 512MiB)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side; the best is kept (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    ap.add_argument("--keep", metavar="DIR", help="generate into DIR and keep the files (reused if present)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0

    size = parse_size(args.size)
    tmp = None
    if args.keep:
        directory = Path(args.keep)
        directory.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="traind-bench-")
        directory = Path(tmp)
    try:
        existing = [directory / f"bench-{fmt}.jsonl" for fmt in FORMATS]
        t0 = time.perf_counter()
        if args.keep and all(p.exists() for p in existing) and \
                abs(sum(p.stat().st_size for p in existing) - size) < size * 0.01 + 2**20:
            paths, gen_s = existing, 0.0
        else:
            paths = generate(directory, size)
            gen_s = time.perf_counter() - t0
        total = sum(p.stat().st_size for p in paths)
        subprocess.run(["wc", "-l", *map(str, paths)], check=True, stdout=subprocess.DEVNULL)  # warm the cache
        wc_s = time_wc(paths, args.repeat)
        val = time_validate(paths, args.repeat)
        mb = total / 1e6
        result = {
            "bytes": total,
            "generate_seconds": round(gen_s, 2),
            "wc_seconds": round(wc_s, 3),
            "wc_mb_per_s": round(mb / wc_s, 1),
            "validate_seconds": round(val["seconds"], 3),
            "validate_mb_per_s": round(mb / val["seconds"], 1),
            "ratio_validate_to_wc": round((mb / val["seconds"]) / (mb / wc_s), 4),
            "validate_peak_rss_bytes": val["peak_rss"],
            "validate_rss_after_import_bytes": val["rss_after_import"],
            "per_format": [{"format": f["format"], "bytes": f["bytes"], "examples": f["examples"], "ok": f["ok"],
                            "mb_per_s": round(f["bytes"] / 1e6 / f["seconds"], 1)} for f in val["files"]],
            "cpu": os.cpu_count(),
        }
        if not all(f["ok"] for f in val["files"]):
            print("warning: a generated file did not validate", file=sys.stderr)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"files:     {total / 2**20:,.0f} MiB in {len(paths)} files (one per format), "
                  f"generated in {gen_s:.1f} s")
            print(f"wc -l:     {result['wc_mb_per_s']:>9,.1f} MB/s  ({wc_s:.3f} s)")
            print(f"validate:  {result['validate_mb_per_s']:>9,.1f} MB/s  ({val['seconds']:.3f} s)")
            for f in result["per_format"]:
                print(f"  {f['format']:<18} {f['mb_per_s']:>9,.1f} MB/s  {f['examples']:,} examples")
            print(f"ratio:     validate runs at {result['ratio_validate_to_wc']:.1%} of wc -l's speed "
                  f"({1 / result['ratio_validate_to_wc']:.1f}x slower)")
            print(f"peak RSS:  {val['peak_rss'] / 2**20:.1f} MiB "
                  f"(interpreter and imports alone: {val['rss_after_import'] / 2**20:.1f} MiB)")
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
