"""Alert hooks: real commands, a real HTTP server on 127.0.0.1, real process groups, a real daemon.

The hooks run on a thread of their own: the tests wait for what a hook did (a file it wrote, a request the
server got, a line in state/hooks.log), never for a length of time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.core import config
from engine.ops import hooks
from engine.store import eventlog
from engine.store.eventlog import EventLog
from engine.store.storage import Storage
from engine.store.workspace import Workspace
from workspaces import ROOT, drop, events, make_workspace, run_cli, start_daemon, stop_daemon, text_lines, wait_for

FAST = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0, "max_attempts": 1}, "inbox": {"settle_seconds": 0.5}}
# A hook command that appends its arguments (after the output path) to a file, one JSON list a run.
RECORD_ARGS = f"{shlex.quote(sys.executable)} -c " + shlex.quote(
    "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')")


class Receiver:
    """An HTTP server on 127.0.0.1 that keeps every POST it gets and answers with `status`."""

    def __init__(self, status: int = 200):
        self.status = status
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/traind-topic"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def hooks_config(**keys) -> config.HooksConfig:
    return config.from_dict({"hooks": keys}).hooks


def event_log(tmp_path: Path, **keys) -> tuple[Workspace, EventLog, hooks.Hooks]:
    ws = Workspace.at(tmp_path / "ws")
    ws.create_folders()
    log = EventLog(ws, Storage(probe=lambda: None), echo=False)
    h = hooks.Hooks(ws, hooks_config(**keys))
    log.listeners.append(h.on_event)
    return ws, log, h


def hooks_log(ws: Workspace) -> str:
    return ws.hooks_log.read_text() if ws.hooks_log.exists() else ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_the_webhook_gets_each_matching_event_once_as_its_json_body(tmp_path, receiver):
    ws, log, h = event_log(tmp_path, on=["job_failed", "rejected"], webhook=receiver.url)
    failed = log.emit("job_failed", "a.jsonl: failed 3 times", "error", job_id="00001-a")
    log.emit("job_done", "b.jsonl: trained", job_id="00002-b")
    rejected = log.emit("rejected", "c.jsonl: rejected, line 2 is not JSON", "warning", job_id="00003-c")
    h.close()  # works the queue off: every request it would make is made by now
    assert [json.loads(body) for _, _, body in receiver.requests] == [failed, rejected]
    assert all(path == "/traind-topic" and headers["content-type"] == "application/json"
               for path, headers, _ in receiver.requests)
    assert (h.fired, h.failed, h.dropped) == (2, 0, 0)
    assert h.by_kind == {"job_failed": {"fired": 1, "failed": 0}, "rejected": {"fired": 1, "failed": 0}}
    lines = hooks_log(ws).splitlines()
    assert re.fullmatch(r"=== \S+ \S+ job_failed: webhook http://127\.0\.0\.1:\d+: HTTP 200", lines[0])
    assert "traind-topic" not in hooks_log(ws)  # a webhook's path can hold its key: never logged


@pytest.mark.parametrize("fmt", ["slack", "discord", "ntfy"])
def test_each_webhook_format_shapes_the_body_its_service_takes(tmp_path, receiver, fmt):
    ws, log, h = event_log(tmp_path, on=["alerts"], webhook=receiver.url, webhook_format=fmt)
    log.emit("job_failed", "a.jsonl: failed \"badly\"", "error", job_id="00001-a")
    log.emit("daemon_started", "daemon started")  # info: not an alert
    h.close()
    [(_, headers, body)] = receiver.requests
    line = "traind (ws) job_failed: a.jsonl: failed \"badly\""
    if fmt == "slack":
        assert json.loads(body) == {"text": line}
    elif fmt == "discord":
        assert json.loads(body) == {"content": line}
    else:
        assert body.decode() == "a.jsonl: failed \"badly\"" and headers["content-type"].startswith("text/plain")
        assert (headers["title"], headers["priority"]) == ("traind: job_failed", "high")


def test_a_command_gets_each_placeholder_as_one_argument_and_no_shell_sees_it(tmp_path):
    out = tmp_path / "args.jsonl"
    template = f"{RECORD_ARGS} {shlex.quote(str(out))} {{kind}} {{message}} {{job}} {{file}} {{step}} {{loss}} " \
               "{workspace} 'at {step}: {kind}!' {level}"
    ws, log, h = event_log(tmp_path, on=["rollback", "job_done"], command=template)
    (ws.run_dir("00004-my_data")).mkdir(parents=True)
    (ws.run_dir("00004-my_data") / "job.json").write_text(json.dumps({"original_name": "my data.jsonl"}))
    hostile = "NaN at step 7: it's \"bad\"; $(touch pwned) `touch pwned` && rm -rf x\nsecond line"
    log.emit("rollback", hostile, "warning", job_id="00004-my_data", step=7)
    log.emit("job_done", "trained")  # no job, step or loss: each fills as ""
    h.close()
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert runs == [["rollback", hostile, "00004-my_data", "my data.jsonl", "7", "", str(ws.root), "at 7: rollback!",
                     "warning"],
                    ["job_done", "trained", "", "", "", "", str(ws.root), "at : job_done!", "info"]]
    assert not (ws.root / "pwned").exists() and not (Path.cwd() / "pwned").exists()
    assert hooks_log(ws).count(": exit 0\n") == 2


def test_a_hanging_hook_is_killed_at_its_timeout_with_its_process_group_and_never_holds_up_an_event(tmp_path):
    # The hook's shell starts a child in its own process group and waits on it: both must go at the timeout.
    # Each run writes the child's pid to a file named after its event's kind.
    hang = f"sh -c {shlex.quote(f'sleep 60 & echo $! > {shlex.quote(str(tmp_path))}/{{kind}}.pid; wait')}"
    ws, log, h = event_log(tmp_path, on=["job_failed", "job_done"], command=hang, timeout_seconds=2)

    def child_of(kind: str) -> int:
        pid_file = tmp_path / f"{kind}.pid"
        return int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what=f"the {kind} hook"))

    log.emit("job_failed", "first")
    sleeper = child_of("job_failed")
    # emit returned while the hook runs: the next event is logged, the hung hook still alive
    second = log.emit("job_done", "second")
    assert alive(sleeper)
    assert json.loads(ws.events_path.read_text().splitlines()[-1]) == second
    wait_for(lambda: "job_failed: command sh: killed at timeout (2s)" in hooks_log(ws), what="the hook to be killed")
    wait_for(lambda: not alive(sleeper), what="its child to be gone too")
    second_sleeper = child_of("job_done")  # the next event's hook ran after it, and meets its own timeout
    wait_for(lambda: "job_done: command sh: killed at timeout (2s)" in hooks_log(ws), what="the second hook killed")
    wait_for(lambda: not alive(second_sleeper), what="the second hook's child gone too")
    h.close()
    assert hooks_log(ws).count("killed at timeout") == 2 and (h.fired, h.failed) == (2, 2)


def test_shutdown_waits_one_timeout_at_most_then_kills_what_runs_and_drops_the_rest(tmp_path):
    pids = tmp_path / "pids"
    hang = f"sh -c {shlex.quote(f'echo $$ >> {shlex.quote(str(pids))}; exec sleep 60')}"
    ws, log, h = event_log(tmp_path, on=["blocked"], command=hang, timeout_seconds=2)
    for n in range(3):
        log.emit("blocked", f"blocked {n}", "warning")
    wait_for(pids.exists, what="the first hook to start")
    h.close()
    started = [int(p) for p in pids.read_text().split()]
    assert not [(pid, Path(f"/proc/{pid}/stat").read_text()) for pid in started if alive(pid)]
    # three hooks of 2 s each cannot all run within 2 s: what did not run is counted, and said in the log
    assert h.fired + h.dropped == 3 and h.dropped >= 1 and h.fired >= len(started)
    assert "dropped without a run" in hooks_log(ws)
    log.emit("blocked", "after shutdown", "warning")
    assert h.fired + h.dropped == 3  # a closed hook runs nothing more


def test_a_full_queue_drops_events_and_counts_them(tmp_path):
    go = tmp_path / "go"
    wait_go = f"sh -c {shlex.quote(f'while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.05; done')}"
    ws, log, h = event_log(tmp_path, on=["blocked"], command=wait_go, timeout_seconds=60)
    total = hooks.QUEUE_SIZE + 10
    for n in range(total):
        log.emit("blocked", f"blocked {n}", "warning")
    # the thread holds at most one of them (it waits in the first hook): the queue's bound drops the rest
    assert h.dropped in (9, 10)
    go.touch()
    h.close()
    assert (h.fired, h.failed) == (total - h.dropped, 0)
    assert "=== " in hooks_log(ws) and f"{h.dropped} event(s) dropped without a run" in hooks_log(ws)
    assert h.counts() == {next(iter(h.counts())): {("ok",): h.fired, ("failed",): 0, ("dropped",): h.dropped}}


def test_a_webhook_that_refuses_or_fails_is_counted_failed_and_logged(tmp_path):
    broken = Receiver(status=500)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    try:
        ws, log, h = event_log(tmp_path, on=["job_failed"], webhook=broken.url, timeout_seconds=5)
        log.emit("job_failed", "one", "error")
        h.configure(hooks_config(on=["job_failed"], webhook=f"http://127.0.0.1:{closed_port}/x", timeout_seconds=5))
        log.emit("job_failed", "two", "error")
        h.close()
    finally:
        broken.close()
    assert len(broken.requests) == 1  # nothing retried
    assert (h.fired, h.failed) == (2, 2) and h.counts()[next(iter(h.counts()))][("failed",)] == 2
    text = hooks_log(ws)
    assert "job_failed: webhook http://127.0.0.1:" in text and ": HTTP 500 Internal Server Error" in text
    assert "Connection refused" in text


def test_a_command_that_fails_or_cannot_start_is_counted_and_logged_with_its_output(tmp_path):
    ws, log, h = event_log(tmp_path, on=["job_failed"], command="sh -c 'echo no route to pager >&2; exit 3'")
    log.emit("job_failed", "one", "error")
    h.configure(hooks_config(on=["job_failed"], command=str(tmp_path / "no-such-program")))
    log.emit("job_failed", "two", "error")
    h.close()
    text = hooks_log(ws)
    assert "job_failed: command sh: exit 3\nno route to pager\n" in text
    assert "no-such-program: cannot run:" in text and (h.fired, h.failed) == (2, 2)


def test_a_disk_that_refuses_the_log_costs_the_line_only(tmp_path, receiver):
    ws, log, h = event_log(tmp_path, on=["job_failed"], webhook=receiver.url)
    ws.hooks_log.mkdir()  # any write to it fails
    log.emit("job_failed", "one", "error")
    h.close()
    assert len(receiver.requests) == 1 and (h.fired, h.failed) == (1, 0)


def test_bad_hook_settings_are_refused_naming_the_key():
    for keys, message in [({"timeout_seconds": -1}, "hooks.timeout_seconds = -1: expected a number > 0.0"),
                          ({"timeout_seconds": 0}, "hooks.timeout_seconds = 0: expected a number > 0.0"),
                          ({"webhook": "ftp://example.com/x"}, "hooks.webhook = 'ftp://example.com/x': expected an http"),
                          ({"webhook": "example.com"}, "hooks.webhook = 'example.com': expected an http"),
                          ({"webhook_format": "teams"}, "hooks.webhook_format = 'teams': expected one of 'json', "
                                                        "'slack', 'discord', 'ntfy'"),
                          ({"command": "notify {mesage}"}, "hooks.command = 'notify {mesage}': unknown placeholder "
                                                           "{mesage}: did you mean 'message'?"),
                          ({"command": "notify 'unclosed"}, "hooks.command = \"notify 'unclosed\": cannot be split"),
                          ({"on": "job_failed"}, "hooks.on = 'job_failed': expected a list of names"),
                          ({"hook": "x"}, "unknown key 'hooks.hook'")]:
        with pytest.raises(config.ConfigError, match=re.escape(message)):
            config.from_dict({"hooks": keys})
    c = config.Config().hooks
    assert (c.on, c.command, c.webhook, c.webhook_format, c.timeout_seconds) == ((), "off", "off", "json", 10.0)
    # a JSON body in an argument is no placeholder; an unknown kind is kept, with a note
    ok = hooks_config(on=["job_faild"], command="""curl -d '{"text": "{message}"}' https://example.com""")
    assert hooks.fill(config.split_hook_command(ok.command), {"message": "hi"})[2] == '{"text": "hi"}'
    assert hooks.config_notes(ok) == ["hooks.on: 'job_faild' is no event kind traind records today (did you mean "
                                      "'job_failed'? 'alerts' means every warning and error); it is kept, and fires "
                                      "if such an event comes"]


