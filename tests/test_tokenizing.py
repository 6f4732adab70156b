"""Building the token cache: its progress as the worker reports it, and as `traind status` and the UI show it."""

from __future__ import annotations

from rich.console import Console

from engine.api import status
from engine.store import jobs
from engine.supervisor import attempt
from engine.data.demo_data import write_demo_file
from engine.store.workspace import Workspace


def test_build_cache_reports_the_share_of_the_file_read(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from engine.worker import data

    monkeypatch.setattr(data, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(data, "BATCH_LINES", 100)
    src = write_demo_file(tmp_path / "t.jsonl", 1000, "messages", seed=2)
    shares: list[float] = []
    data.build_cache(src, "messages", AutoTokenizer.from_pretrained(tiny_model_dir), 64, tmp_path / "cache",
                     log=lambda _m: None, progress=shares.append)
    assert len(shares) >= 5 and shares == sorted(shares) and 0 < shares[0] < 0.5 and shares[-1] <= 1.0


def test_status_and_header_say_tokenizing_until_the_job_starts():
    from tui.widgets.header import Header

    job = jobs.Job(Workspace.at("/nonexistent"), "00001-a", {"id": "00001-a", "original_name": "a.jsonl",
                                                             "attempts": []})
    progress = attempt.Progress(job, 1, 3)
    progress.apply({"event": "tokenizing", "share": 0.4213})
    doc = {"workspace": "ws", "daemon": {"state": "training", "running": True}, "job": progress.snapshot(),
           "queue": {"inbox": 0, "pending": 0, "active": 1, "done": 0, "held": 0, "failed": 0, "rejected": 0}}
    assert "progress   tokenizing: 42%" in status.render(doc, [])
    header = Header("ws")
    assert "tokenizing: 42%" in _header_text(header, doc)

    progress.apply({"event": "job_start", "total_steps": 20, "resumed_from_step": 0, "examples": 10, "rows": 4})
    doc["job"] = progress.snapshot()
    assert "tokenizing" not in status.render(doc, []) and doc["job"]["rows"] == 4
    assert "tokenizing" not in _header_text(header, doc)


def _header_text(header, doc) -> str:
    shown = []
    header.update = lambda text, layout=True: shown.append(text)
    header.shown = None
    header.status = doc
    header.refresh_text(0.0)
    console = Console(width=200, record=True)
    console.print(shown[-1])
    return console.export_text()
