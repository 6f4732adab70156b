"""Loss chart render time per frame with 1k and 1M logged steps, side by side.

A frame is what the widget does on a redraw: downsample the visible series
through the min/max pyramid and build the braille strips (`render_chart`), for
a 100x20 chart, in each scope and view, with an evaluation round (three sources)
every `--eval-every` steps drawn as markers (0: none). Median of `--repeat`
frames. Target: the 1M case within 1.5x of the 1k case, and under 20 ms.

    .venv/bin/python bench/tui_chart.py [--repeat 50] [--width 100] [--height 20] [--eval-every 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.series import RunSeries  # noqa: E402
from tui.widgets.loss_chart import render_chart  # noqa: E402


def build(n: int, jobs: int = 4, eval_every: int = 0) -> RunSeries:
    rng = np.random.default_rng(0)
    s = RunSeries()
    per = n // jobs
    for j in range(jobs):
        count = per if j < jobs - 1 else n - per * (jobs - 1)
        x = np.arange(count)
        loss = 2.5 * np.exp(-x / max(1, count / 5)) + 0.5 + 0.2 * rng.random(count)
        loss[count // 2] = 8.0  # a spike
        lr = 1e-4 * (1 - x / count)
        job = f"{j + 1:05d}-data"
        batch = eval_every or 8192  # batches, as the reader delivers them; an eval round after each
        for i in range(0, count, batch):
            s.append(job, x[i:i + batch] + 1, loss[i:i + batch], lr[i:i + batch])
            for source, shift in ((job, 0.1), ("00000-earlier", 0.3), ("eval/general", 0.5)) if eval_every else ():
                s.add_eval(job, {"source": source, "phase": "during", "step": i + batch, "loss": loss[i] + shift})
    return s


def frame_ms(s: RunSeries, width: int, height: int, repeat: int, scope: str, view: str) -> float:
    render_chart(s, width, height, scope=scope, view=view)  # warm up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        render_chart(s, width, height, scope=scope, view=view)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--height", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = {"1k": 1_000, "1M": 1_000_000}
    series = {name: build(n, eval_every=args.eval_every) for name, n in sizes.items()}
    rows = []
    for scope, view in (("run", "loss"), ("job", "loss"), ("run", "lr")):
        ms = {name: frame_ms(s, args.width, args.height, args.repeat, scope, view) for name, s in series.items()}
        rows.append({"scope": scope, "view": view, "ms_1k": ms["1k"], "ms_1M": ms["1M"], "ratio": ms["1M"] / ms["1k"]})
    worst_ratio = max(r["ratio"] for r in rows)
    worst_1m = max(r["ms_1M"] for r in rows)
    ok = worst_ratio <= 1.5 and worst_1m < 20
    result = {"width": args.width, "height": args.height, "repeat": args.repeat, "eval_every": args.eval_every,
              "eval_points_1M": len(series["1M"].evals), "frames": rows,
              "memory_1M_bytes": series["1M"].nbytes, "worst_ratio": worst_ratio, "worst_ms_1M": worst_1m,
              "target_met": ok}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"chart {args.width}x{args.height}, median of {args.repeat} frames, "
              f"an eval round every {args.eval_every} steps ({len(series['1M'].evals)} points at 1M)")
        print(f"{'scope':<6}{'view':<6}{'1k steps':>10}{'1M steps':>10}{'ratio':>8}")
        for r in rows:
            print(f"{r['scope']:<6}{r['view']:<6}{r['ms_1k']:>8.2f}ms{r['ms_1M']:>8.2f}ms{r['ratio']:>8.2f}")
        print(f"1M-step series: {series['1M'].nbytes / 2**20:.1f} MiB; "
              f"target (1M within 1.5x of 1k, under 20 ms): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