def test_every_kind_the_engine_records_is_a_known_kind():
    source = "\n".join(p.read_text() for p in (ROOT / "engine").rglob("*.py")
                       if p.relative_to(ROOT / "engine").parts[0] != "worker")  # the worker's are protocol events
    calls = re.findall(r'(?:\.emit|\.alert|log_offline|_logged)\(\s*(?:[A-Za-z_.]+,\s*)?"([a-z_]+)"', source)
    assert len(set(calls)) > 30
    assert set(calls) - eventlog.KINDS == set()


def test_the_daemon_fires_hooks_for_a_rejected_and_a_failed_file_with_their_names(tmp_path, receiver):
    out = tmp_path / "args.jsonl"
    settings = {**FAST, "hooks": {"on": ["rejected", "job_failed"], "webhook": receiver.url,
                                  "command": f"{RECORD_ARGS} {shlex.quote(str(out))} {{kind}} {{file}} {{job}} {{step}}"}}
    ws = make_workspace(tmp_path / "ws", settings)
    drop(ws, "broken.jsonl", b'{"text": "ok"}\n{"text": "unterminated\n', age=30)
    drop(ws, "bad-run.jsonl", text_lines(5), age=20)
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 10, "fail_after": 3, "exit_code": 3}})
    assert proc.wait(60) == 1  # a file failed
    runs = sorted(json.loads(line) for line in out.read_text().splitlines())
    assert runs == [["job_failed", "bad-run.jsonl", "00002-bad-run", "3"], ["rejected", "broken.jsonl", "00001-broken", ""]]
    logged = {e["kind"]: e for e in events(ws) if e["kind"] in ("rejected", "job_failed")}
    assert sorted((json.loads(body) for _, _, body in receiver.requests), key=lambda e: e["kind"]) == \
        [logged["job_failed"], logged["rejected"]]
    assert hooks_log(ws).count(": exit 0\n") == 2 and hooks_log(ws).count(": HTTP 200\n") == 2


