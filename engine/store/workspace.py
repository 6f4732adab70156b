"""The workspace folder: its layout, and creating one.

Every path the daemon, worker, CLI and TUI use is named here once, so the layout
in docs/architecture.md is the layout in the code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core import config as config_mod
from engine.core.atomic import writing

QUEUE_STATES = ("pending", "active", "done", "held", "failed", "rejected")


class WorkspaceError(Exception):
    pass


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Workspace":
        return cls(Path(root).absolute())

    @property
    def config_path(self) -> Path:
        return self.root / config_mod.CONFIG_NAME

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    def queue(self, state: str) -> Path:
        assert state in QUEUE_STATES, state
        return self.root / "queue" / state

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run_dir(self, job_id: str) -> Path:
        return self.runs / job_id

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def current_model_pointer(self) -> Path:
        return self.models / "current.json"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def eval_dir(self) -> Path:
        """The user's own fixed evaluation files: each valid *.jsonl (or .jsonl.gz, .jsonl.zst) is a source
        of the eval suite."""
        return self.root / "eval"

    @property
    def replay(self) -> Path:
        """The replay pool: a bounded sample of each accepted file's training examples (engine/quality/replay.py)."""
        return self.root / "replay"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def lock_path(self) -> Path:
        return self.state / "lock"

    @property
    def status_path(self) -> Path:
        return self.state / "status.json"

    @property
    def events_path(self) -> Path:
        return self.state / "events.jsonl"

    @property
    def hooks_log(self) -> Path:
        """What each alert hook run did (engine/ops/hooks.py): a header line per run, then its output."""
        return self.state / "hooks.log"

    @property
    def control_socket(self) -> Path:
        return self.state / "control.sock"

    @property
    def init_record(self) -> Path:
        """What `traind init` was given (`model_source`): an edit of model.source later is compared with it."""
        return self.state / "workspace.json"

    @property
    def daemon_record(self) -> Path:
        """What the daemon must remember across restarts: whether the user stopped the queue."""
        return self.state / "daemon.json"

    @property
    def worker_socket(self) -> Path:
        """Where rank 0 of several training processes connects (engine/worker/launch.py): events and control."""
        return self.state / "worker.sock"

    @property
    def fork_socket(self) -> Path:
        """Where the fork server takes requests for workers (engine/worker/forkserver.py)."""
        return self.state / "fork.sock"

    @property
    def fork_server_log(self) -> Path:
        return self.state / "forkserver.log"

    @property
    def worker_record(self) -> Path:
        """The running worker's pid, process group and start time, for recovery after a daemon crash."""
        return self.state / "worker.json"

    @property
    def idle_worker_log(self) -> Path:
        """Output of a warm worker before it is handed a job (then it writes to the job's worker.log)."""
        return self.state / "worker-idle.log"

    def folders(self) -> list[Path]:
        return [self.inbox, *(self.queue(s) for s in QUEUE_STATES), self.runs, self.models, self.eval_dir,
                self.replay, self.snapshots, self.state]

    def exists(self) -> bool:
        return self.config_path.is_file()

    def require(self) -> "Workspace":
        if not self.exists():
            raise WorkspaceError(f"{self.root}: not a traind workspace (no {config_mod.CONFIG_NAME}); create one with 'traind init {self.root}'")
        return self

    def load_config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    def load_section(self, name: str) -> Any:
        """traind.toml's [name] alone, for a command that needs nothing else (config.load_section)."""
        return config_mod.load_section(self.config_path, name)

    def create_folders(self) -> None:
        for folder in self.folders():
            with writing(folder):
                folder.mkdir(parents=True, exist_ok=True)
        with writing(self.lock_path):
            self.lock_path.touch(exist_ok=True)

    def relative(self, path: str | os.PathLike) -> str:
        """A path as people see it in messages: relative to the workspace where it is inside it."""
        try:
            return str(Path(path).absolute().relative_to(self.root))
        except ValueError:
            return str(path)


def resolve_root(arg: str | None) -> Path:
    """-w/--workspace, else $TRAIND_HOME, else the current directory."""
    return Path(arg or os.environ.get("TRAIND_HOME") or os.getcwd())
