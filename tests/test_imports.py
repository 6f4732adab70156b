"""The daemon and the CLI start fast: they never import torch or transformers, and engine/ never imports textual."""

import subprocess
import sys

from workspaces import ROOT

# Every module of the daemon's side (all of engine/ but the worker) and the UI's entry point, found on disk: a
# module added later is checked too. import-linter checks the same rule on the source (make test's lint-imports);
# this checks what importing them really loads, in a fresh interpreter.
DAEMON_SIDE = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "engine").rglob("*.py")
                     if "worker" not in p.relative_to(ROOT / "engine").parts[:1] and p.name != "__main__.py") \
    + ["tui"]


def test_daemon_and_cli_never_import_torch_transformers_or_textual():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in DAEMON_SIDE) +
            "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'tokenizers', 'peft', 'textual') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"imported by the daemon side: {out.stdout.strip()}"
