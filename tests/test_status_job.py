"""What status says of the job in hand (its state while its worker starts, its elapsed time) and what a
requeue leaves in queue/held/."""

from __future__ import annotations

import asyncio
import json
import time

from engine.core import config
from engine.quality import held
from engine.store import jobs
from engine.supervisor import attempt
from engine.supervisor.daemon import Daemon
from engine.supervisor.state import derive
from engine.store.workspace import Workspace
from workspaces import drop, make_workspace, text_lines


def test_a_job_whose_worker_is_starting_reads_training_with_its_job_line(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    job = jobs.claim(ws, drop(ws, "facts.jsonl", text_lines(4)), 1)
    job.save(state="queued", format="text", examples=4, validated_at=time.time())
    jobs.start(job)
    d = Daemon(ws, config.load(ws.config_path))
    d.state.starting = False
    seen = {}

    async def preflight(_job):  # the seconds between taking a job and its worker's first event
        seen.update(state=derive(d.state, None), doc=d.status())
        d.state.stopping = True
        return False

    d.preflight = preflight
    asyncio.run(d.run_job(job))
    assert seen["state"] == ("training", None)
    shown = seen["doc"]["job"]
    assert shown is not None and (shown["id"], shown["phase"], shown["attempt"]) == (job.id, "starting", 1)


def test_elapsed_does_not_count_the_time_paused(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(attempt.time, "monotonic", lambda: clock[0])
    job = jobs.Job(Workspace.at("/nonexistent"), "00001-a", {"id": "00001-a", "original_name": "a.jsonl",
                                                             "attempts": []})
    progress = attempt.Progress(job, 1, 3)
    clock[0] += 4.0  # starting and tokenizing count
    progress.apply({"event": "job_start", "total_steps": 200, "resumed_from_step": 0, "examples": 10})
    clock[0] += 6.0
    progress.apply({"event": "paused", "step": 6})
    clock[0] += 3600.0
    assert progress.snapshot()["elapsed_s"] == 10.0
    progress.apply({"event": "resumed", "step": 6})
    clock[0] += 5.0
    progress.apply({"event": "blocked", "reason": "disk", "path": "x", "need_bytes": 1, "free_bytes": 0})
    clock[0] += 600.0
    progress.apply({"event": "unblocked", "path": "x"})
    clock[0] += 1.0
    assert progress.snapshot()["elapsed_s"] == 16.0


def test_status_says_how_a_sharded_job_divides_its_model_and_what_each_rank_held():
    from engine.api import status

    job = jobs.Job(Workspace.at("/nonexistent"), "00001-a", {"id": "00001-a", "original_name": "a.jsonl",
                                                             "attempts": []})
    progress = attempt.Progress(job, 1, 3)
    sharding = {"method": "fsdp", "ranks": 2, "params_per_rank": 98464, "params_total": 196928}
    progress.apply({"event": "job_start", "total_steps": 20, "resumed_from_step": 0, "examples": 10,
                    "memory_estimate": {"total": 3 * 2**30}, "method": "full", "sharding": sharding})
    doc = {"workspace": "ws", "daemon": {"state": "training", "running": True}, "job": progress.snapshot(),
           "queue": {"inbox": 0, "pending": 0, "active": 1, "done": 0, "held": 0, "failed": 0, "rejected": 0}}
    assert doc["job"]["sharding"] == sharding and doc["job"]["peak_memory_per_rank"] is None
    assert "sharding   fsdp on 2 ranks, 98,464 of 196,928 parameters a rank\n" in status.render(doc, [])
    progress.apply({"event": "job_end", "outcome": "done", "step": 20, "loss": 1.0, "peak_memory": 2 * 2**30,
                    "peak_memory_per_rank": [2 * 2**30, int(2.5 * 2**30)]})
    doc["job"] = progress.snapshot()
    assert doc["job"]["peak_memory_per_rank"] == [2 * 2**30, int(2.5 * 2**30)]
    assert ("sharding   fsdp on 2 ranks, 98,464 of 196,928 parameters a rank; peak 2.0 GiB to 2.5 GiB a rank "
            "(estimated 3.0 GiB)") in status.render(doc, [])
    progress.apply({"event": "job_end", "outcome": "done", "step": 20, "loss": 1.0, "peak_memory": None,
                    "peak_memory_per_rank": [None, None]})  # ranks on a CPU: nothing measured
    doc["job"] = progress.snapshot()
    assert "parameters a rank\n" in status.render(doc, [])
    progress = attempt.Progress(job, 1, 3)  # a replica a rank: no sharding line
    progress.apply({"event": "job_start", "total_steps": 20, "resumed_from_step": 0, "examples": 10})
    assert "sharding" not in status.render(dict(doc, job=progress.snapshot()), [])


def test_a_requeued_file_leaves_no_reason_behind_in_queue_held(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    job = jobs.claim(ws, drop(ws, "facts.jsonl", text_lines(4)), 1)
    jobs.start(job)
    job.finish("held", {"reason": "forgot eval/notes: +9% loss", "forgetting": {"eval/notes": 0.09}})
    assert sorted(p.name for p in ws.queue("held").iterdir()) == [job.name, job.name + jobs.REASON_SUFFIX]

    held.requeue(ws, job.id)
    assert list(ws.queue("held").iterdir()) == []
    assert [p.name for p in ws.inbox.iterdir()] == ["facts.jsonl"]
    kept = json.loads((job.run_dir / "held.reason.json").read_text())
    assert kept["reason"] == "forgot eval/notes: +9% loss" and kept["original_name"] == "facts.jsonl"
