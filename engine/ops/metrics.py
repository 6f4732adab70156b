"""The daemon's Prometheus endpoint: `/metrics` on `[metrics] listen`, served by prometheus-client.

The HTTP server runs in threads of its own (prometheus-client's WSGI server). A
scrape builds every family from what the daemon last published, its status
document (replaced whole at each status write: every change and once a second),
and from counters fed by the event log's listener and by each attempt's end.
Neither side waits for the other: the document is handed over by one reference
assignment, the counters under a lock held for an increment or a copy. The
one thing a scrape reads from a file, the current model's evaluation, it reads
in its own thread, once per model version.

Names follow Prometheus practice: the `traind_` prefix, base units (bytes,
seconds, ratios of 0 to 1), `_total` for counters, which count from the
daemon's start. docs/metrics.md lists every one. Only the daemon exports: the
worker's figures reach it as events.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.store import statefiles
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import QUEUE_STATES, Workspace

DAEMON_STATES = ("starting", "idle", "validating", "training", "paused", "stopped", "blocked", "rolling_back",
                 "shutting_down", "offline")
# each counted event kind, as (counter, label value): what a file became, a rollback's cause, a verification
FILE_OUTCOMES = {"job_done": "done", "job_failed": "failed", "rejected": "rejected", "job_held": "held",
                 "job_skipped": "skipped"}
ROLLBACK_CAUSES = {"rollback": "anomaly", "rolled_back_model": "snapshot"}
VERIFICATIONS = {"snapshot_verified": "ok", "snapshot_corrupt": "corrupt"}
ATTEMPT_OUTCOMES = ("done", "skipped", "changed", "interrupted", "stopped", "rollback", "oom_killed", "oom",
                    "model_unavailable", "failed")
ANOMALY_KINDS = ("nan", "inf", "spike")
# the job's figures, from the status document's `job`: (metric, field, help)
JOB_GAUGES = (
    ("traind_job_step", "step", "Optimizer steps the current job has made."),
    ("traind_job_total_steps", "total_steps", "Optimizer steps the current job will make."),
    ("traind_job_epoch", "epoch", "Epochs through the current file so far."),
    ("traind_job_loss", "loss", "Training loss at the last logged step."),
    ("traind_job_learning_rate", "learning_rate", "Learning rate at the last logged step."),
    ("traind_job_grad_norm", "grad_norm", "Gradient norm at the last logged step."),
    ("traind_job_tokens_per_second", "tokens_per_s", "Training throughput at the last logged step, tokens/s."),
    ("traind_job_eta_seconds", "eta_s", "Seconds of training left, at the current rate."),
    ("traind_job_attempt", "attempt", "The current attempt's number (1-based)."),
    ("traind_job_rollbacks", "rollbacks", "Anomaly rollbacks of the current file so far."),
)


class Metrics:
    """What /metrics reports. The daemon calls `publish`, `on_event` (an event log listener) and
    `attempt_ended`; the HTTP server's threads call `collect`."""

    def __init__(self, ws: Workspace, sources: tuple = ()):
        self.ws = ws
        self.sources = sources  # more counters: objects with counts() -> {(metric, help): {labels tuple: value}}
        self.status: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self._eval: tuple[str | None, dict[str, float]] = (None, {})  # (version, loss by source), read once each

    # -- fed by the daemon (the event loop's thread) ------------------------------------------

    def publish(self, status: dict[str, Any]) -> None:
        self.status = status

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        with self._lock:
            if kind in FILE_OUTCOMES:
                self._counts["files", (FILE_OUTCOMES[kind],)] += 1
            if kind in ROLLBACK_CAUSES:
                self._counts["rollbacks", (ROLLBACK_CAUSES[kind],)] += 1
            if kind in VERIFICATIONS:
                self._counts["verifications", (VERIFICATIONS[kind],)] += 1
            if event.get("level") in ("warning", "error"):
                self._counts["alerts", (kind, event["level"])] += 1

    def attempt_ended(self, outcome: str, anomaly: dict[str, Any] | None) -> None:
        with self._lock:
            self._counts["attempts", (outcome,)] += 1
            if anomaly is not None:
                self._counts["anomalies", (str(anomaly.get("kind")),)] += 1

    # -- read by a scrape (a server thread) ------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        doc, now = self.status, time.time()
        with self._lock:
            counts = dict(self._counts)
        yield from self._daemon(doc)
        yield from self._job(doc, now)
        yield from self._resources(doc)
        yield from self._model(doc, now)
        yield from self._counters(counts)
        for source in self.sources:
            for (name, text), values in source.counts().items():
                family = CounterMetricFamily(name, text, labels=["result"])
                for labels, value in values.items():
                    family.add_metric(list(labels), value)
                yield family

    def _daemon(self, doc: dict[str, Any]) -> Iterator[Metric]:
        daemon = doc.get("daemon") or {}
        info = GaugeMetricFamily("traind_build_info", "traind's version (always 1).", labels=["version"])
        info.add_metric([str(doc.get("version"))], 1)
        yield info
        state = GaugeMetricFamily("traind_daemon_state", "The daemon's state: 1 for the state it is in, 0 for "
                                  "the others.", labels=["state"])
        for name in DAEMON_STATES:
            state.add_metric([name], 1 if daemon.get("state") == name else 0)
        yield state
        yield from _gauge("traind_daemon_start_time_seconds", "When the daemon started, Unix time.",
                          daemon.get("started_at"))
        yield from _gauge("traind_daemon_state_since_seconds", "When the daemon entered its current state, "
                          "Unix time.", daemon.get("since"))
        queue = GaugeMetricFamily("traind_queue_files", "Files in each queue folder (inbox: waiting to be taken).",
                                  labels=["folder"])
        counts = doc.get("queue") or {}
        for folder in ("inbox", *QUEUE_STATES):
            if folder in counts:
                queue.add_metric([folder], counts[folder])
        yield queue

    def _job(self, doc: dict[str, Any], now: float) -> Iterator[Metric]:
        job = doc.get("job")
        if not job:
            return
        info = GaugeMetricFamily("traind_job_info", "The job in hand (always 1): its id, file, format, phase.",
                                 labels=["job", "file", "format", "phase"])
        info.add_metric([str(job.get(k) or "") for k in ("id", "original_name", "format", "phase")], 1)
        yield info
        for name, key, text in JOB_GAUGES:
            yield from _gauge(name, text, job.get(key))
        if job.get("tokenizing") is not None:
            yield from _gauge("traind_job_tokenizing_ratio", "While the file is tokenized: the share done, 0 to 1.",
                              job["tokenizing"] / 100.0)
        saved = job.get("last_checkpoint_at")
        yield from _gauge("traind_checkpoint_age_seconds", "Seconds since the current attempt's newest complete "
                          "checkpoint was written.", now - saved if saved else None)

    def _resources(self, doc: dict[str, Any]) -> Iterator[Metric]:
        resources = doc.get("resources") or {}
        gpu = resources.get("gpu") or {}
        devices = gpu.get("devices") or []
        families = [
            (GaugeMetricFamily("traind_gpu_memory_used_bytes", "GPU memory in use, by device.", labels=["gpu", "name"]),
             lambda d: d.get("memory_used")),
            (GaugeMetricFamily("traind_gpu_memory_total_bytes", "GPU memory, by device.", labels=["gpu", "name"]),
             lambda d: d.get("memory_total")),
            (GaugeMetricFamily("traind_gpu_utilization_ratio", "GPU utilisation over the last sample, 0 to 1.",
                               labels=["gpu", "name"]),
             lambda d: None if d.get("utilization_percent") is None else d["utilization_percent"] / 100.0),
            (GaugeMetricFamily("traind_gpu_temperature_celsius", "GPU temperature.", labels=["gpu", "name"]),
             lambda d: d.get("temperature_c")),
            (GaugeMetricFamily("traind_gpu_power_watts", "GPU power draw.", labels=["gpu", "name"]),
             lambda d: d.get("power_w")),
            (GaugeMetricFamily("traind_gpu_worker_memory_bytes", "GPU memory the training worker holds.",
                               labels=["gpu", "name"]),
             lambda d: d.get("worker_memory")),
        ]
        for family, value in families:
            for d in devices:
                if value(d) is not None:
                    family.add_metric([str(d.get("index")), str(d.get("name") or "")], value(d))
            yield family
        mode = GaugeMetricFamily("traind_gpu_mode", "1 for how training runs now: on GPUs, or on the CPU "
                                 "(no driver, no device).", labels=["mode"])
        for name in ("gpu", "cpu"):
            mode.add_metric([name], 1 if gpu.get("mode") == name else 0)
        yield mode
        disk = resources.get("disk") or {}
        yield from _gauge("traind_disk_free_bytes", "Free space on the workspace's filesystem (what an "
                          "unprivileged writer can use).", disk.get("free"))
        yield from _gauge("traind_disk_total_bytes", "Size of the workspace's filesystem.", disk.get("total"))
        yield from _gauge("traind_disk_reserve_bytes", "disk.reserve: space no write may take.", disk.get("reserve"))
        memory = resources.get("memory") or {}
        yield from _gauge("traind_memory_available_bytes", "The machine's available memory.", memory.get("available"))
        yield from _gauge("traind_worker_resident_memory_bytes", "Memory resident in the training worker's "
                          "process group.", resources.get("worker_rss"))

    def _model(self, doc: dict[str, Any], now: float) -> Iterator[Metric]:
        snapshots = doc.get("snapshots") or {}
        yield from _gauge("traind_snapshots", "Snapshots in the store.", snapshots.get("count"))
        corrupt = snapshots.get("corrupt")
        yield from _gauge("traind_snapshots_corrupt", "Snapshots whose last verification failed.",
                          len(corrupt) if isinstance(corrupt, list) else None)
        newest = snapshots.get("newest_at")
        yield from _gauge("traind_snapshot_age_seconds", "Seconds since the newest snapshot was taken.",
                          now - newest if newest else None)
        model = doc.get("model") or {}
        losses = self._eval_losses(model.get("version"))
        family = GaugeMetricFamily("traind_eval_loss", "The current model's held-out loss on each eval source, "
                                   "measured when it was trained.", labels=["source"])
        for source, loss in losses.items():
            family.add_metric([source], loss)
        yield family

    def _eval_losses(self, version: str | None) -> dict[str, float]:
        known, losses = self._eval
        if version == known:
            return losses
        losses = {}
        marker = statefiles.read_or_none(self.ws.models / version / MODEL_MARKER, statefiles.MODEL_MARKER) \
            if version else None
        for source, figures in ((marker or {}).get("eval") or {}).get("sources", {}).items():
            loss = ((figures or {}).get("after") or {}).get("loss") if isinstance(figures, dict) else None
            if isinstance(loss, (int, float)):
                losses[source] = float(loss)
        self._eval = (version, losses)
        return losses

    def _counters(self, counts: dict[tuple[str, tuple[str, ...]], int]) -> Iterator[Metric]:
        def counter(name, key, text, labels, known=()):
            family = CounterMetricFamily(name, text, labels=labels)
            values = {label: 0 for label in known}
            values.update({label: n for (k, label), n in counts.items() if k == key})
            for label, n in sorted(values.items()):
                family.add_metric(list(label), n)
            return family

        yield counter("traind_files", "files", "Files finished, by what became of them.", ["outcome"],
                      [(v,) for v in FILE_OUTCOMES.values()])
        yield counter("traind_attempts", "attempts", "Training attempts ended, by outcome.", ["outcome"],
                      [(v,) for v in ATTEMPT_OUTCOMES])
        yield counter("traind_rollbacks", "rollbacks", "Rollbacks: to a checkpoint after an anomaly, or to a "
                      "snapshot.", ["cause"], [(v,) for v in ROLLBACK_CAUSES.values()])
        yield counter("traind_anomalies", "anomalies", "Attempts ended by an anomaly (NaN, Inf, loss spike).",
                      ["kind"], [(v,) for v in ANOMALY_KINDS])
        yield counter("traind_snapshot_verifications", "verifications", "Snapshot verifications, by result.",
                      ["result"], [(v,) for v in VERIFICATIONS.values()])
        yield counter("traind_alerts", "alerts", "Warnings and errors in the event log, by kind.", ["kind", "level"])


def _gauge(name: str, text: str, value: Any) -> Iterator[Metric]:
    """A gauge with no labels, or nothing when there is no value (absent, not 0, as Prometheus advises)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield GaugeMetricFamily(name, text, value=value)


class MetricsServer:
    """The HTTP endpoint; `start` says where it listens, or raises OSError (the address in use...)."""

    def __init__(self, metrics: Metrics):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collect(metrics))
        self.registry.register(ProcessCollector(registry=None))  # the daemon's own CPU, memory, open files
        self.server = None
        self.url: str | None = None

    def start(self, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        self.server, _ = start_http_server(int(port), addr=host, registry=self.registry)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.server.server_port}/metrics"
        return self.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server, self.url = None, None


class _Collect:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.collect()
