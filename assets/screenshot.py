"""Make the README's pictures of the main screen, assets/screenshot-120x40.svg and
assets/screenshot-80x24.svg, from the app itself on a live demo workspace: the demo files trained, a
snapshot taken, a bigger file in training; the sizes one after the other.

    .venv/bin/python assets/screenshot.py [--size 120x40 --size 80x24] [--steps 600] [--out-dir assets]

Takes about a minute on a CPU; the workspace is a temporary folder, its daemon stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.store import lock  # noqa: E402
from engine.data import demo_data
from engine.store.workspace import Workspace  # noqa: E402


def traind(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=ROOT, check=True, capture_output=True, text=True)


def status(ws: Workspace) -> dict:
    return json.loads(traind("status", "--json", "-w", str(ws.root)).stdout)


async def capture(ws: Workspace, size: tuple[int, int], out: Path) -> None:
    """One picture of the UI on `ws` at `size` (columns, rows)."""
    from tui.app import TraindApp
    from tui.widgets.snapshot_panel import SnapshotPanel

    app = TraindApp(ws, start_daemon=False)
    async with app.run_test(size=size) as pilot:
        while not (app.screen.status and app.screen.query_one(SnapshotPanel).row_count):
            await pilot.pause(0.1)
        await pilot.pause(3.0)  # a few redraws, the listings polled again
        app.clear_notifications()
        await pilot.pause(0.2)
        out.write_text(app.export_screenshot(title="traind"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", help="COLSxROWS, once per picture (default: 120x40 and 80x24)")
    parser.add_argument("--steps", type=int, default=600, help="steps of the big file trained before the picture")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "assets")
    args = parser.parse_args()
    sizes = args.size or ["120x40", "80x24"]

    from tui.launcher import ensure_daemon

    with tempfile.TemporaryDirectory(prefix="traind-shot-") as tmp:
        ws = Workspace.at(Path(tmp) / "demo")
        traind("demo", "--headless", str(ws.root))  # the tiny model, three demo files trained
        if ensure_daemon(ws, wait=30.0) is None:
            raise SystemExit(f"no daemon started; see {ws.state / 'daemon.log'}")
        try:
            traind("snapshot", "--name", "first-round", "-w", str(ws.root))
            big = Path(tmp) / "big.jsonl"
            demo_data.write_demo_file(big, 40_000, "text", seed=7)
            traind("add", str(big), "-w", str(ws.root))
            while ((status(ws).get("job") or {}).get("step") or 0) < args.steps:
                time.sleep(1.0)
            for size in sizes:
                out = args.out_dir / f"screenshot-{size}.svg"
                asyncio.run(capture(ws, tuple(int(n) for n in size.split("x")), out))
                print(f"wrote {out}")
        finally:
            traind("shutdown", "-w", str(ws.root))
            for _ in range(100):
                if lock.holder(ws.lock_path) is None:
                    break
                time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
