"""What the TUI costs: first frame, CPU while a job trains, memory with a 1M-step history, latency.

One run measures, each in fresh processes where it matters:

1. first frame: wall time from starting a process to the app's first `on_ready`
   (headless `run_test`, 160x48, frozen data, `start_daemon=False`), median
   of `--first-frame-runs` subprocesses. Target: under 1 s.
2. CPU while training: a feeder subprocess holds the workspace lock
   (`engine.store.lock.DaemonLock`), appends a `step` line to
   runs/00001-x/metrics.jsonl every 25 ms (40 steps/s, fsynced once a second)
   and replaces state/status.json atomically once a second; the UI runs
   headless in another subprocess with the real reader for `--seconds`. The
   UI process's CPU time (user+system) over wall time, as % of one core.
   Target: under 3%. Headless has no terminal to write to, so the same is
   measured again with the real `traind -w WS --no-start` in a tmux pane of
   the same size (skipped without tmux): that figure includes writing the
   screen updates to a terminal.
3. RSS with a 1M-step history: metrics.jsonl holds `--steps` step events; the
   UI starts headless, and once the chart's series holds them all the process
   RSS (and peak RSS, VmHWM) is read, with the time the history took to load;
   side by side with a 1k-step history.
4. latency, in-process (`run_test`) on a live workspace: one appended step
   line with a distinctive step number until the chart has drawn it (a
   `render_chart` call whose series holds it, and `draws` increased), median
   of `--latency-trials`; and the lock holder's kill -9 until the screen has
   class "-offline", median of `--death-trials`. Goals: drawn within 1 s
   (the reader wakes twice a second while data flows, the chart redraws once a second),
   death shown within 2 s.

    .venv/bin/python bench/tui_cost.py [--seconds 60] [--steps 1000000] [--json]
    .venv/bin/python bench/tui_cost.py --before ../old-checkout [--seconds 20] [--rounds 3]   # tmux CPU only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SIZE = (160, 48)
JOB = "00001-x"
STEP_INTERVAL = 0.025
FIRST_FRAME_TARGET_S = 1.0
CPU_TARGET_PCT = 3.0
DRAW_GOAL_S = 1.0
DEATH_GOAL_S = 2.0


def emit(**doc) -> None:
    print(json.dumps(doc), flush=True)


def step_line(step: int, t: float) -> str:
    loss = 1.8 + 1.6 / (1 + step / 250) + 0.05 * ((step * 7919) % 13) / 13
    return (f'{{"event": "step", "time": {t:.3f}, "step": {step}, "total_steps": 2000000, "epoch": {step / 2e6:.6f}, '
            f'"loss": {loss:.4f}, "learning_rate": 2e-05, "grad_norm": 0.8, "tokens_per_s": 15000.0, '
            f'"tokens_seen": {step * 16384}}}\n')


def job_start_line(t: float) -> str:
    return json.dumps({"event": "job_start", "time": t, "job_id": JOB, "total_steps": 2_000_000,
                       "resumed_from_step": 0, "examples": 12000}) + "\n"


def write_history(ws, steps: int) -> Path:
    """metrics.jsonl with a job_start and `steps` step events, written in bulk."""
    run = ws.run_dir(JOB)
    run.mkdir(parents=True, exist_ok=True)
    path = run / "metrics.jsonl"
    t0 = time.time() - steps * STEP_INTERVAL
    with open(path, "w") as f:
        f.write(job_start_line(t0))
        for lo in range(1, steps + 1, 100_000):
            f.write("".join([step_line(s, t0 + s * STEP_INTERVAL) for s in range(lo, min(steps, lo + 99_999) + 1)]))
    return path


def status_doc(ws, step: int) -> dict:
    from fake_daemon import frozen_status

    doc = frozen_status(ws)
    now = time.time()
    doc["updated_at"] = now
    doc["daemon"].update(pid=os.getpid(), since=now, started_at=now)
    doc["daemon"].pop("running", None)  # the daemon does not write it; `traind status` and the reader add it
    doc["job"].update(id=JOB, original_name="x.jsonl", step=step, total_steps=2_000_000)
    return doc


def new_ws(parent: Path, name: str):
    from workspaces import make_workspace

    return make_workspace(parent / name)


def rss_peak(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Children (this script run with --child MODE)


def child_first_frame(ws_root: str) -> None:
    from engine.store.workspace import Workspace
    from fake_daemon import NOW, FrozenSource
    from tui.app import TraindApp

    class App(TraindApp):
        def on_ready(self) -> None:
            emit(ready=time.time())
            self.exit()

    ws = Workspace.at(ws_root)

    async def main() -> None:
        app = App(ws, start_daemon=False, source=FrozenSource(ws), clock=lambda: NOW)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.05)

    asyncio.run(main())


def child_ui(ws_root: str, target: int) -> None:
    """The UI on the workspace with its real reader until a line arrives on stdin."""
    from engine.store.workspace import Workspace
    from tui.app import TraindApp
    from tui.widgets.loss_chart import LossChart

    ready = asyncio.Event()

    class App(TraindApp):
        def on_ready(self) -> None:
            emit(ready=time.time())
            ready.set()

    async def main() -> None:
        app = App(Workspace.at(ws_root), start_daemon=False)
        async with app.run_test(size=SIZE):
            await ready.wait()
            chart = app.screen.query_one(LossChart)
            if target:
                while len(chart.series) < target:
                    await asyncio.sleep(0.02)
                emit(loaded=time.time(), points=len(chart.series), series_bytes=chart.series.nbytes)
            await asyncio.to_thread(sys.stdin.readline)
            emit(points=len(chart.series), draws=chart.draws, offline=app.screen.has_class("-offline"))

    asyncio.run(main())


def child_feeder(ws_root: str) -> None:
    """A training daemon's writes: the lock, a step line every 25 ms, status.json once a second."""
    from engine.core.atomic import write_json_atomic
    from engine.store.lock import DaemonLock
    from engine.store.workspace import Workspace

    ws = Workspace.at(ws_root)
    DaemonLock(ws.lock_path, ws.root).acquire()
    run = ws.run_dir(JOB)
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, job_start_line(time.time()).encode())
    write_json_atomic(ws.status_path, status_doc(ws, 0))
    emit(locked=os.getpid())
    start = time.monotonic()
    next_status = start + 1.0
    step = 0
    while True:
        step += 1
        os.write(fd, step_line(step, time.time()).encode())
        now = time.monotonic()
        if now >= next_status:
            os.fsync(fd)
            write_json_atomic(ws.status_path, status_doc(ws, step))
            next_status += 1.0
        delay = start + step * STEP_INTERVAL - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def child_holder(ws_root: str) -> None:
    from engine.store.lock import DaemonLock
    from engine.store.workspace import Workspace

    ws = Workspace.at(ws_root)
    DaemonLock(ws.lock_path, ws.root).acquire()
    emit(locked=os.getpid())
    while True:
        signal.pause()