def test_hooks_edited_in_a_running_daemon_apply_to_the_next_event(tmp_path):
    out = tmp_path / "args.jsonl"
    ws = make_workspace(tmp_path / "ws", FAST)
    proc = start_daemon(ws)
    try:
        wait_for(lambda: any(e["kind"] == "daemon_started" for e in events(ws)), what="the daemon to start")
        command = json.dumps(f"{RECORD_ARGS} {shlex.quote(str(out))} {{file}} {{message}}")
        text = re.sub(r"(?m)^on = \[\]$", 'on = ["rejected", "job_faild"]', ws.config_path.read_text())
        text = re.sub(r'(?m)^command = "off"$', lambda _: f"command = {command}", text)

        def saved_and_reloaded():  # saved again until seen: the watch on traind.toml starts just after daemon_started
            (ws.root / "traind.toml.new").write_text(text)
            os.replace(ws.root / "traind.toml.new", ws.config_path)
            try:
                return wait_for(lambda: [e for e in events(ws) if e["kind"] == "config_reloaded"], timeout=1.0)
            except AssertionError:
                return None
        reloaded = wait_for(saved_and_reloaded, what="the reload")
        assert "hooks applied now" in reloaded[0]["message"]
        # the hooks' notes follow the reload's event, as the new hooks are set up
        notes = wait_for(lambda: [e for e in events(ws) if e["kind"] == "config_no_effect"], what="the hooks' note")
        assert "'job_faild' is no event kind" in notes[0]["message"] and notes[0]["key"] == "hooks"
        drop(ws, "broken.jsonl", b"not json\n")
        run = wait_for(lambda: out.exists() and out.read_text(), what="the hook to run")
        [file, message] = json.loads(run)
        assert file == "broken.jsonl" and message.startswith("broken.jsonl: rejected")
    finally:
        assert stop_daemon(proc) == 0


