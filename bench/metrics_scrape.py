"""Scraping /metrics while training: tokens/s with a Prometheus-like scraper at 10 Hz (and at 100 Hz) against none.

The same tiny-model job (the demo's text examples, packed rows, one epoch)
through `traind daemon --once` with `[metrics] listen = "127.0.0.1:0"` in every
case; a scraper thread in this process reads the address from status.json and
GETs /metrics at the given rate (no scraper: the endpoint is up, nobody asks).
Tokens/s as supervisor_overhead.py measures it: between the end of the first
and the last optimizer step, from metrics.jsonl. Cases alternate; the median of
the repeats is reported, with each scrape's latency (p50, p99) and the rate the
scraper reached.

    .venv/bin/python bench/metrics_scrape.py [--examples 6000] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import ROOT, build_tiny_model, new_workspace

from engine.data import demo_data

TRAINING = {"max_seq_length": 128, "batch_size": 8, "seed": 7}
CASES = {"none": 0.0, "10 Hz": 10.0, "100 Hz": 100.0}


class Scraper(threading.Thread):
    def __init__(self, status_path: Path, hz: float):
        super().__init__(daemon=True)
        self.status_path, self.period = status_path, 1.0 / hz
        self.done = threading.Event()
        self.latencies: list[float] = []
        self.failed = 0
        self.began = self.ended = 0.0

    def url(self) -> str | None:
        try:
            return json.loads(self.status_path.read_text()).get("metrics_url")
        except (OSError, ValueError):
            return None

    def run(self) -> None:
        while not self.done.is_set() and (url := self.url()) is None:
            time.sleep(0.05)
        self.began = next_at = time.monotonic()
        while not self.done.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    r.read()
                self.latencies.append(time.monotonic() - t0)
            except OSError:
                self.failed += 1  # the daemon has gone (the job is over)
            next_at += self.period
            time.sleep(max(0.0, next_at - time.monotonic()))
        self.ended = time.monotonic()


def run_case(base: Path, data: Path, tmp: Path, hz: float) -> dict:
    ws = new_workspace(tmp, base, {"training": {**TRAINING, "packing": True},
                                   "checkpoint": {"every_steps": 10**9, "every_minutes": 10**6},
                                   "jobs": {"warm_worker": False}, "metrics": {"listen": "127.0.0.1:0"}})
    (ws.inbox / "data.jsonl").write_bytes(data.read_bytes())
    scraper = Scraper(ws.status_path, hz) if hz else None
    if scraper:
        scraper.start()
    subprocess.run([sys.executable, "-m", "engine.cli", "daemon", "--once", "-w", str(ws.root)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    [run] = list(ws.runs.iterdir())
    steps = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "step"]
    first, last = steps[0], steps[-1]
    out = {"tokens_per_s": (last["tokens_seen"] - first["tokens_seen"]) / (last["time"] - first["time"])}
    if scraper:
        scraper.done.set()
        scraper.join()
        lat = sorted(scraper.latencies)
        out.update(scrapes=len(lat), scrapes_per_s=len(lat) / (scraper.ended - scraper.began),
                   p50_ms=1000 * lat[len(lat) // 2], p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_model(tmp / "tiny")
        data = tmp / "data.jsonl"
        demo_data.write_demo_file(data, args.examples, "text", seed=3)
        runs: dict[str, list[dict]] = {name: [] for name in CASES}
        for _ in range(args.repeats):
            for name, hz in CASES.items():
                runs[name].append(run_case(base, data, tmp, hz))
    result = {}
    for name, rs in runs.items():
        row = {"median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs)),
               "runs": [round(r["tokens_per_s"]) for r in rs]}
        if CASES[name]:
            row.update({k: round(statistics.median(r[k] for r in rs), 2)
                        for k in ("scrapes_per_s", "p50_ms", "p99_ms")})
        result[name] = row
    base_rate = result["none"]["median_tokens_per_s"]
    for name in CASES:
        result[name]["ratio"] = round(result[name]["median_tokens_per_s"] / base_rate, 3)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"tokens/s, median of {args.repeats} (tiny model, CPU, packed rows), /metrics scraped while training")
    print(f"{'scraper':8} {'tokens/s':>9} {'ratio':>6} {'scrapes/s':>10} {'p50 ms':>7} {'p99 ms':>7}  runs")
    for name, r in result.items():
        extra = (f"{r['scrapes_per_s']:>10.1f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}" if CASES[name]
                 else f"{'':>10} {'':>7} {'':>7}")
        print(f"{name:8} {r['median_tokens_per_s']:>9,} {r['ratio']:>6.3f} {extra}  {r['runs']}")
    print("target: 10 Hz / none >= 0.99")
    return 0


if __name__ == "__main__":
    sys.exit(main())
