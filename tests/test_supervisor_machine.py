"""The daemon under any sequence of what users, the machine and faults do to it: a Hypothesis state machine.

Each example is one workspace on its own small tmpfs and a real `traind daemon` running the scripted fake worker.
Each rule is a real action on the running system: a file dropped into the inbox (valid; invalid; or valid while
an `eval/` source its candidate forgets makes the gate hold it); kill -9 of the worker; kill -9 of the daemon and
a new one started; the daemon stopped and started again with a NaN injected (at one step of every job, or at the
first step of every attempt); the disk filled and freed (ENOSPC for every process); time passing; and the
commands through the CLI, waited for or left in flight while the next rules act: pause, resume, stop, start,
checkpoint, skip, snapshot, rollback to one of those snapshots, promote a held file (with or without --force).
A command may be refused; it must answer, with no traceback, and break nothing.

After every rule, with the daemon frozen by SIGSTOP so its files are read at one instant: it is alive; every file
dropped is in exactly one place (the inbox or one queue folder); state/status.json parses; models/current.json
names one existing, complete model version; every checkpoint and model marker and every metrics line is finite
JSON, no attempt saved a checkpoint after its NaN, and nothing of a failed or rejected file was published. Within
the rules: the daemon answers on a full disk and unblocks by itself once it is freed; a killed daemon's worker is
gone once the next daemon has started; a snapshot taken has its manifest; a promoted file is in done/. At the
end, the disk freed and the queue released: every file ends in done/, held/, failed/ or rejected/ (the last three
with a reason), a trained file was trained to the end exactly once and its model is in models/, and the daemon
stops cleanly (exit 0) and its worker with it. These are docs/reliability.md's promises, checked across
interleavings nobody wrote down, rather than the chosen ones of the other tests.

make test runs a few short sequences (a failing one is printed as it ran); TRAIND_THOROUGH=1 (make test-thorough,
make chaos) runs many longer ones and shrinks a failing one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from budget import THOROUGH
from conftest import fill_disk
from workspaces import ROOT, daemon_env, drop, make_workspace, run_cli, start_daemon, stop_daemon, text_lines, wait_for

EXAMPLES, STEPS, FILES = (25, 25, 10) if THOROUGH else (4, 8, 5)  # sequences, rules in each, files dropped at most
QUEUES = ("pending", "active", "done", "held", "failed", "rejected")
FINAL = ("done", "held", "failed", "rejected")
JOB_STEPS = 30
FORGETS = "forget.jsonl"  # in eval/: a source every candidate forgets (eval_after), so the gate holds it
SCRIPT = {"steps": JOB_STEPS, "step_seconds": 0.04, "checkpoint_every": 5, "eval_after": {"eval/forget": 9.0},
          "need_free_bytes": 256 * 1024}  # a checkpoint waits for room, as the real worker's disk gate does
CONFIG = {"jobs": {"max_attempts": 5, "stop_grace_seconds": 5.0}, "inbox": {"settle_seconds": 0.2},
          "disk": {"reserve": 0}, "guard": {"max_rollbacks": 2}}
# A valid file; one while eval/ holds a source its candidate forgets (the gate holds it); an invalid one.
KINDS = st.sampled_from(("plain", "forgets", "plain", "invalid"))
WAIT = 60.0  # a bound on what normally takes a second: two cores shared with other test processes


def _strict(text: str):
    """JSON with NaN and Infinity refused, and every number finite (1e999 parses as inf)."""
    def refuse(constant):
        raise ValueError(f"non-finite constant {constant}")

    doc = json.loads(text, parse_constant=refuse)
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, float):
            assert math.isfinite(value), f"non-finite number in {text[:200]}"
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return doc


def _start_ticks(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def guarded(function):
    """A rule that failed leaves the machine `broken`: its teardown then only cleans up."""
    @functools.wraps(function)
    def run(self, *args, **kwargs):
        try:
            return function(self, *args, **kwargs)
        except BaseException:
            self.broken = True
            raise
    return run


class DaemonMachine(RuleBasedStateMachine):
    snapshots = Bundle("snapshots")

    def __init__(self, base: Path, endings: list[dict[str, int]]):
        super().__init__()
        self.endings = endings  # where each drained sequence's files ended: {queue folder: files}
        self.dir = Path(tempfile.mkdtemp(prefix="m-", dir=base))
        self.mount: Path | None = self.dir / "fs"
        self.mount.mkdir()
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(self.mount)],
                                     capture_output=True).returncode == 0
        except OSError:
            mounted = False
        if not mounted:  # not root: the disk rules are left out, the rest runs on the plain disk
            self.mount = None
        self.ws = None
        self.proc: subprocess.Popen | None = None
        self.added: list[str] = []
        self.filler: Path | None = None
        self.snaps = 0
        self.sent: list[tuple[tuple[str, ...], subprocess.Popen]] = []  # commands still waiting for their answer
        self.broken = False  # a rule or an invariant failed: teardown only cleans up

    # -- helpers --------------------------------------------------------------------------------

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """A command, waited for: answered (done or refused, exit 0 or 1) with a sentence and no traceback."""
        result = run_cli(*args, "-w", str(self.ws.root), timeout=WAIT)
        return self.answered(args, result.returncode, result.stdout + result.stderr)

    def send(self, *args: str, background: bool) -> subprocess.CompletedProcess | None:
        """A command, or (background) one left running while the next rules act: a kill, a restart or another
        command lands while it is in flight. Its answer is checked when it comes (see `collect`)."""
        if not background:
            return self.cli(*args)
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args, "-w", str(self.ws.root)], env=daemon_env(),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sent.append((args, proc))
        if len(self.sent) > 3:
            self.collect(1)
        return None

    def collect(self, n: int | None = None) -> None:
        """The answers of the oldest n commands sent in the background (all of them by default)."""
        while self.sent and (n is None or n > 0):
            args, proc = self.sent.pop(0)
            said, _ = proc.communicate(timeout=WAIT)
            self.answered(args, proc.returncode, said)
            n = None if n is None else n - 1

    def answered(self, args: tuple[str, ...], code: int, said: str) -> subprocess.CompletedProcess:
        assert code in (0, 1) and "Traceback" not in said and said.strip(), \
            f"traind {' '.join(args)}: exit {code}: {said[-2000:]}"
        return subprocess.CompletedProcess(args, code, said, "")

    def live(self) -> dict:
        """The daemon's own status, asked over its socket (status.json cannot be replaced on a full disk)."""
        result = run_cli("status", "--json", "-w", str(self.ws.root), timeout=WAIT)
        try:
            return json.loads(result.stdout)["daemon"]
        except (ValueError, KeyError, TypeError):
            return {}

    def status_file(self) -> dict:
        try:
            return json.loads(self.ws.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def start(self, script: dict | None = None) -> None:
        hooks = {"fake": {**SCRIPT, **(script or {})}}
        for again in (False, True):
            self.proc = proc = start_daemon(self.ws, hooks=hooks)
            wait_for(lambda p=proc: p.poll() is not None or self.up(p), timeout=WAIT, what="the daemon to start")
            if proc.poll() is None:
                return
            # A command sent while no daemon ran works under the workspace lock, and a daemon started meanwhile
            # is refused (one daemon per workspace; on a full disk its log may not say so): once the command is
            # done, it starts.
            refused = "another traind daemon" in self.log_tail()[-500:] or self.filler is not None
            assert refused and self.sent and not again, \
                f"the daemon exited {proc.returncode} while starting: {self.log_tail()}"
            self.collect()

    def up(self, proc: subprocess.Popen) -> bool:
        if self.filler is not None:  # it starts blocked and answers; its status file cannot be written
            return self.live().get("pid") == proc.pid
        d = self.status_file().get("daemon") or {}
        return d.get("pid") == proc.pid and d.get("state") != "starting"

    def log_tail(self) -> str:
        try:
            return (self.ws.root / "daemon.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def located(self) -> dict[str, list[str]]:
        """Where each dropped file is: the inbox, or the queue folders whose entry was claimed from it."""
        found: dict[str, list[str]] = {name: [] for name in self.added}
        for name in os.listdir(self.ws.inbox):
            if name in found:
                found[name].append("inbox")
        for state in QUEUES:
            for entry in os.listdir(self.ws.queue(state)):
                if entry.startswith(".") or entry.endswith(".reason.json"):
                    continue
                original = entry[6:]  # NNNNN-NAME: a claimed file keeps its name after its number
                record = self.ws.run_dir(entry[: -len(".jsonl")]) / "job.json"
                if record.exists():
                    assert json.loads(record.read_text())["original_name"] == original, f"{record} names another file"
                found.setdefault(original, []).append(state)
        return found

    def in_flight(self) -> bool:
        """Whether a file is still in the inbox, pending or active."""
        return bool(set(os.listdir(self.ws.inbox)) & set(self.added)
                    or any(not e.startswith(".") for s in ("pending", "active") for e in os.listdir(self.ws.queue(s))))

    def job_of(self, name: str, state: str) -> str:
        [entry] = [e for e in os.listdir(self.ws.queue(state)) if e[6:] == name]
        return entry[: -len(".jsonl")]

    def recorded_worker(self) -> tuple[int, int] | None:
        """(pid, start time) of the worker state/worker.json names, if that process still runs."""
        try:
            record = json.loads(self.ws.worker_record.read_text())
        except (OSError, ValueError):
            return None
        alive = _start_ticks(record["pid"]) == record["start_ticks"] and _proc_state(record["pid"]) != "Z"
        return (record["pid"], record["start_ticks"]) if alive else None

    def gone(self, worker: tuple[int, int], what: str) -> None:
        pid, ticks = worker
        wait_for(lambda: _start_ticks(pid) != ticks or _proc_state(pid) == "Z", timeout=10, what=what)

    def worker(self) -> int | None:
        """The worker's pid, from status.json, if that process is still the one state/worker.json recorded."""
        pid = (self.status_file().get("daemon") or {}).get("worker_pid")
        try:
            record = json.loads(self.ws.worker_record.read_text())
        except (OSError, ValueError):
            return None
        if pid is None or record.get("pid") != pid or _start_ticks(pid) != record.get("start_ticks"):
            return None
        return pid

    # -- rules ----------------------------------------------------------------------------------

    @initialize(warm=st.booleans(), files=st.lists(KINDS, min_size=1, max_size=3))
    @guarded
    def begin(self, warm: bool, files: list[str]) -> None:
        settings = {**CONFIG, "jobs": {**CONFIG["jobs"], "warm_worker": warm}}
        self.ws = make_workspace((self.mount or self.dir) / "ws", settings)
        for kind in files:
            self.add(kind)
        self.start()

    def add(self, kind: str) -> None:
        name = f"f{len(self.added):03d}-{kind}.jsonl"
        eval_file = self.ws.eval_dir / FORGETS
        if kind == "forgets":  # from now on, candidates forget this source: the gate holds them
            self.ws.eval_dir.mkdir(exist_ok=True)
            eval_file.write_text("".join(json.dumps({"text": f"general {i}"}) + "\n" for i in range(4)))
        elif kind == "plain":
            eval_file.unlink(missing_ok=True)
        lines = [f"not json {name}"] if kind == "invalid" else text_lines(4, prefix=name)
        drop(self.ws, name, lines)
        self.added.append(name)

    @precondition(lambda self: self.filler is None and len(self.added) < FILES)  # on a full disk the test's write fails
    @rule(kind=KINDS)
    @guarded
    def add_file(self, kind: str) -> None:
        self.add(kind)

    @rule()
    @guarded
    def kill_worker(self) -> None:
        """kill -9 of the worker status.json names, if one runs (preconditions read no files: a replay of an
        example must choose the same rules)."""
        pid = self.worker()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @rule()
    @guarded
    def kill_daemon_and_restart(self) -> None:
        worker = self.recorded_worker()
        self.proc.kill()
        self.proc.wait(WAIT)
        self.start()
        if worker is not None and self.filler is None:  # recovered: its predecessor's worker is gone
            self.gone(worker, "the killed daemon's worker to be gone once the next one started")

    @rule(step=st.integers(1, JOB_STEPS), every_attempt=st.booleans())
    @guarded
    def restart_with_nan(self, step: int, every_attempt: bool) -> None:
        """A daemon whose workers report a NaN: at one step of every job (a rollback skips past it), or at the
        first step of every attempt (the file fails after guard.max_rollbacks). It lasts until the next restart."""
        worker = self.recorded_worker()
        code = stop_daemon(self.proc, timeout=WAIT)
        assert code == 0 or self.filler is not None, f"SIGTERM: the daemon exited {code}: {self.log_tail()}"
        if worker is not None:
            self.gone(worker, "the worker to end with its daemon")
        self.start({"anomaly_every": True} if every_attempt else {"anomaly_at": step})

    @precondition(lambda self: self.mount is not None and self.filler is None)
    @rule()
    @guarded
    def fill_the_disk(self) -> None:
        self.filler = fill_disk(self.mount)
        assert self.live().get("pid") == self.proc.pid, "the daemon does not answer on a full disk"

    @precondition(lambda self: self.filler is not None)
    @rule()
    @guarded
    def free_the_disk(self) -> None:
        self.free()

    def free(self) -> None:
        self.filler.unlink()
        self.filler = None
        # It goes on by itself: no longer blocked once writing works again (and its worker has room).
        wait_for(lambda: self.live().get("state") != "blocked", timeout=WAIT, what="the daemon to unblock",
                 interval=0.2)

    @rule(background=st.booleans())
    @guarded
    def pause(self, background: bool) -> None:
        self.send("pause", background=background)

    @rule(background=st.booleans())
    @guarded
    def resume(self, background: bool) -> None:
        self.send("resume", background=background)

    @rule(background=st.booleans())
    @guarded
    def stop(self, background: bool) -> None:
        self.send("stop", background=background)

    @rule(background=st.booleans())
    @guarded
    def start_queue(self, background: bool) -> None:
        self.send("start", background=background)

    @rule(background=st.booleans())
    @guarded
    def checkpoint(self, background: bool) -> None:
        self.send("checkpoint", background=background)

    @rule(background=st.booleans())
    @guarded
    def skip(self, background: bool) -> None:
        self.send("skip", background=background)

    @rule(target=snapshots, background=st.booleans())
    @guarded
    def snapshot(self, background: bool):
        self.snaps += 1
        name = f"snap-{self.snaps}"
        answer = self.send("snapshot", "--name", name, background=background)
        if answer is not None and answer.returncode == 0:
            assert (self.ws.snapshots / name / "manifest.json").exists(), f"snapshot {name} taken without its manifest"
        return name  # refused (a full disk): a rollback to it is refused in turn

    @rule(name=snapshots, background=st.booleans())
    @guarded
    def rollback(self, name: str, background: bool) -> None:
        self.send("rollback", name, background=background)

    @precondition(lambda self: any(name.endswith("-forgets.jsonl") for name in self.added))
    @rule(which=st.integers(0, 7), force=st.booleans(), background=st.booleans())
    @guarded
    def promote(self, which: int, force: bool, background: bool) -> None:
        """A held file's model made current, once the gate has held one (waited for up to 3 s)."""
        def listing() -> list[str]:
            return sorted(e[: -len(".jsonl")] for e in os.listdir(self.ws.queue("held")) if e.endswith(".jsonl"))

        try:
            wait_for(lambda: listing() or not self.in_flight(), timeout=3, what="a held file")
        except AssertionError:
            return  # none yet: stopped, paused or blocked
        if held := listing():
            job = held[which % len(held)]
            answer = self.send("promote", *(["--force"] if force else []), job, background=background)
            if answer is not None and answer.returncode == 0:
                assert (self.ws.queue("done") / f"{job}.jsonl").exists(), f"{job} promoted, its file not in done/"

    @precondition(lambda self: self.added)
    @rule()
    @guarded
    def let_it_train(self) -> None:
        """Time passes: until one more file ends (done, held, failed or rejected), or 3 s."""
        ended = lambda: sum(len(os.listdir(self.ws.queue(s))) for s in FINAL)  # noqa: E731
        before = ended()
        try:
            wait_for(lambda: ended() > before or not self.in_flight(), timeout=3, what="a file to end")
        except AssertionError:
            pass  # stopped, paused or blocked: a fine outcome here

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    @guarded
    def holds(self) -> None:
        if self.proc is None:
            return
        assert self.proc.poll() is None, f"the daemon died (exit {self.proc.returncode}): {self.log_tail()}"
        os.kill(self.proc.pid, signal.SIGSTOP)  # the files at one instant: nothing moves while they are read
        try:
            wait_for(lambda: _proc_state(self.proc.pid) in ("T", "t", None), timeout=10, interval=0.001,
                     what="the daemon to stop")
            self.check_files()
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def check_files(self) -> None:
        ws = self.ws
        for name, where in self.located().items():
            assert len(where) == 1, f"{name} is in {where or 'no folder'}"
        if ws.status_path.exists():
            assert isinstance(json.loads(ws.status_path.read_text())["daemon"], dict)
        pointer = json.loads(ws.current_model_pointer.read_text())
        version, path = pointer["version"], Path(pointer["path"])
        folder = path if path.is_absolute() else ws.root / path
        assert folder.is_dir() and folder.name == version and folder.parent == ws.models, pointer
        assert (folder / "config.json").exists(), f"current model {version} has no config.json"
        assert version == "base-fake" or (folder / "traind-model.json").exists(), f"current {version} is incomplete"
        # Nothing non-finite saved or published.
        for marker in [*ws.models.glob("*/traind-model.json"), *ws.runs.glob("*/checkpoints/*/traind-complete.json")]:
            _strict(marker.read_text())
        for metrics in ws.runs.glob("*/metrics.jsonl"):
            after_nan = False
            for line in metrics.read_text().splitlines():
                event = _strict(line)
                if event["event"] == "job_start":
                    after_nan = False
                elif event["event"] == "anomaly":
                    after_nan = True
                elif event["event"] == "checkpoint":
                    assert not after_nan, f"{metrics}: checkpoint at step {event['step']} saved after a NaN"
        ended_badly = {e[: -len(".jsonl")] for s in ("failed", "rejected") for e in os.listdir(ws.queue(s))
                       if e.endswith(".jsonl")}
        assert not ended_badly & {p.name for p in ws.models.iterdir()}, "a failed file's model was published"
        assert pointer.get("job_id") not in ended_badly, pointer

    # -- the end --------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if not self.broken and self.proc is not None:
                self.drain_and_stop()
        finally:
            self.clean_up()

    def drain_and_stop(self) -> None:
        ws = self.ws
        self.collect()
        if self.filler is not None:
            self.free()
        self.cli("start")
        self.cli("resume")
        unfinished = lambda: [n for n, w in self.located().items() if len(w) != 1 or w[0] not in FINAL]  # noqa: E731
        try:
            wait_for(lambda: not unfinished(), timeout=WAIT, what="the queue to drain")
        except AssertionError:
            raise AssertionError(f"not finished: {unfinished()}; {self.live()}; {self.log_tail()}") from None
        for name, [state] in self.located().items():
            job = self.job_of(name, state)
            record = json.loads((ws.run_dir(job) / "job.json").read_text())
            assert record["state"] == state, f"{name} is in {state}/, its record says {record['state']}"
            if state != "done":
                why = json.loads((ws.queue(state) / f"{job}.jsonl.reason.json").read_text())
                assert why.get("reason"), f"{name} in {state}/ without a reason: {why}"
            if state in ("done", "held"):  # trained to the end once, its model published
                attempts = record["attempts"]
                assert [a.get("outcome") for a in attempts].count("done") == 1, f"{name}: {attempts}"
                assert (ws.models / job / "traind-model.json").exists(), f"{name} is {state} without its model"
        held = {e[: -len(".jsonl")] for e in os.listdir(ws.queue("held")) if e.endswith(".jsonl")}
        current = json.loads(ws.current_model_pointer.read_text())
        assert current.get("job_id") not in held, f"the current model is a held file's: {current}"
        worker = self.recorded_worker()
        assert stop_daemon(self.proc, timeout=WAIT) == 0, self.log_tail()
        self.proc = None
        self.endings.append(dict(Counter(state for [state] in self.located().values())))
        if worker is not None:
            self.gone(worker, "the worker to end with its daemon")

    def clean_up(self) -> None:
        """Only what this example started: its commands, daemon, worker's group, tmpfs and folder."""
        for _, proc in self.sent:
            proc.kill()
            proc.communicate()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        try:
            record = json.loads(self.ws.worker_record.read_text()) if self.ws else {}
            if record and _start_ticks(record["pid"]) == record["start_ticks"]:
                os.killpg(record["pgid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
        if self.mount is not None:
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.fuzz
@pytest.mark.timeout(3600 if THOROUGH else 300)
def test_the_daemon_keeps_its_promises_whatever_happens_in_whatever_order():
    # Not under pytest's tmp_path: its depth (and pytest-xdist's popen-gwN) would take the control socket's path
    # past the 107 bytes a unix socket's may have.
    base = Path(tempfile.mkdtemp(prefix="traind-sm-"))
    try:
        endings = run_machine(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    # Every sequence ran to its end, and every file dropped in it ended done, held, failed or rejected.
    assert endings and all(sum(ended.values()) >= 1 for ended in endings), endings
    assert {state for ended in endings for state in ended} <= set(FINAL), endings


def run_machine(base: Path) -> list[dict[str, int]]:
    """Where each sequence's files ended, one entry a sequence that ran to its end."""
    endings: list[dict[str, int]] = []
    run_state_machine_as_test(
        lambda: DaemonMachine(base, endings),
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow],
                          # A failing sequence is printed as it ran; shrinking one (seconds a try) is for the
                          # thorough run.
                          phases=list(Phase) if THOROUGH else [Phase.explicit, Phase.reuse, Phase.generate]))
    return endings
