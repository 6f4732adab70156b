"""`[inbox] bad_lines = "skip"`: a file's bad lines (a truncated last line, a stray line), no more than
`max_bad_lines`, are skipped, named and counted, and the worker trains on exactly the other lines; blank
lines are no error anywhere."""

from __future__ import annotations

import json

import pytest

from engine.core import reading
from engine.core.config import ValidationConfig
from engine.data.intake import add_files
from engine.data.validate import validate_file
from workspaces import drop, events, make_workspace, reason, start_daemon, text_lines

FAST = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.5}}
SKIP = {**FAST, "inbox": {**FAST["inbox"], "bad_lines": "skip", "max_bad_lines": 2}}


def test_a_truncated_last_line_is_skipped_named_and_never_read_by_the_worker(tmp_path):
    ws = make_workspace(tmp_path / "ws", SKIP)
    export = "\n".join(text_lines(4)).encode() + b'\n\n{"text": "cut off in the midd'  # a blank, then a cut line
    drop(ws, "export.jsonl", export)
    drop(ws, "noisy.jsonl", "\n".join(text_lines(2) + ["{oops", "[1]", "{\"text\": 5}"]).encode() + b"\n")
    proc = start_daemon(ws, "--once")
    assert proc.wait(120) == 1  # noisy.jsonl is rejected: --once exits 1
    record = json.loads((ws.run_dir("00001-export") / "job.json").read_text())
    assert record["state"] == "done" and record["examples"] == 4  # trained: the fake worker read each record
    assert record["skipped_lines"] == [6] and record["skipped"][0]["line"] == 6
    assert "not valid JSON" in record["skipped"][0]["message"]
    accepted = next(e for e in events(ws) if e["kind"] == "accepted" and e["job_id"] == "00001-export")
    assert accepted["skipped_count"] == 1 and accepted["skipped"] == record["skipped"]
    assert "1 bad line skipped (line 6: not valid JSON" in accepted["message"]
    why = reason(ws, "rejected", "noisy.jsonl")["reason"]
    assert "3 bad lines, more than the 2 that inbox.max_bad_lines lets be skipped" in why


def test_by_default_a_bad_line_rejects_the_file_and_a_blank_line_does_not(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "trailing.jsonl", "\n".join(text_lines(3)).encode() + b"\n\n \n")
    drop(ws, "cut.jsonl", "\n".join(text_lines(3)).encode() + b'\n{"text": "cut')
    proc = start_daemon(ws, "--once")
    assert proc.wait(120) == 1
    assert json.loads((ws.run_dir("00001-trailing") / "job.json").read_text())["state"] == "done"
    why = reason(ws, "rejected", "cut.jsonl")["reason"]
    assert why.startswith("line 4: not valid JSON")
    assert why.endswith("; inbox.bad_lines = 'skip' in traind.toml would skip the bad lines and train on the rest")


def test_traind_add_says_which_lines_the_daemon_will_skip(tmp_path, capsys):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = tmp_path / "export.jsonl"
    src.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "c')
    assert add_files([str(src)], inbox, ValidationConfig(), skip_up_to=2) == 0
    out = capsys.readouterr().out
    assert f"{src}:3: will be skipped: not valid JSON" in out
    assert "2 examples (text)" in out and "1 bad line will be skipped" in out
    assert add_files([str(src)], tmp_path / "inbox", ValidationConfig()) == 1  # reject_file: not added
    assert "not added (invalid)" in capsys.readouterr().out