def test_a_refused_command_is_a_reply_to_its_sender_and_fires_no_alert_hook(tmp_path):
    out = tmp_path / "args.jsonl"
    settings = {**FAST, "hooks": {"on": ["alerts"], "command": f"{RECORD_ARGS} {shlex.quote(str(out))} {{kind}}"}}
    ws = make_workspace(tmp_path / "ws", settings)
    proc = start_daemon(ws)
    try:
        wait_for(lambda: any(e["kind"] == "daemon_started" for e in events(ws)), what="the daemon to start")
        nosuchjob = run_cli("promote", "nosuchjob", "-w", str(ws.root))
        assert nosuchjob.returncode == 1 and "nosuchjob: no such job" in nosuchjob.stderr
        idle = run_cli("pause", "-w", str(ws.root))
        assert idle.returncode == 1 and "nothing is training" in idle.stderr
        drop(ws, "broken.jsonl", b"not json\n")  # a real alert, after the refusals: the hooks run in order
        wait_for(lambda: out.exists() and "rejected" in out.read_text(), what="the rejection's hook")
    finally:
        assert stop_daemon(proc) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [["rejected"]]
    refusals = [e for e in events(ws) if e["kind"] == "command"]
    assert [(e["command"], e["ok"], e["level"]) for e in refusals] == [("promote", False, "info"), ("pause", False, "info")]
