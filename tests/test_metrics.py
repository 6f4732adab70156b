"""/metrics: what a Prometheus scrape of a live daemon sees, parsed with prometheus-client's own parser."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from workspaces import drop, make_workspace, run_cli, start_daemon, stop_daemon, text_lines, wait_for

# every family docs/metrics.md lists that a scrape of a training daemon holds (GPU ones only on a GPU)
TRAINING_FAMILIES = {
    "traind_build_info", "traind_daemon_state", "traind_daemon_start_time_seconds", "traind_daemon_state_since_seconds",
    "traind_queue_files", "traind_job_info", "traind_job_step", "traind_job_total_steps", "traind_job_loss",
    "traind_job_learning_rate", "traind_job_grad_norm", "traind_job_tokens_per_second", "traind_job_attempt",
    "traind_job_rollbacks", "traind_gpu_mode", "traind_disk_free_bytes", "traind_disk_total_bytes",
    "traind_disk_reserve_bytes", "traind_memory_available_bytes", "traind_files", "traind_attempts",
    "traind_rollbacks", "traind_anomalies", "traind_snapshot_verifications", "traind_alerts", "traind_snapshots",
    "process_resident_memory_bytes",
}


def scrape(url: str) -> dict[str, list]:
    """Samples by family name (a counter's family is named without _total, as the parser names it)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families, name, **labels) -> float | None:
    """The sample `name` (as exposed: a counter's with _total) with these labels, or None."""
    for sample in families.get(name.removesuffix("_total"), []):
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def status(ws) -> dict:
    return json.loads(ws.status_path.read_text()) if ws.status_path.exists() else {}


def metrics_url(ws) -> str:
    return wait_for(lambda: status(ws).get("metrics_url"), 60, "metrics_url in status.json")


def save_config(ws, text: str) -> None:
    """As an editor saves: a new file renamed over the old, so the daemon never reads half of it."""
    tmp = ws.config_path.with_name(".traind.toml.new")
    tmp.write_text(text)
    os.replace(tmp, ws.config_path)


def quietly(predicate, timeout: float):
    try:
        return wait_for(predicate, timeout)
    except AssertionError:
        return None


def idle(ws) -> None:
    wait_for(lambda: (status(ws).get("daemon") or {}).get("state") == "idle", 60, "the daemon idle")


def test_a_scrape_during_training_shows_the_state_the_job_and_the_counters(tmp_path):
    ws = make_workspace(tmp_path / "ws", {"metrics": {"listen": "127.0.0.1:0"}, "checkpoint": {"every_steps": 5}})
    hooks = {"fake": {"steps": 400, "step_seconds": 0.05, "checkpoint_every": 5}}
    proc = start_daemon(ws, hooks=hooks)
    try:
        url = metrics_url(ws)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        idle(ws)
        before = scrape(url)
        assert value(before, "traind_daemon_state", state="idle") == 1
        assert value(before, "traind_daemon_state", state="training") == 0
        assert value(before, "traind_job_step") is None  # no job: absent, not 0

        drop(ws, "a.jsonl", text_lines(20))
        first = wait_for(lambda: (f := scrape(url)) and (value(f, "traind_job_step") or 0) >= 3 and f, 60,
                         "a training scrape")
        later = wait_for(lambda: (f := scrape(url)) and value(f, "traind_job_step") > value(first, "traind_job_step")
                         and f, 60, "the step to rise")
        missing = TRAINING_FAMILIES - set(later)
        assert not missing, missing
        assert value(later, "traind_daemon_state", state="training") == 1
        assert sum(s.value for s in later["traind_daemon_state"]) == 1
        assert value(later, "traind_job_total_steps") == 400
        loss = value(later, "traind_job_loss")
        assert loss is not None and loss == loss and abs(loss) < 1e6  # finite
        assert value(later, "traind_job_info", file="a.jsonl", phase="training") == 1
        assert value(later, "traind_queue_files", folder="active") == 1
        assert value(later, "traind_gpu_mode", mode="cpu") == 1  # no GPU here
        assert value(later, "traind_disk_free_bytes") > 0
        age = wait_for(lambda: value(scrape(url), "traind_checkpoint_age_seconds"), 60, "a checkpoint")
        assert 0 <= age < 60
        assert value(later, "traind_files_total", outcome="done") == 0  # counters exist before the first
    finally:
        assert stop_daemon(proc) == 0


def test_counters_count_what_happened_and_a_scrape_never_waits_for_the_daemon(tmp_path):
    ws = make_workspace(tmp_path / "ws", {"metrics": {"listen": "127.0.0.1:0"}, "jobs": {"max_attempts": 1},
                                          "hooks": {"on": ["rejected", "job_done"], "command": "false"}})
    proc = start_daemon(ws, hooks={"fake": {"steps": 3, "anomaly_at": 2}})
    try:
        url = metrics_url(ws)
        drop(ws, "bad.jsonl", b"not json\n")
        drop(ws, "nan.jsonl", text_lines(10))
        wait_for(lambda: value(scrape(url), "traind_files_total", outcome="rejected") == 1, 60, "the rejection")
        f = wait_for(lambda: (f := scrape(url)) and value(f, "traind_rollbacks_total", cause="anomaly") and f, 60,
                     "the rollback")
        assert value(f, "traind_anomalies_total", kind="nan") >= 1
        assert value(f, "traind_attempts_total", outcome="rollback") >= 1
        assert value(f, "traind_alerts_total", kind="rejected", level="warning") == 1
        assert value(f, "traind_alerts_total", kind="rollback", level="warning") >= 1
        done = wait_for(lambda: (f := scrape(url)) and value(f, "traind_files_total", outcome="done") == 1 and f, 60,
                        "the file trained after its rollback")
        assert value(done, "traind_attempts_total", outcome="done") == 1
        # the hook (a command that fails) ran for the rejection and the finished file
        wait_for(lambda: value(scrape(url), "traind_hook_runs_total", result="failed") == 2, 30, "the hooks' runs")
        losses = {s.labels["source"]: s.value for s in done["traind_eval_loss"]}
        assert losses and set(losses.values()) == {1.9}, losses  # the fake worker's candidate figures
        # a hundred scrapes in a row, each answered whole, while the daemon goes on
        for _ in range(100):
            assert "traind_daemon_state" in scrape(url)
        assert run_cli("status", "-w", str(ws.root)).returncode == 0
    finally:
        assert stop_daemon(proc) == 0


def test_a_taken_port_is_a_warning_not_a_dead_daemon_and_off_serves_nothing(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        ws = make_workspace(tmp_path / "ws", {"metrics": {"listen": f"127.0.0.1:{port}"}})
        proc = start_daemon(ws)
        try:
            events = ws.events_path
            wait_for(lambda: events.exists() and '"metrics_failed"' in events.read_text(), 60, "the warning")
            [warning] = [json.loads(line) for line in events.read_text().splitlines() if '"metrics_failed"' in line]
            assert warning["level"] == "warning" and f"127.0.0.1:{port}" in warning["message"]
            doc = json.loads(run_cli("status", "--json", "-w", str(ws.root)).stdout)
            assert doc["daemon"]["state"] == "idle" and doc["metrics_url"] is None
        finally:
            assert stop_daemon(proc) == 0
    finally:
        taken.close()
    off = make_workspace(tmp_path / "off")
    proc = start_daemon(off)
    try:
        idle(off)
        assert status(off)["metrics_url"] is None
    finally:
        assert stop_daemon(proc) == 0


def test_the_endpoint_follows_a_saved_config(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    proc = start_daemon(ws)
    try:
        idle(ws)
        text = ws.config_path.read_text().replace('listen = "off"', 'listen = "127.0.0.1:0"')
        assert 'listen = "127.0.0.1:0"' in text
        # saved again until it is seen: the daemon's watch on traind.toml starts just after it is idle
        url = wait_for(lambda: save_config(ws, text) or quietly(lambda: status(ws).get("metrics_url"), 1.0), 60,
                       "the endpoint opened")
        assert value(scrape(url), "traind_daemon_state", state="idle") == 1
        assert f"metrics    {url}" in run_cli("status", "-w", str(ws.root)).stdout
        save_config(ws, text.replace('listen = "127.0.0.1:0"', 'listen = "off"'))
        wait_for(lambda: status(ws)["metrics_url"] is None, 60, "the endpoint closed")
        with pytest.raises(urllib.error.URLError):
            scrape(url)
        save_config(ws, text)
        metrics_url(ws)
    finally:
        assert stop_daemon(proc) == 0
    offline = json.loads(run_cli("status", "--json", "-w", str(ws.root)).stdout)
    assert offline["daemon"]["state"] == "offline" and offline["metrics_url"] is None


def test_tensorboard_logs_hold_each_jobs_loss_one_run_a_job(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = {"training": {"report_to": ["tensorboard"], "max_seq_length": 64, "batch_size": 2, "warmup_steps": 1},
                "eval": {"gate": "off", "holdout_fraction": 0.0, "holdout_min": 0}, "replay": {"fraction": 0.0},
                "jobs": {"warm_worker": False}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    for name in ("one.jsonl", "two.jsonl"):
        drop(ws, name, text_lines(24, prefix=name))
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in ws.runs.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = {e["step"]: e["loss"] for e in steps if e["event"] == "step" and e.get("loss") is not None}
        logs = EventAccumulator(str(run / "tensorboard")).Reload()
        assert "train/loss" in logs.Tags()["scalars"], logs.Tags()
        logged = {e.step: e.value for e in logs.Scalars("train/loss")}
        assert logged and set(logged) == set(losses), (logged, losses)
        assert all(abs(logged[s] - losses[s]) < 1e-4 * max(1.0, abs(losses[s])) for s in logged)