def test_the_worker_reads_exactly_the_lines_validation_kept(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [b'{"text": "one"}', b"{bad", b"", b'{"text": "two"}', b"   ", b'{"prompt": "p", "completion": "c"}',
             b'{"text": "three"}', b'{"text": "fo']
    path.write_bytes(b"\n".join(lines))
    report = validate_file(path, ValidationConfig(), skip_up_to=5)
    assert report.ok and report.skipped_lines == [2, 6, 8] and report.blank_lines == 2
    with reading.open_jsonl(path) as f:
        kept = list(reading.records(f, frozenset(report.skipped_lines)))
    assert [n for n, _ in kept] == [1, 4, 7] and len(kept) == report.examples


def test_a_skipped_line_is_never_held_whole_by_the_reader(tmp_path):
    path = tmp_path / "data.jsonl"
    huge = b'{"text": "' + b"x" * (8 * reading.BUFFER) + b'"}'  # over max_line_size, say: skipped
    path.write_bytes(b'{"text": "a"}\n' + huge + b'\n{"text": "b"}\n')
    longest = []
    with reading.open_jsonl(path) as f:
        readline = f.readline
        f.readline = lambda size=-1: longest.append(len(line := readline(size))) or line
        assert [n for n, _ in reading.records(f, frozenset({2}))] == [1, 3]
    assert max(longest) <= reading.BUFFER


@pytest.mark.e2e
def test_the_token_cache_and_hold_out_pass_over_the_skipped_lines(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.worker import data

    path = tmp_path / "data.jsonl"
    good = [json.dumps({"text": f"line {i} is a fine example"}) for i in range(20)]
    path.write_text("\n".join(good[:10] + ["{broken"] + good[10:] + ['{"text": "cut']))
    report = validate_file(path, ValidationConfig(), skip_up_to=5)
    assert report.skipped_lines == [11, 22]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(data.DataError, match="line 11"):
        data.build_cache(path, "text", tokenizer, 64, tmp_path / "strict", log=lambda _m: None)
    holdout = {"fraction": 0.5, "min": 10, "max": 10, "seed": 1}
    meta = data.build_cache(path, "text", tokenizer, 64, tmp_path / "cache", log=lambda _m: None, holdout=holdout,
                            holdout_out=tmp_path / "holdout.jsonl", skip_lines=report.skipped_lines)
    assert (meta["examples"], meta["held_out"], meta["bad_lines_skipped"]) == (10, 10, 2)
    held = [json.loads(line) for line in (tmp_path / "holdout.jsonl").read_text().splitlines()]
    assert len(held) == 10 and all(json.dumps(h) in good for h in held)


@pytest.mark.e2e
def test_traind_validate_and_preview_skip_what_the_daemon_would(tmp_path, tiny_model_dir):
    from workspaces import run_cli

    ws = make_workspace(tmp_path / "ws", SKIP, model_dir=tiny_model_dir)
    path = tmp_path / "export.jsonl"
    path.write_text('{"text": "a fine line"}\n{"text": "another one"}\n\n{"text": "cut sho')
    result = run_cli("validate", str(path), "-w", str(ws.root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{path}:4: skipped: not valid JSON" in result.stdout
    assert "ok, 2 examples (text)" in result.stdout and "1 blank line passed over, 1 bad line skipped" in result.stdout
    assert "cut at max_seq_length" in result.stdout and "not measured" not in result.stdout
    doc = json.loads(run_cli("validate", "--json", str(path), "-w", str(ws.root)).stdout)
    assert (doc["files"][0]["skipped_lines"], doc["files"][0]["blank_lines"]) == ([4], 1)
    preview = run_cli("preview", str(path), "-n", "0", "--json", "-w", str(ws.root))
    assert preview.returncode == 0, preview.stderr
    assert json.loads(preview.stdout)["files"][0]["counts"]["examples"] == 2


@pytest.mark.e2e
def test_the_real_worker_trains_a_file_with_skipped_lines(tmp_path, tiny_model_dir):
    from engine.data import demo_data
    from workspaces import run_cli

    settings = {"training": {"max_seq_length": 64, "batch_size": 8}, "jobs": {"warm_worker": False},
                "inbox": {"settle_seconds": 0.5, "bad_lines": "skip", "max_bad_lines": 5}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    records = [json.dumps(r) for r in demo_data.demo_records(60, "text", seed=3)]
    drop(ws, "export.jsonl", "\n".join(records[:30] + ['{"text": 7}'] + records[30:] + ['{"text": "cut']).encode())
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((ws.run_dir("00001-export") / "job.json").read_text())
    assert record["state"] == "done" and record["skipped_lines"] == [31, 62]
    log = (ws.run_dir("00001-export") / "worker.log").read_text()
    assert "2 bad lines passed over, as validation skipped them" in log
