"""Validation: each kind of bad input is reported on the right line with a message that
names the problem (and the limit, where one applies); good files pass; memory stays
bounded on a huge line; the --json schema and the exit codes are stable."""

from __future__ import annotations

import io
import json
import os
import threading
import tracemalloc

import orjson
import pytest

from engine.core.config import ValidationConfig
from engine.data.validate import (Report, UnreadableFile, human_size, validate_file, validate_fileobj,
                             validate_paths_main)

LIMITS = ValidationConfig()

TEXT = b'{"text": "The cat sat on the mat."}\n'
PC = b'{"prompt": "2+2=", "completion": " 4"}\n'
MESSAGES = (b'{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, '
            b'{"role": "assistant", "content": "Hello."}]}\n')


def write(tmp_path, data: bytes, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def check(tmp_path, data: bytes, limits: ValidationConfig = LIMITS) -> Report:
    return validate_file(write(tmp_path, data), limits)


def only_error(report: Report) -> tuple[int, str]:
    assert not report.ok
    assert report.error_count == 1, report.errors
    return report.errors[0]


@pytest.mark.parametrize("data, fmt, count", [
    (TEXT * 3, "text", 3),
    (PC * 2, "prompt_completion", 2),
    (MESSAGES * 5, "messages", 5),
    (TEXT.rstrip(b"\n"), "text", 1),  # no final newline
    (TEXT.replace(b"\n", b"\r\n") * 2, "text", 2),  # CRLF
    (b'{"prompt": "", "completion": "unconditional", "id": 7, "meta": {"src": ["a"]}}\n', "prompt_completion", 1),
    ('{"text": "café 東京 😀 \\u00e9"}\n'.encode(), "text", 1),
])
def test_good_file_of_each_format_is_ok_with_its_count(tmp_path, data, fmt, count):
    report = check(tmp_path, data)
    assert report.ok, report.errors
    assert (report.format, report.examples, report.error_count, report.errors) == (fmt, count, 0, [])
    assert report.bytes == len(data)
    assert report.lines == count


@pytest.mark.parametrize("data, line, words", [
    (TEXT + b'{"text": "unterminated\n', 2, ["not valid JSON", "column"]),
    (TEXT + b'{"text": "a"} trailing\n', 2, ["not valid JSON"]),
    (TEXT + b'{"text": "x", "score": NaN}\n', 2, ["NaN", "non-finite"]),
    (TEXT + b'{"text": "x", "score": -Infinity}\n', 2, ["-Infinity", "non-finite"]),
    (TEXT + b'{"text": "x", "score": 1e999}\n', 2, ["Infinity", "non-finite"]),
    (TEXT + b'{"text": "caf\xe9"}\n', 2, ["not valid UTF-8", "byte column 14"]),
    (TEXT + b'{"text": "\xed\xa0\x80"}\n', 2, ["not valid UTF-8"]),  # an encoded surrogate
    (TEXT + b'{"text": "\\ud800"}\n', 2, ["surrogate"]),
    (TEXT + b'\xef\xbb\xbf' + TEXT, 2, ["byte order mark", "only at the very start"]),
    (TEXT + b'["text", "x"]\n', 2, ["expected a JSON object", "array"]),
    (TEXT + b'5\n', 2, ["expected a JSON object", "got a number"]),  # a scalar line, not a container
    (TEXT + b'null\n', 2, ["expected a JSON object", "got null"]),
    (TEXT + b'{"body": "x"}\n', 2, ["no known format's keys", "'body'", "'text' format (set by line 1)"]),
    (TEXT + b'{"text": 3}\n', 2, ["'text' must be a string"]),
    (TEXT + b'{"text": ""}\n', 2, ["'text' is empty"]),
    (TEXT + b'{"text": " \\n\\t "}\n', 2, ["'text' is blank"]),
    (PC + b'{"prompt": "q"}\n', 2, ["without 'completion'"]),
    (PC + b'{"prompt": "q", "completion": "   "}\n', 2, ["'completion' is blank"]),
    (PC + b'{"prompt": "q", "completion": "a", "text": "t"}\n', 2, ["two formats", "'text'", "'prompt'/'completion'"]),
    (MESSAGES + b'{"messages": []}\n', 2, ["'messages' is empty"]),
    (MESSAGES + b'{"messages": [{"role": "user", "content": "hi"}]}\n', 2, ["no assistant message"]),
    (MESSAGES + b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n', 2,
     ["messages[1].content is blank"]),
    (MESSAGES + b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', 2,
     ["messages[0].role", "'system', 'user', 'assistant' or 'tool'"]),
    (MESSAGES + b'{"messages": [{"role": "assistant"}]}\n', 2, ["messages[0] has no 'content'"]),
    (MESSAGES + b'{"messages": "hello"}\n', 2, ["'messages' must be an array"]),
    (TEXT + PC, 2, ["'prompt_completion' format", "'text' format (set by line 1)", "one format per file"]),
])
def test_each_bad_kind_is_reported_on_its_line(tmp_path, data, line, words):
    got_line, message = only_error(check(tmp_path, data))
    assert got_line == line
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("data, blank", [
    (TEXT * 2 + b"\n", 1),  # an export's trailing empty line
    (TEXT * 2 + b"\n\n  \r\n", 3),
    (TEXT + b"\n" + TEXT, 1),
    (TEXT + b"   \t\n" + TEXT, 1),
])
def test_blank_lines_are_passed_over_and_noted_not_errors(tmp_path, data, blank):
    report = check(tmp_path, data)
    assert report.ok and report.examples == 2 and report.blank_lines == blank
    noun = "line" if blank == 1 else "lines"
    assert report.summary().endswith(f", {blank} blank {noun} passed over")


def test_bad_lines_within_the_bound_are_skipped_and_named_every_one(tmp_path):
    truncated = b'{"text": "The dog sat on the'
    data = TEXT + b'{"bad\n' + TEXT + PC + TEXT + b"\n" + truncated  # JSON, another format, a cut last line
    strict = check(tmp_path, data)  # reject_file, the default: refused, saying what would do
    assert not strict.ok and strict.format_text().splitlines()[-2] == (
        f"{tmp_path}/data.jsonl: inbox.bad_lines = 'skip' in traind.toml would skip the bad lines and train on the rest")
    report = validate_file(write(tmp_path, data), LIMITS, skip_up_to=3)
    assert report.ok and report.examples == 3 and report.blank_lines == 1
    assert report.skipped_lines == [2, 4, 7]
    assert [line for line, _ in report.skipped] == [2, 4, 7]
    assert "not valid JSON" in report.skipped[0][1] and "one format per file" in report.skipped[1][1]
    text = report.format_text().splitlines()
    assert text[0].startswith(f"{tmp_path}/data.jsonl:2: skipped: not valid JSON")
    assert text[-1].endswith(", 3 bad lines skipped")
    doc = report.to_json()
    assert (doc["ok"], doc["skipped_count"], doc["skipped_lines"]) == (True, 3, [2, 4, 7])

    shown = validate_file(write(tmp_path, data), ValidationConfig(max_errors_shown=1), skip_up_to=3)
    assert shown.skipped_lines == [2, 4, 7] and len(shown.skipped) == 1  # all by number, the first with why
    assert shown.summary().endswith("3 bad lines skipped (first 1 shown)")


def test_more_bad_lines_than_the_bound_reject_the_file_naming_the_limit(tmp_path):
    report = validate_file(write(tmp_path, TEXT * 3 + b"{bad\n" * 4), LIMITS, skip_up_to=3)
    assert not report.ok and report.skipped_lines == []
    assert report.errors[0] == (0, "4 bad lines, more than the 3 that inbox.max_bad_lines lets be skipped: "
                                   "the whole file is rejected")
    assert [line for line, _ in report.errors[1:]] == [4, 5, 6, 7]


@pytest.mark.parametrize("data", [
    b"{bad\n" * 2,  # no example left
    b'{"x": 1}\n' * 2,  # no line in a known format: the whole file's error
])
def test_a_file_with_nothing_good_is_rejected_even_when_bad_lines_may_be_skipped(tmp_path, data):
    assert not validate_file(write(tmp_path, data), LIMITS, skip_up_to=10).ok
    assert not check(tmp_path, data).could_skip  # skipping would not do: no hint that it would


def test_mixed_formats_after_invalid_first_line_names_the_first_valid_line(tmp_path):
    report = check(tmp_path, b'{"bad": 1}\n' + MESSAGES + TEXT)
    assert [line for line, _ in report.errors] == [1, 3]
    assert "(set by line 2)" in report.errors[1][1]
    assert report.format == "messages"


def test_empty_file_needs_an_example(tmp_path):
    line, message = only_error(check(tmp_path, b""))
    assert line == 0 and "empty" in message and "at least one example" in message


def test_too_deep_is_reported_with_the_limit(tmp_path):
    deep = b'{"text": "x", "extra": ' + b"[" * 10 + b"]" * 10 + b"}\n"
    line, message = only_error(check(tmp_path, TEXT + deep, ValidationConfig(max_json_depth=8)))
    assert line == 2 and "deeper than the 8-level limit (max_json_depth)" in message
    assert check(tmp_path, deep, ValidationConfig(max_json_depth=11)).ok  # exactly at the limit
    # Bracket characters inside strings do not count.
    assert check(tmp_path, b'{"text": "' + b"[{" * 500 + b'"}\n', ValidationConfig(max_json_depth=2)).ok


def test_messages_count_their_own_depth(tmp_path):
    line, message = only_error(check(tmp_path, MESSAGES, ValidationConfig(max_json_depth=2)))
    assert "max_json_depth" in message
    assert check(tmp_path, MESSAGES, ValidationConfig(max_json_depth=3)).ok


def test_input_too_deep_for_the_parser_is_reported_as_too_deep(tmp_path):
    deep = b'{"text": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"
    line, message = only_error(check(tmp_path, TEXT + deep))
    assert line == 2 and "deeper than the 64-level limit (max_json_depth)" in message
    line, message = only_error(check(tmp_path, TEXT + deep, ValidationConfig(max_json_depth=100_000)))
    assert "deeper than 1024 levels" in message and "max_json_depth" in message


def test_over_long_line_names_the_limit_and_validation_continues(tmp_path):
    long = b'{"text": "' + b"a" * 5000 + b'"}\n'
    report = check(tmp_path, TEXT + long + b'{"oops"\n' + TEXT, ValidationConfig(max_line_size=1000))
    assert report.error_count == 2 and report.lines == 4 and report.examples == 2
    line, message = report.errors[0]
    assert line == 2 and f"{len(long) - 1:,} bytes" in message and "over the 1,000-byte limit (max_line_size)" in message
    assert report.errors[1][0] == 3


def test_line_exactly_at_the_limit_is_accepted(tmp_path):
    line = b'{"text": "' + b"a" * 88 + b'"}'
    assert len(line) == 100
    assert check(tmp_path, line + b"\n" + line, ValidationConfig(max_line_size=100)).ok
    assert not check(tmp_path, line + b" \n", ValidationConfig(max_line_size=100)).ok


def test_huge_line_keeps_memory_bounded(tmp_path):
    size = 48 * 2**20
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(TEXT)
        f.write(b'{"text": "')
        chunk = b"x" * 2**20
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(b'"}\n')
        f.write(TEXT)
    limits = ValidationConfig(max_line_size=2**20)
    tracemalloc.start()
    try:
        report = validate_file(path, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.error_count == 1 and report.errors[0][0] == 2
    assert "over the 1 MiB limit (max_line_size)" in report.errors[0][1]
    assert report.examples == 2 and report.lines == 3
    assert peak < 8 * 2**20, f"peak {peak:,} bytes for a {size:,}-byte line"


def test_file_over_the_size_limit_is_refused_without_reading(tmp_path):
    path = write(tmp_path, TEXT * 100)
    report = validate_file(path, ValidationConfig(max_file_size=1000))
    line, message = only_error(report)
    assert line == 0 and "over the 1,000-byte limit (max_file_size)" in message
    assert report.lines == 0 and report.bytes == len(TEXT) * 100


def test_file_without_fstat_is_still_held_to_the_size_limit():
    report = validate_fileobj(io.BytesIO(TEXT * 100), "stream", ValidationConfig(max_file_size=1000))
    assert not report.ok and "max_file_size" in report.errors[-1][1]


def test_only_the_first_errors_are_listed_but_all_are_counted(tmp_path):
    report = check(tmp_path, TEXT + b"{bad\n" * 50, ValidationConfig(max_errors_shown=5))
    assert report.error_count == 50 and len(report.errors) == 5
    assert [line for line, _ in report.errors] == [2, 3, 4, 5, 6]
    assert report.format_text().splitlines()[-1].endswith("data.jsonl: 50 errors in 51 lines (first 5 shown)")
    assert report.to_json()["errors_truncated"] is True


def test_text_report(tmp_path):
    report = check(tmp_path, TEXT + b"{bad\n")
    lines = report.format_text().splitlines()
    assert lines[0].startswith(f"{tmp_path}/data.jsonl:2: not valid JSON")
    assert lines[-1] == f"{tmp_path}/data.jsonl: 1 error in 2 lines"
    ok = validate_fileobj(io.BytesIO(MESSAGES * 1204), "data.jsonl", LIMITS)
    assert ok.format_text() == f"data.jsonl: ok, 1,204 examples (messages), {human_size(len(MESSAGES) * 1204)}"
    assert human_size(3_100_000) == "3.1 MB" and human_size(999) == "999 B"


def test_json_report_schema(tmp_path):
    doc = check(tmp_path, TEXT + b"{bad\n").to_json()
    assert list(doc) == ["schema", "path", "ok", "format", "examples", "lines", "bytes", "error_count", "errors",
                         "errors_truncated", "unreadable", "compression", "bom", "blank_lines", "skipped_count",
                         "skipped", "skipped_lines"]
    assert doc["schema"] == 1 and doc["ok"] is False and doc["format"] == "text"
    assert doc["errors"] == [{"line": 2, "message": doc["errors"][0]["message"]}]
    assert json.loads(json.dumps(doc)) == doc


def test_validate_paths_main_exit_codes_and_json(tmp_path, capsys):
    good = write(tmp_path, TEXT, "good.jsonl")
    bad = write(tmp_path, b"{bad\n", "bad.jsonl")
    missing = tmp_path / "missing.jsonl"

    assert validate_paths_main([str(good)], LIMITS, False) == 0
    assert "good.jsonl: ok, 1 example (text)" in capsys.readouterr().out
    assert validate_paths_main([str(good), str(bad)], LIMITS, False) == 1
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().out
    assert validate_paths_main([str(good), str(bad), str(missing)], LIMITS, False) == 2
    assert "missing.jsonl: cannot read: no such file" in capsys.readouterr().err
    assert validate_paths_main([], LIMITS, False) == 2
    capsys.readouterr()

    assert validate_paths_main([str(good), str(bad), str(missing), str(tmp_path)], LIMITS, True) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert captured.err == ""
    assert (doc["schema"], doc["ok"], doc["exit_code"]) == (1, False, 2)
    assert [(f["path"], f["ok"], f["unreadable"]) for f in doc["files"]] == [
        (str(good), True, None), (str(bad), False, None), (str(missing), False, "no such file"),
        (str(tmp_path), False, "is a directory, not a regular file")]
    assert all(f["schema"] == 1 for f in doc["files"])


def test_unreadable_files_raise(tmp_path):
    with pytest.raises(UnreadableFile, match="no such file"):
        validate_file(tmp_path / "nope.jsonl", LIMITS)
    with pytest.raises(UnreadableFile, match="directory"):
        validate_file(tmp_path, LIMITS)


def test_fifo_is_unreadable_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    outcome = []

    def run():
        try:
            validate_file(fifo, LIMITS)
        except UnreadableFile as e:
            outcome.append(e.reason)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "validating a FIFO blocked"
    assert outcome and "FIFO" in outcome[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_is_unreadable(tmp_path):
    path = write(tmp_path, TEXT)
    path.chmod(0)
    with pytest.raises(UnreadableFile, match="permission denied"):
        validate_file(path, LIMITS)


def test_validation_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, engine.data.validate, engine.data.intake; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"


def test_error_messages_are_valid_json_strings_for_hostile_input(tmp_path):
    report = check(tmp_path, TEXT + b'{"messages": [{"role": "\\u0000' + b"r" * 500 + b'", "content": "x"}]}\n')
    assert len(report.errors[0][1]) < 300
    orjson.dumps(report.to_json())