# ---------------------------------------------------------------------------------------------
# The parent


def spawn(mode: str, ws_root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--ws", str(ws_root), *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def read_msg(proc: subprocess.Popen, key: str) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited ({proc.wait()}) before reporting {key!r}")
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in doc:
            return doc


def finish(proc: subprocess.Popen, quit_ui: bool = False) -> dict | None:
    doc = None
    try:
        if quit_ui:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            doc = read_msg(proc, "draws")
            proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return doc


def first_frame(tmp: Path, runs: int) -> dict:
    from engine.store.workspace import Workspace

    ws = Workspace.at(tmp / "frozen")
    ws.create_folders()
    times = []
    for _ in range(runs):
        t0 = time.time()
        proc = spawn("first-frame", ws.root)
        times.append(read_msg(proc, "ready")["ready"] - t0)
        proc.wait(30)
    return {"runs_s": times, "median_s": statistics.median(times), "target_s": FIRST_FRAME_TARGET_S,
            "target_met": statistics.median(times) < FIRST_FRAME_TARGET_S}


def cpu_while_training(tmp: Path, seconds: float) -> dict:
    import psutil

    ws = new_ws(tmp, "training")
    feeder = spawn("feeder", ws.root)
    ui = None
    try:
        read_msg(feeder, "locked")
        ui = spawn("ui", ws.root)
        read_msg(ui, "ready")
        time.sleep(2.0)  # past the start-up and the first history read
        p, f = psutil.Process(ui.pid), psutil.Process(feeder.pid)
        c0, fc0, w0 = p.cpu_times(), f.cpu_times(), time.monotonic()
        time.sleep(seconds)
        c1, fc1, w1 = p.cpu_times(), f.cpu_times(), time.monotonic()
        end = finish(ui, quit_ui=True)
        ui = None
    finally:
        if ui is not None:
            finish(ui)
        finish(feeder)
    wall = w1 - w0
    ui_cpu = (c1.user + c1.system) - (c0.user + c0.system)
    feeder_cpu = (fc1.user + fc1.system) - (fc0.user + fc0.system)
    pct = 100 * ui_cpu / wall
    return {"seconds": wall, "ui_cpu_s": ui_cpu, "ui_cpu_percent": pct, "feeder_cpu_percent": 100 * feeder_cpu / wall,
            "steps_per_s": 1 / STEP_INTERVAL, "points_at_end": end["points"], "chart_draws": end["draws"],
            "offline_at_end": end["offline"], "target_percent": CPU_TARGET_PCT, "target_met": pct < CPU_TARGET_PCT,
            "headless": True}


