"""`traind service`: the systemd unit it prints parses, and it stops the daemon the way the daemon needs."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

from workspaces import ROOT, make_workspace, run_cli


def unit_lines(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            keys.setdefault(key, []).append(value)
    return keys


@pytest.mark.parametrize("user", [True, False], ids=["user", "system"])
def test_the_unit_runs_this_interpreter_on_the_workspace_and_outlasts_the_stop_grace(tmp_path, user):
    ws = make_workspace(tmp_path / "my ws %1", {"jobs": {"stop_grace_seconds": 150.5}})  # quoting and specifiers
    out = run_cli("service", *(["--user"] if user else []), "-w", str(ws.root))
    assert out.returncode == 0, out.stderr
    keys = unit_lines(out.stdout)
    argv = shlex.split(keys["ExecStart"][0].replace("%%", "%"))
    assert os.access(argv[0], os.X_OK) and os.path.isabs(argv[0])
    assert argv[1:] == ["-m", "engine.cli", "daemon", "-w", str(ws.root)]
    assert keys["WorkingDirectory"] == [str(ws.root).replace("%", "%%")]
    assert int(keys["TimeoutStopSec"][0]) > 150.5
    assert keys["KillMode"] == ["mixed"] and keys["KillSignal"] == ["SIGTERM"] and keys["Restart"] == ["on-failure"]
    assert "PYTHONUNBUFFERED=1" in keys["Environment"]
    if user:
        assert keys["WantedBy"] == ["default.target"] and "User" not in keys
        assert "systemctl --user enable --now traind" in out.stdout and "loginctl enable-linger" in out.stdout
        assert keys["SyslogIdentifier"] == ["traind"]
    else:
        assert keys["WantedBy"] == ["multi-user.target"] and keys["After"] == ["network-online.target"]
        assert keys["User"] == [subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()]

    # The daemon it would start is the one this checkout runs: its environment imports engine from here.
    env = {"PATH": "/usr/bin:/bin", **dict(pair.strip('"').split("=", 1) for pair in keys["Environment"])}
    probe = subprocess.run([argv[0], "-c", "import engine.cli; print(engine.cli.__file__)"], env=env,
                           cwd=ws.root, capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == str(ROOT / "engine" / "cli" / "__init__.py"), probe.stderr

    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze on this machine: the unit's syntax is not checked")
    path = tmp_path / "traind.service"
    path.write_text(out.stdout)
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True)
    said = [line for line in (verify.stdout + verify.stderr).splitlines() if "traind.service" in line]
    assert verify.returncode == 0 and said == [], verify.stdout + verify.stderr


def test_a_bad_config_is_named_not_printed_as_a_unit(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    ws.config_path.write_text("[jobs]\nstop_grace_seconds = 'soon'\n")
    out = run_cli("service", "-w", str(ws.root))
    assert out.returncode == 2 and out.stdout == "" and "stop_grace_seconds" in out.stderr
