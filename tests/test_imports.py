"""The daemon and the CLI start fast: they never import torch or transformers, and engine/ never imports textual."""

import subprocess
import sys

from workspaces import ROOT

DAEMON_SIDE = ["engine.cli", "engine.daemon", "engine.status", "engine.intake", "engine.validate", "engine.jobs",
               "engine.models", "engine.worker_process", "engine.checkpoints", "engine.demo_data", "engine.control",
               "engine.commands", "engine.attempt", "engine.outcomes", "engine.intake_task", "engine.recovery",
               "engine.snapshot_task", "engine.aio", "engine.preflight", "engine.gpu", "engine.resources",
               "engine.model_check", "engine.memory", "engine.snapshots", "engine.verification", "engine.placing",
               "engine.retention", "engine.restore", "engine.schedule", "engine.hashing", "engine.export", "engine.bases",
               "engine.rebase", "engine.evaluate", "engine.formats", "engine.preview", "engine.console", "engine.follow", "engine.watching",
               "engine.service", "tui"]


def test_daemon_and_cli_never_import_torch_transformers_or_textual():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in DAEMON_SIDE) +
            "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'tokenizers', 'peft', 'textual') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"imported by the daemon side: {out.stdout.strip()}"
