"""Intake: what the inbox scan takes, waits for, ignores and rejects (never following
links, never blocking), how a claimed file is opened, and `traind add`."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine.core.config import ValidationConfig
from engine.data.intake import UnsafeFile, add_files, inbox_name, open_claimed, scan_inbox

LIMITS = ValidationConfig()
GOOD = b'{"text": "hello"}\n{"text": "world"}\n'
OLD = time.time() - 3600


def put(inbox: Path, name: str, data: bytes = GOOD, mtime: float | None = OLD) -> Path:
    path = inbox / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def inbox(tmp_path):
    d = tmp_path / "inbox"
    d.mkdir()
    return d


def names(paths):
    return [p.name for p in paths]


def test_scan_rejects_links_and_special_files_with_a_reason(inbox, tmp_path):
    put(inbox, "good.jsonl")
    outside = put(tmp_path, "outside.jsonl")
    (inbox / "link.jsonl").symlink_to(outside)
    (inbox / "dangling.jsonl").symlink_to(tmp_path / "nowhere")
    os.mkfifo(inbox / "pipe.jsonl")
    (inbox / "dir.jsonl").mkdir()
    os.link(outside, inbox / "hard.jsonl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "sock.jsonl"))
    try:
        result = scan_inbox(inbox, 2.0, time.time(), {})
    finally:
        sock.close()
    reasons = {p.name: r for p, r in result.rejected}
    assert names(result.ready) == ["good.jsonl"]
    assert set(reasons) == {"link.jsonl", "dangling.jsonl", "pipe.jsonl", "dir.jsonl", "hard.jsonl", "sock.jsonl"}
    assert "symbolic link" in reasons["link.jsonl"] and "symbolic link" in reasons["dangling.jsonl"]
    assert "FIFO" in reasons["pipe.jsonl"]
    assert "directory" in reasons["dir.jsonl"]
    assert "socket" in reasons["sock.jsonl"]
    assert reasons["hard.jsonl"] == ("has 2 hard links: another name could still change it; "
                                     "copy it into the inbox instead")
    assert result.waiting == []


def test_in_progress_names_are_ignored_until_renamed(inbox):
    put(inbox, ".hidden.jsonl")
    put(inbox, "upload.jsonl.part")
    put(inbox, "upload.jsonl.tmp")
    put(inbox, "notes.txt")
    (inbox / "subdir").mkdir()
    result = scan_inbox(inbox, 2.0, time.time(), {})
    assert (result.ready, result.rejected, result.waiting) == ([], [], [])
    assert names(result.ignored) == ["notes.txt", "subdir"]  # the daemon logs these once

    os.rename(inbox / "upload.jsonl.part", inbox / "upload.jsonl")
    assert names(scan_inbox(inbox, 2.0, time.time(), {}).ready) == ["upload.jsonl"]


def test_file_being_written_waits_until_it_settles(inbox):
    path = put(inbox, "growing.jsonl", b'{"text": "a"}\n', mtime=None)
    t0 = path.stat().st_mtime
    seen: dict = {}
    assert names(scan_inbox(inbox, 2.0, t0 + 0.1, seen).waiting) == ["growing.jsonl"]
    assert names(scan_inbox(inbox, 2.0, t0 + 1.5, seen).waiting) == ["growing.jsonl"]  # same, not long enough

    with open(path, "ab") as f:  # the writer goes on: the clock restarts
        f.write(b'{"text": "b"}\n')
    os.utime(path, ns=(path.stat().st_atime_ns, int((t0 + 1.6) * 1e9)))
    r = scan_inbox(inbox, 2.0, t0 + 1.7, seen)
    assert names(r.waiting) == ["growing.jsonl"] and r.ready == []
    assert names(scan_inbox(inbox, 2.0, t0 + 3.5, seen).waiting) == ["growing.jsonl"]  # last write 1.9 s ago
    r = scan_inbox(inbox, 2.0, t0 + 3.7, seen)
    assert names(r.ready) == ["growing.jsonl"] and r.waiting == []


def test_file_with_a_future_mtime_is_ready_once_unchanged_for_settle_seconds(inbox):
    now = time.time()
    put(inbox, "skewed.jsonl", mtime=now + 3600)  # e.g. written over NFS by a host whose clock is ahead
    seen: dict = {}
    assert names(scan_inbox(inbox, 2.0, now, seen).waiting) == ["skewed.jsonl"]
    assert names(scan_inbox(inbox, 2.0, now + 1.9, seen).waiting) == ["skewed.jsonl"]
    assert names(scan_inbox(inbox, 2.0, now + 2.0, seen).ready) == ["skewed.jsonl"]


def test_file_renamed_in_with_an_old_mtime_is_ready_at_once(inbox):
    put(inbox, "done.jsonl", mtime=time.time() - 10)
    assert names(scan_inbox(inbox, 2.0, time.time(), {}).ready) == ["done.jsonl"]


def test_input_suffixes_are_taken_in_any_case_and_claimed_under_the_usual_one(inbox, tmp_path):
    import gzip

    from engine.data import validate
    from engine.store import jobs
    from engine.store.workspace import Workspace

    put(inbox, "alpaca.JSONL")
    put(inbox, "chats.Jsonl.GZ", gzip.compress(GOOD))
    scan = scan_inbox(inbox, 2.0, time.time(), {})
    assert sorted(names(scan.ready)) == ["alpaca.JSONL", "chats.Jsonl.GZ"] and not scan.ignored
    ws = Workspace.at(tmp_path)
    ws.create_folders()
    for n, path in enumerate(sorted(scan.ready), start=1):
        os.rename(path, ws.inbox / path.name)
        job = jobs.claim(ws, ws.inbox / path.name, n)
        report = validate.validate_file(job.path_in("pending"), LIMITS)
        assert report.ok and report.examples == 2, report.format_text()
        assert [p.name for p in ws.queue("pending").iterdir() if p.name.startswith(f"{n:05d}")] == [job.name]
    assert sorted(names(ws.queue("pending").iterdir())) == ["00001-alpaca.jsonl", "00002-chats.jsonl.gz"]


def test_seen_forgets_files_that_went(inbox):
    path = put(inbox, "x.jsonl", mtime=None)
    seen: dict = {}
    scan_inbox(inbox, 2.0, path.stat().st_mtime, seen)
    assert "x.jsonl" in seen
    path.unlink()
    scan_inbox(inbox, 2.0, time.time(), seen)
    assert seen == {}


def test_ready_in_arrival_order(inbox, tmp_path):
    for name in ["b.jsonl", "c.jsonl", "a.jsonl"]:
        staged = put(tmp_path, name)
        os.rename(staged, inbox / name)  # the rename is the arrival: it sets ctime
        time.sleep(0.02)
    assert names(scan_inbox(inbox, 2.0, time.time(), {}).ready) == ["b.jsonl", "c.jsonl", "a.jsonl"]


def test_open_claimed_reads_a_plain_file_in_blocking_mode(inbox):
    path = put(inbox, "good.jsonl")
    with open_claimed(path) as f:
        assert not fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert f.read() == GOOD


def test_open_claimed_refuses_a_symlink(inbox, tmp_path):
    (inbox / "link.jsonl").symlink_to(put(tmp_path, "target.jsonl"))
    with pytest.raises(UnsafeFile, match="symbolic link"):
        open_claimed(inbox / "link.jsonl")


def test_open_claimed_refuses_a_fifo_without_blocking(inbox):
    os.mkfifo(inbox / "pipe.jsonl")
    outcome = []

    def run():
        try:
            open_claimed(inbox / "pipe.jsonl")
        except UnsafeFile as e:
            outcome.append(e.reason)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert outcome and "FIFO" in outcome[0]


def test_open_claimed_refuses_hard_links_and_directories(inbox, tmp_path):
    os.link(put(tmp_path, "other.jsonl"), inbox / "hard.jsonl")
    with pytest.raises(UnsafeFile, match="2 hard links"):
        open_claimed(inbox / "hard.jsonl")
    (inbox / "dir.jsonl").mkdir()
    with pytest.raises(UnsafeFile, match="directory"):
        open_claimed(inbox / "dir.jsonl")
    with pytest.raises(FileNotFoundError):
        open_claimed(inbox / "gone.jsonl")


def test_add_copies_durably_keeping_mtime_and_leaves_no_temp_file(inbox, tmp_path, capsys):
    src = put(tmp_path, "data.jsonl", mtime=OLD)
    assert add_files([str(src)], inbox, LIMITS) == 0
    dst = inbox / "data.jsonl"
    assert dst.read_bytes() == GOOD
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns and dst.stat().st_nlink == 1
    assert [p.name for p in inbox.iterdir()] == ["data.jsonl"]
    assert f"added {src} -> {dst}: 2 examples (text)" in capsys.readouterr().out
    assert names(scan_inbox(inbox, 2.0, time.time(), {}).ready) == ["data.jsonl"]


def test_add_never_overwrites(inbox, tmp_path, capsys):
    existing = put(inbox, "data.jsonl", b'{"text": "already here"}\n')
    src = put(tmp_path, "data.jsonl")
    assert add_files([str(src)], inbox, LIMITS) == 0
    assert add_files([str(src)], inbox, LIMITS) == 0
    assert existing.read_bytes() == b'{"text": "already here"}\n'
    assert sorted(p.name for p in inbox.iterdir()) == ["data-2.jsonl", "data-3.jsonl", "data.jsonl"]
    assert (inbox / "data-2.jsonl").read_bytes() == GOOD
    assert "(data.jsonl was taken)" in capsys.readouterr().out


def test_add_refuses_invalid_and_unreadable_files(inbox, tmp_path, capsys):
    bad = put(tmp_path, "bad.jsonl", b'{"text": "ok"}\n{"text": NaN}\n')
    good = put(tmp_path, "good.jsonl")
    assert add_files([str(bad), str(good)], inbox, LIMITS) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: NaN" in out and f"{bad}: not added (invalid)" in out
    assert sorted(p.name for p in inbox.iterdir()) == ["good.jsonl"]

    assert add_files([str(tmp_path / "missing.jsonl"), str(bad)], inbox, LIMITS) == 2
    assert "missing.jsonl: cannot read: no such file; not added" in capsys.readouterr().err
    assert add_files([str(good)], tmp_path / "no-inbox", LIMITS) == 2
    assert sorted(p.name for p in inbox.iterdir()) == ["good.jsonl"]


def test_add_gives_the_copy_a_name_the_daemon_takes(inbox, tmp_path):
    assert inbox_name("/x/train.json") == "train.jsonl"
    assert inbox_name("/x/.hidden.jsonl") == "hidden.jsonl"
    assert inbox_name("/x/upload.jsonl.part") == "upload.jsonl"
    assert inbox_name("notes") == "notes.jsonl"
    src = put(tmp_path, "train.json")
    assert add_files([str(src)], inbox, LIMITS) == 0
    assert names(scan_inbox(inbox, 2.0, time.time(), {}).ready) == ["train.jsonl"]


def test_a_killed_adds_temp_copy_is_removed_and_a_live_ones_is_kept(tmp_path):
    from engine.data.intake import remove_stale_add_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".data.jsonl.{dead.pid}.tmp"
    live = tmp_path / f".data.jsonl.{os.getpid()}.tmp"
    user_file = tmp_path / ".notes.tmp"
    for p in (stale, live, user_file):
        p.write_text("x")
    assert remove_stale_add_temps(tmp_path) == [stale]
    assert live.exists() and user_file.exists() and not stale.exists()