def cpu_in_tmux(tmp: Path, seconds: float, checkout: Path = ROOT) -> dict | None:
    """As `cpu_while_training`, with the real UI command in a tmux pane: terminal output included.
    `checkout`: the tree whose UI runs (another one: `--before`)."""
    import psutil

    if shutil.which("tmux") is None:
        return None
    ws = new_ws(tmp, f"tmux-{time.monotonic_ns()}")
    feeder = spawn("feeder", ws.root)
    tmux = ["tmux", "-L", f"traind-bench-{os.getpid()}"]
    ui = [sys.executable, "-m", "tui.cli", "--no-start", "-w", str(ws.root)]
    try:
        read_msg(feeder, "locked")
        subprocess.run([*tmux, "new-session", "-d", "-s", "ui", "-x", str(SIZE[0]), "-y", str(SIZE[1]),
                        f"cd {shlex.quote(str(checkout))} && exec {shlex.join(ui)}"], check=True)
        pid = int(subprocess.run([*tmux, "display", "-p", "-t", "ui", "#{pane_pid}"], capture_output=True,
                                 text=True, check=True).stdout)
        deadline = time.monotonic() + 30
        while "step " not in subprocess.run([*tmux, "capture-pane", "-p", "-t", "ui"], capture_output=True,
                                            text=True).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("the UI did not show a step count in tmux within 30 s")
            time.sleep(0.2)
        time.sleep(2.0)
        p = psutil.Process(pid)
        c0, w0 = p.cpu_times(), time.monotonic()
        time.sleep(seconds)
        c1, w1 = p.cpu_times(), time.monotonic()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        finish(feeder)
    pct = 100 * ((c1.user + c1.system) - (c0.user + c0.system)) / (w1 - w0)
    return {"seconds": w1 - w0, "ui_cpu_percent": pct, "target_percent": CPU_TARGET_PCT,
            "target_met": pct < CPU_TARGET_PCT}


def history_memory(tmp: Path, steps: int) -> dict:
    import psutil

    ws = new_ws(tmp, f"history-{steps}")
    t = time.monotonic()
    path = write_history(ws, steps)
    gen_s = time.monotonic() - t
    t0 = time.time()
    ui = spawn("ui", ws.root, "--target", str(steps))
    try:
        ready = read_msg(ui, "ready")["ready"]
        loaded = read_msg(ui, "loaded")
        rss = psutil.Process(ui.pid).memory_info().rss
        peak = rss_peak(ui.pid)
        finish(ui, quit_ui=True)
    finally:
        finish(ui)
    return {"steps": steps, "file_bytes": path.stat().st_size, "generate_s": gen_s, "points": loaded["points"],
            "first_frame_s": ready - t0, "loaded_from_start_s": loaded["loaded"] - t0,
            "loaded_after_first_frame_s": loaded["loaded"] - ready, "rss_bytes": rss, "peak_rss_bytes": peak,
            "series_bytes": loaded["series_bytes"]}


