"""engine/store/storage.py on its own: refused lines kept in order, the problem cleared only by a real write."""

from __future__ import annotations

import errno
import json

from engine.core import atomic
from engine.store.storage import Storage


def refusing(monkeypatch, paths: set[str]):
    """Make appends and replaces of these paths fail with ENOSPC, as a full disk would, until the set is emptied."""
    real_append, real_replace = atomic.append_bytes, atomic.write_json_atomic

    def append(path, data, sync=True):
        if str(path) in paths:
            raise atomic.WriteFailed(OSError(errno.ENOSPC, "No space left on device"), path)
        return real_append(path, data, sync)

    def replace(path, obj):
        if str(path) in paths:
            raise atomic.WriteFailed(OSError(errno.ENOSPC, "No space left on device"), path)
        return real_replace(path, obj)

    monkeypatch.setattr(atomic, "append_bytes", append)
    monkeypatch.setattr(atomic, "write_json_atomic", replace)


def test_lines_refused_while_the_disk_is_full_are_written_later_in_order(tmp_path, monkeypatch):
    log, status = tmp_path / "events.jsonl", tmp_path / "status.json"
    full = {str(log), str(status)}
    refusing(monkeypatch, full)
    cleared = []
    storage = Storage(probe=lambda: atomic.write_json_atomic(status, {"ok": True}),
                      on_clear=lambda problem, dropped: cleared.append(problem))
    for i in range(5):
        assert storage.append(log, (json.dumps({"n": i}) + "\n").encode()) is False
    assert storage.problem == f"disk full: cannot write {log}" and not log.exists()
    full.discard(str(log))  # the log's disk has room again, but the probe (status.json) still fails
    assert storage.retry() is False and storage.problem is not None
    assert [json.loads(line)["n"] for line in log.read_text().splitlines()] == [0, 1, 2, 3, 4]
    full.clear()
    assert storage.retry() is True and storage.problem is None and cleared == [f"disk full: cannot write {log}"]
    assert json.loads(status.read_text()) == {"ok": True}


def test_an_io_error_is_reported_over_a_full_disk(tmp_path):
    storage = Storage(probe=lambda: None)
    storage.failed(atomic.WriteFailed(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "a"))
    storage.failed(atomic.WriteFailed(OSError(errno.EIO, "Input/output error"), tmp_path / "b"))
    assert storage.problem == f"Input/output error (EIO): cannot write {tmp_path / 'b'}"


def test_a_failed_replace_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "job.json"
    atomic.write_json_atomic(path, {"v": 1})
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    try:
        atomic.write_json_atomic(path, {"v": 2})
    except atomic.WriteFailed as e:
        assert e.kind == "io_error" and str(path) in e.problem
    else:
        raise AssertionError("the write should have failed")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["job.json"]
