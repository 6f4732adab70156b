"""The daemon and the CLI start fast: they never import torch or transformers, and engine/ never imports textual."""

import subprocess
import sys

from workspaces import ROOT

DAEMON_SIDE = ["engine.cli", "engine.supervisor.daemon", "engine.api.status", "engine.data.intake", "engine.data.validate", "engine.store.jobs",
               "engine.store.models", "engine.ops.worker_process", "engine.store.checkpoints", "engine.data.demo_data", "engine.api.control",
               "engine.supervisor.commands", "engine.supervisor.attempt", "engine.supervisor.outcomes", "engine.supervisor.intake_task", "engine.supervisor.recovery",
               "engine.supervisor.snapshot_task", "engine.core.aio", "engine.supervisor.preflight", "engine.core.gpu", "engine.core.resources",
               "engine.core.model_check", "engine.ops.memory", "engine.store.snapshots", "engine.store.verification", "engine.store.placing",
               "engine.store.retention", "engine.store.restore", "engine.store.schedule", "engine.core.hashing", "engine.tools.export", "engine.store.bases",
               "engine.tools.rebase", "engine.tools.evaluate", "engine.data.formats", "engine.tools.preview", "engine.core.console", "engine.api.follow", "engine.api.watching",
               "engine.ops.service", "tui"]


def test_daemon_and_cli_never_import_torch_transformers_or_textual():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in DAEMON_SIDE) +
            "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'tokenizers', 'peft', 'textual') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"imported by the daemon side: {out.stdout.strip()}"