async def latency(tmp: Path, trials: int, death_trials: int) -> dict:
    from engine.core.atomic import write_json_atomic
    from tui.app import TraindApp
    from tui.widgets import loss_chart
    from tui.widgets.loss_chart import LossChart

    ws = new_ws(tmp, "latency")
    write_history(ws, 1000)
    holder = spawn("holder", ws.root)
    read_msg(holder, "locked")
    write_json_atomic(ws.status_path, status_doc(ws, 1000))

    drawn: list[tuple[float, int | None]] = []  # (when, last step in the series) of each chart rebuild
    real_render = loss_chart.render_chart

    def recording_render(series, *a, **kw):
        out = real_render(series, *a, **kw)
        drawn.append((time.perf_counter(), int(series.steps.view[-1]) if len(series) else None))
        return out

    loss_chart.render_chart = recording_render

    async def until(predicate, timeout: float):
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if value := predicate():
                return value
            await asyncio.sleep(0.005)
        raise TimeoutError

    metrics = ws.run_dir(JOB) / "metrics.jsonl"
    draw_s: list[float] = []
    death_s: list[float] = []
    rng = random.Random(0)
    app = TraindApp(ws, start_daemon=False)
    try:
        async with app.run_test(size=SIZE):
            chart = app.screen.query_one(LossChart)
            await until(lambda: len(chart.series) >= 1000 and app.screen.running, 10)
            for i in range(trials):
                await asyncio.sleep(rng.uniform(0.3, 0.8))  # vary the phase against the redraws and the watcher
                step = 10_000_000 + i
                draws_before, n_before = chart.draws, len(drawn)
                fd = os.open(metrics, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, step_line(step, time.time()).encode())
                    t0 = time.perf_counter()
                finally:
                    os.close(fd)
                when = await until(lambda: next((t for t, last in drawn[n_before:] if last is not None and last >= step),
                                                None), 10)
                assert chart.draws > draws_before and step in chart.series.steps.view[-5:]
                draw_s.append(when - t0)
            for i in range(death_trials):
                if i:
                    holder = spawn("holder", ws.root)
                    read_msg(holder, "locked")
                await until(lambda: app.screen.running and not app.screen.has_class("-offline"), 10)
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                holder.kill()  # SIGKILL: the kernel drops the flock
                t0 = time.perf_counter()
                await until(lambda: app.screen.has_class("-offline"), 10)
                death_s.append(time.perf_counter() - t0)
                holder.wait()
    finally:
        loss_chart.render_chart = real_render
        finish(holder)
    return {"draw_s": draw_s, "draw_median_s": statistics.median(draw_s), "draw_max_s": max(draw_s),
            "draw_goal_s": DRAW_GOAL_S, "draw_goal_met": statistics.median(draw_s) <= DRAW_GOAL_S,
            "death_s": death_s, "death_median_s": statistics.median(death_s), "death_max_s": max(death_s),
            "death_goal_s": DEATH_GOAL_S, "death_goal_met": max(death_s) <= DEATH_GOAL_S}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the CPU measurement runs")
    parser.add_argument("--steps", type=int, default=1_000_000, help="the big history")
    parser.add_argument("--first-frame-runs", type=int, default=5)
    parser.add_argument("--latency-trials", type=int, default=20)
    parser.add_argument("--death-trials", type=int, default=5)
    parser.add_argument("--before", type=Path, help="another checkout (e.g. `git worktree add` of an older "
                        "commit): only the tmux CPU figure, of it and of this tree, alternately")
    parser.add_argument("--rounds", type=int, default=3, help="with --before: measurements of each tree")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ws", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"first-frame": lambda: child_first_frame(args.ws), "ui": lambda: child_ui(args.ws, args.target),
         "feeder": lambda: child_feeder(args.ws), "holder": lambda: child_holder(args.ws)}[args.child]()
        return 0

    if args.before:
        return compare_in_tmux(args.before.resolve(), args.seconds, args.rounds, args.json)

    with tempfile.TemporaryDirectory(prefix="traind-tui-cost-") as d:
        tmp = Path(d)
        ff = first_frame(tmp, args.first_frame_runs)
        cpu = cpu_while_training(tmp, args.seconds)
        term = cpu_in_tmux(tmp, args.seconds)
        mem = [history_memory(tmp, 1_000), history_memory(tmp, args.steps)]
        lat = asyncio.run(latency(tmp, args.latency_trials, args.death_trials))
    ok = (ff["target_met"] and cpu["target_met"] and (term is None or term["target_met"]) and lat["draw_goal_met"]
          and lat["death_goal_met"])
    result = {"cpus": os.cpu_count(), "size": list(SIZE), "first_frame": ff, "cpu_while_training": cpu,
              "cpu_in_tmux": term, "history": mem, "latency": lat, "targets_met": ok}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if ok else 1

    def mark(good: bool) -> str:
        return "met" if good else "NOT met"

    mib = 2**20
    print(f"TUI cost, {SIZE[0]}x{SIZE[1]} headless, {os.cpu_count()} CPUs")
    print(f"first frame       median {ff['median_s'] * 1e3:.0f} ms of {len(ff['runs_s'])} processes "
          f"({', '.join(f'{t * 1e3:.0f}' for t in ff['runs_s'])} ms); target < 1 s: {mark(ff['target_met'])}")
    print(f"CPU, training     UI {cpu['ui_cpu_percent']:.2f}% of a core over {cpu['seconds']:.0f} s at 40 steps/s "
          f"(feeder {cpu['feeder_cpu_percent']:.2f}%, {cpu['points_at_end']} points, {cpu['chart_draws']} draws); "
          f"target < 3%: {mark(cpu['target_met'])} (headless: no terminal output cost)")
    if term is None:
        print("CPU, in tmux      skipped: tmux is not installed")
    else:
        print(f"CPU, in tmux      UI {term['ui_cpu_percent']:.2f}% of a core over {term['seconds']:.0f} s, "
              f"`traind --no-start` in a {SIZE[0]}x{SIZE[1]} pane; target < 3%: {mark(term['target_met'])}")
    a, b = mem
    print(f"{'history':<18}{'1k steps':>12}{compact(b['steps']) + ' steps':>14}{'ratio':>8}")
    for label, key, scale, unit in (("RSS", "rss_bytes", mib, "MiB"), ("peak RSS", "peak_rss_bytes", mib, "MiB"),
                                    ("series arrays", "series_bytes", mib, "MiB"),
                                    ("load after 1st fr.", "loaded_after_first_frame_s", 1, "s"),
                                    ("load from start", "loaded_from_start_s", 1, "s"),
                                    ("first frame", "first_frame_s", 1, "s"),
                                    ("metrics.jsonl", "file_bytes", mib, "MiB")):
        x, y = (a[key] or 0) / scale, (b[key] or 0) / scale
        print(f"  {label:<16}{x:>8.2f} {unit:<3}{y:>10.2f} {unit:<3}{(y / x if x else float('nan')):>8.1f}")
    print(f"new step drawn    median {lat['draw_median_s'] * 1e3:.0f} ms, max {lat['draw_max_s'] * 1e3:.0f} ms "
          f"of {len(lat['draw_s'])}; goal < 1 s: {mark(lat['draw_goal_met'])}")
    print(f"daemon death      median {lat['death_median_s'] * 1e3:.0f} ms, max {lat['death_max_s'] * 1e3:.0f} ms "
          f"of {len(lat['death_s'])}; goal < 2 s: {mark(lat['death_goal_met'])}")
    return 0 if ok else 1


