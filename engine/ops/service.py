"""`traind service`: a systemd unit that runs the daemon of one workspace.

The unit is text printed for the user to install (docs/service.md); this module
writes nothing and never talks to systemd. Stopping is the part that matters:
on SIGTERM the daemon has its worker save a checkpoint, waits up to
`jobs.stop_grace_seconds` for it, then kills the worker's group, and only then
exits. So systemd must send SIGTERM to the daemon alone (KillMode=mixed: the
worker, in the same cgroup, is left to the daemon) and wait longer than that
grace before its own SIGKILL.
"""

from __future__ import annotations

import getpass
import math
import os
import shlex
import site
import sys
from pathlib import Path

import engine
from engine.store.workspace import Workspace

# Beyond the worker's grace: dismissing a warm worker (up to 5 s, engine/ops/worker_process.py), the last
# status.json and events, and the interpreter's own exit, with room for a slow disk.
STOP_MARGIN_SECONDS = 30
RESTART_SECONDS = 10
SOURCE = Path(engine.__file__).resolve().parent.parent
DOCS = SOURCE / "docs" / "service.md"  # in a checkout; an installed package has no docs/


def unit(ws: Workspace, user_unit: bool, stop_grace_seconds: float, python: str | None = None,
         account: str | None = None) -> str:
    """The unit's text: a user unit (`systemctl --user`) or a system one that runs as `account`."""
    python = os.path.abspath(python or sys.executable)
    account = account or getpass.getuser()
    root = str(ws.root)
    name = "traind"
    shell_root = shlex.quote(root)  # the header's commands are for a shell
    if user_unit:
        steps = [
            ("mkdir -p ~/.config/systemd/user", ""),
            (f"traind service --user -w {shell_root} > ~/.config/systemd/user/{name}.service", ""),
            ("systemctl --user daemon-reload", ""),
            (f"systemctl --user enable --now {name}", ""),
            (f"loginctl enable-linger {account}", "keep it running after you log out, and start it at boot"),
            (f"journalctl --user -u {name} -f", f"its log; 'traind events -f -w {shell_root}' from any shell"),
        ]
        other = f"# A system unit instead (started at boot, runs as {account}): traind service -w {shell_root}"
    else:
        steps = [
            (f"traind service -w {shell_root} | sudo tee /etc/systemd/system/{name}.service", ""),
            ("sudo systemctl daemon-reload", ""),
            (f"sudo systemctl enable --now {name}", ""),
            (f"journalctl -u {name} -f", f"its log; 'traind events -f -w {shell_root}' from any shell"),
        ]
        other = f"# A user unit instead (no root needed): traind service --user -w {shell_root}"
    width = max(len(command) for command, note in steps if note)
    install = [f"#   {command:<{width}}   # {note}" if note else f"#   {command}" for command, note in steps]
    install.append(other)
    lines = [
        f"# traind daemon for the workspace {root}, as a systemd {'user' if user_unit else 'system'} unit.",
        "# Install it with:",
        *install,
        "# Stopping it (systemctl stop, or shutdown) checkpoints the job in training; the next start resumes it.",
        "",
        "[Unit]",
        f"Description=traind: continual fine-tuning on {_escape(root)}",
        *([f"Documentation={_escape(DOCS.as_uri())}"] if DOCS.is_file() else []),
    ]
    if not user_unit:
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=exec",
        # The interpreter itself, not the `traind` script: it is always there (sys.executable), where the script
        # may not sit beside it (pipx, --user installs), and `-m engine.cli` never imports the UI.
        "ExecStart=" + " ".join(_quote(a) for a in (python, "-m", "engine.cli", "daemon", "-w", root)),
        "WorkingDirectory=" + _escape(root),
        f"SyslogIdentifier={name}",  # journal lines say traind[PID], not python[PID]
        *(["User=" + _escape(account)] if not user_unit else []),
        *(f"Environment={_quote(pair, command=False)}" for pair in _environment()),
        "Restart=on-failure",
        f"RestartSec={RESTART_SECONDS}",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={math.ceil(stop_grace_seconds) + STOP_MARGIN_SECONDS}",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_unit else 'multi-user.target'}",
    ]
    return "\n".join(lines) + "\n"


def _environment() -> list[str]:
    pairs = ["PYTHONUNBUFFERED=1"]
    installed = {os.path.realpath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if os.path.realpath(SOURCE) not in installed:  # run from a checkout or an editable install: say where it is
        pairs.append(f"PYTHONPATH={SOURCE}")
    return pairs


def _escape(value: str) -> str:
    """systemd expands %-specifiers in every value: a literal % is %%."""
    return value.replace("%", "%%")


def _quote(value: str, command: bool = True) -> str:
    """One word of a command line (ExecStart=, where $ starts a variable) or an Environment= assignment,
    quoted as systemd.syntax(7) says."""
    value = _escape(value)
    if command:
        value = value.replace("$", "$$")
    if value and not any(c in value for c in " \t\"'\\;"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def print_unit(ws: Workspace, user_unit: bool) -> int:
    print(unit(ws, user_unit, ws.load_section("jobs").stop_grace_seconds), end="")
    return 0


def add_command(sub, common, workspace) -> None:
    """`service` among the CLI's sub-commands; `workspace(args)` is the CLI's -w."""
    p = sub.add_parser("service", parents=[common], help="print a systemd unit that runs this workspace's daemon "
                       "(install steps in its header)")
    p.add_argument("--user", action="store_true", help="a user unit (systemctl --user), else a system unit")
    p.set_defaults(func=lambda a: print_unit(workspace(a), a.user))
