"""Compressed input (.jsonl.gz, .jsonl.zst) and a byte order mark: taken like .jsonl, every limit on the
decompressed bytes (a decompression bomb refused by max_file_size in bounded memory), a damaged stream
reported, and a compressed file's name read well through the inbox, the queue and the job id."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc

import pytest
import zstandard

from engine.core import reading
from engine.data import intake
from engine.core.config import ValidationConfig
from engine.data.validate import validate_file, validate_paths_main
from workspaces import drop, files_in, make_workspace, run_cli, start_daemon, text_lines

LIMITS = ValidationConfig()
DATA = b"".join(json.dumps({"text": f"row {i}: {i}+{i}={2 * i}"}).encode() + b"\n" for i in range(200))
COMPRESS = {".jsonl.gz": gzip.compress, ".jsonl.zst": lambda data: zstandard.ZstdCompressor().compress(data)}


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_compressed_file_validates_as_its_decompressed_lines(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(COMPRESS[suffix](DATA))
    report = validate_file(path, LIMITS)
    assert report.ok, report.errors
    assert (report.examples, report.bytes, report.compression) == (200, len(DATA), reading.COMPRESSION[suffix])
    assert f"{reading.COMPRESSION[suffix]}-compressed" in report.summary()


def test_a_bom_at_the_start_is_skipped_and_noted_in_plain_and_compressed_files(tmp_path, capsys):
    plain, packed = tmp_path / "bom.jsonl", tmp_path / "bom.jsonl.gz"
    plain.write_bytes(reading.BOM + DATA)
    packed.write_bytes(gzip.compress(reading.BOM + DATA))
    assert validate_paths_main([str(plain), str(packed), "--json"][:2], LIMITS, as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(f["ok"], f["bom"], f["examples"]) for f in doc["files"]] == [(True, True, 200), (True, True, 200)]
    assert validate_paths_main([str(plain)], LIMITS) == 0
    assert "byte order mark (BOM) at its start, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_decompression_bomb_is_refused_by_max_file_size_in_bounded_memory(tmp_path, suffix):
    line = json.dumps({"text": "a" * 4000}).encode() + b"\n"
    path = tmp_path / f"bomb{suffix}"
    path.write_bytes(COMPRESS[suffix](line * 16_000))  # 64 MB of lines, a few hundred kB on disk
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        report = validate_file(path, ValidationConfig(max_file_size=8 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not report.ok
    (line_no, message), = report.errors
    assert line_no == 0 and "decompressed" in message and "8 MiB limit (max_file_size)" in message
    assert report.bytes <= (8 << 20) + len(line)  # reading stopped at the limit
    assert peak < 6 << 20, peak


@pytest.mark.parametrize("suffix, damage", [(".jsonl.gz", lambda b: b[: len(b) // 2]),
                                            (".jsonl.zst", lambda b: b[: len(b) // 2]),
                                            (".jsonl.gz", lambda b: b"not gzip at all")])
def test_a_damaged_stream_is_an_error_that_says_so(tmp_path, suffix, damage):
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(damage(COMPRESS[suffix](DATA * 50)))
    report = validate_file(path, LIMITS)
    assert not report.ok and report.unreadable is None
    assert any(f"not a valid {reading.COMPRESSION[suffix]} stream" in message for _, message in report.errors)


def test_the_inbox_and_traind_add_take_compressed_names(tmp_path, capsys):
    assert intake.inbox_name("/x/chats.jsonl.gz") == "chats.jsonl.gz"
    assert intake.inbox_name("/x/chats.json.zst") == "chats.jsonl.zst"
    assert intake.inbox_name("/x/chats.gz") == "chats.jsonl.gz"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = tmp_path / "chats.jsonl.gz"
    src.write_bytes(gzip.compress(DATA))
    assert intake.add_files([str(src), str(src)], inbox, LIMITS) == 0
    assert sorted(p.name for p in inbox.iterdir()) == ["chats-2.jsonl.gz", "chats.jsonl.gz"]
    assert (inbox / "chats.jsonl.gz").read_bytes() == src.read_bytes()  # copied as it is, still compressed
    assert "200 examples (text)" in capsys.readouterr().out
    scan = intake.scan_inbox(inbox, 0.0, time.time() + 10, {})
    assert sorted(p.name for p in scan.ready) == ["chats-2.jsonl.gz", "chats.jsonl.gz"] and not scan.ignored


def test_a_compressed_file_is_claimed_trained_and_kept_under_its_job_name(tmp_path):
    ws = make_workspace(tmp_path / "ws", {"jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.5}})
    drop(ws, "chats.jsonl.zst", zstandard.ZstdCompressor().compress(("\n".join(text_lines(5)) + "\n").encode()))
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 4}})
    assert proc.wait(60) == 0
    assert files_in(ws, "done") == ["00001-chats.jsonl.zst"]
    record = json.loads((ws.run_dir("00001-chats") / "job.json").read_text())
    assert (record["original_name"], record["examples"], record["state"]) == ("chats.jsonl.zst", 5, "done")


def test_the_worker_reads_a_compressed_file_as_the_plain_one_and_a_bom_changes_nothing(tmp_path):
    from engine.worker import data

    plain, packed = tmp_path / "d.jsonl", tmp_path / "d.jsonl.zst"
    plain.write_bytes(reading.BOM + DATA)
    packed.write_bytes(COMPRESS[".jsonl.zst"](DATA))
    held = data.holdout_lines(plain, 0.1, 1, 50, seed=7)
    assert len(held) == 20 and held == data.holdout_lines(packed, 0.1, 1, 50, seed=7)
    batches = list(data.read_batches(plain, skip=held))
    assert batches == list(data.read_batches(packed, skip=held))
    assert batches[0][0] == (1, {"text": "row 0: 0+0=0"}) or 1 in held


@pytest.mark.e2e
def test_the_real_worker_trains_a_compressed_file_with_a_bom(tmp_path, tiny_model_dir):
    from engine.data import demo_data

    settings = {"training": {"max_seq_length": 64, "batch_size": 8, "learning_rate": 2e-3},
                "jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.5}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in demo_data.demo_records(300, "text", seed=4))
    drop(ws, "notes.jsonl.gz", gzip.compress(reading.BOM + lines))
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_in(ws, "done") == ["00001-notes.jsonl.gz"]
    metrics = [json.loads(line) for line in (ws.run_dir("00001-notes") / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in metrics if e["event"] == "step"]
    assert losses and losses[-1] < losses[0]
    held = (ws.run_dir("00001-notes") / "holdout.jsonl").read_bytes()
    assert held and not held.startswith(reading.BOM) and all(line in lines for line in held.splitlines(True))


def test_a_compressed_files_holdout_and_a_compressed_eval_file_are_in_the_eval_suite(tmp_path):
    from engine.quality import suite

    ws = make_workspace(tmp_path / "ws", {"jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.5}})
    drop(ws, "notes.jsonl.zst", zstandard.ZstdCompressor().compress(("\n".join(text_lines(8)) + "\n").encode()))
    assert start_daemon(ws, "--once", hooks={"fake": {"steps": 3}}).wait(60) == 0  # the fake leaves a holdout
    (ws.eval_dir / "fixed.jsonl.gz").write_bytes(gzip.compress(DATA))
    found, problems = suite.sources(ws, ws.load_config())
    assert {s["name"] for s in found} == {"00001-notes", "eval/fixed"} and problems == []