def compare_in_tmux(before: Path, seconds: float, rounds: int, as_json: bool) -> int:
    """The tmux CPU figure of `before`'s UI and this tree's, alternating, `rounds` each: both see the
    same machine load, so the ratio means more than either figure alone."""
    runs: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="traind-tui-cost-") as d:
        for _ in range(rounds):
            for name, tree in (("before", before), ("after", ROOT)):
                result = cpu_in_tmux(Path(d), seconds, tree)
                if result is None:
                    raise SystemExit("tmux is not installed")
                runs[name].append(result["ui_cpu_percent"])
    med = {name: statistics.median(v) for name, v in runs.items()}
    result = {"seconds": seconds, "size": list(SIZE), "runs_percent": runs, "median_percent": med,
              "ratio": med["after"] / med["before"], "target_percent": CPU_TARGET_PCT,
              "target_met": med["after"] < CPU_TARGET_PCT, "load_average": os.getloadavg()}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("before", "after"):
            print(f"{name:<7} {med[name]:.2f}% of a core, median of "
                  f"{', '.join(f'{v:.2f}' for v in runs[name])} ({seconds:.0f} s each, {SIZE[0]}x{SIZE[1]} tmux pane)")
        print(f"ratio   {result['ratio']:.2f}; target < 3%: {'met' if result['target_met'] else 'NOT met'}; "
              f"load average {result['load_average'][0]:.1f}")
    return 0 if result["target_met"] else 1


def compact(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else str(n)


if __name__ == "__main__":
    sys.exit(main())
