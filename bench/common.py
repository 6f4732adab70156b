"""What the benchmarks share: the tiny model, fresh workspaces pointing at it, waiting."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.store import models  # noqa: E402
from engine.core import config
from engine.store.workspace import Workspace  # noqa: E402


def build_tiny_model(target: Path) -> Path:
    subprocess.run([sys.executable, "-m", "engine.worker.tiny_model", str(target)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return target


def new_workspace(parent: Path, base_model: Path, settings: dict) -> Workspace:
    ws = Workspace.at(tempfile.mkdtemp(dir=parent))
    ws.create_folders()
    models.set_current(ws, "local", str(base_model), base_model.name)
    ws.config_path.write_text(config.render_template(config.from_dict(settings)))
    return ws


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(interval)
    raise TimeoutError
