"""Validation on generated files: valid records of the three formats pass; one broken line among
valid ones is the only error, on its own line number, with its reason; and anything at all (random
bytes, mutated records, hostile lines: huge, deep, invalid UTF-8, NaN, wrong types) gives a
consistent report, never an exception."""

from __future__ import annotations

import io
import json
import os
import tempfile

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from budget import examples
from engine.core.config import ValidationConfig
from engine.data.formats import ROLES
from engine.data.validate import validate_file, validate_fileobj

LIMITS = ValidationConfig(max_line_size=64 * 1024)
FUZZ = settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The three plainest formats are generated here; every format is tested in test_formats.py.
FORMATS = ("text", "prompt_completion", "messages")
# Keys an extra key must not be: the marker keys of every format, and what a message or a record may hold.
FORMAT_KEYS = ("text", "prompt", "completion", "messages", "conversations", "instruction", "output", "tools")
MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")

# -- valid records ----------------------------------------------------------------------------

words = st.text(max_size=40)
content = words.filter(lambda s: s and not s.isspace())
scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | words
shallow = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=3),
                       max_leaves=6)


def extras(reserved: tuple[str, ...]):
    return st.dictionaries(st.text(max_size=8).filter(lambda k: k not in reserved), shallow, max_size=2)


@st.composite
def message_lists(draw) -> list[dict]:
    def message(role):
        return st.builds(lambda c, x: {"role": role, "content": c, **x}, content, extras(MESSAGE_KEYS))
    before = draw(st.lists(st.sampled_from(ROLES).flatmap(message), max_size=2))
    after = draw(st.lists(st.sampled_from(ROLES).flatmap(message), max_size=2))
    return before + [draw(message("assistant"))] + after


RECORDS = {
    "text": st.builds(lambda t, x: {"text": t, **x}, content, extras(FORMAT_KEYS)),
    "prompt_completion": st.builds(lambda p, c, x: {"prompt": p, "completion": c, **x}, words, content,
                                   extras(FORMAT_KEYS)),
    "messages": st.builds(lambda m, x: {"messages": m, **x}, message_lists(), extras(FORMAT_KEYS)),
}


def serialized(record, ascii_only: bool) -> bytes:
    return json.dumps(record, ensure_ascii=ascii_only).encode()


@st.composite
def valid_files(draw, fmt: str | None = None) -> tuple[str, list[bytes]]:
    """(format, lines without their line ends)."""
    fmt = fmt or draw(st.sampled_from(FORMATS))
    records = draw(st.lists(RECORDS[fmt], min_size=1, max_size=12))
    ascii_only = draw(st.booleans())
    return fmt, [serialized(r, ascii_only) for r in records]


def joined(lines: list[bytes], ending: bytes = b"\n", final: bool = True) -> bytes:
    return ending.join(lines) + (ending if final else b"")


def validate(data: bytes, limits: ValidationConfig = LIMITS, skip_up_to: int | None = None):
    return validate_fileobj(io.BytesIO(data), "data.jsonl", limits, skip_up_to)


@FUZZ
@given(valid_files(), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_generated_valid_files_of_each_format_are_ok(file, ending, final):
    fmt, lines = file
    data = joined(lines, ending, final)
    report = validate(data)
    assert report.ok, report.errors
    assert (report.format, report.examples, report.lines, report.bytes, report.errors) == \
        (fmt, len(lines), len(lines), len(data), [])


# -- one broken line --------------------------------------------------------------------------

INVALID_UTF8 = [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]
NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"]
WRONG_TYPES = st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(-1e6, 1e6) | \
    st.lists(st.integers(0, 9), max_size=3) | st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2)


def with_field(line: bytes, raw_value: bytes) -> bytes:
    """The record on `line` with one more key, its value written raw (so it can be invalid JSON)."""
    assert line.endswith(b"}")
    return line[:-1] + b', "zz_extra": ' + raw_value + b"}"


@st.composite
def broken_lines(draw, fmt: str) -> tuple[bytes, str]:
    """(a line that is certainly invalid, what its error must say), built from a valid record of fmt."""
    record = draw(RECORDS[fmt])
    line = serialized(record, ascii_only=True)  # every byte a character: cut or insert anywhere
    kind = draw(st.sampled_from(["utf8", "non_finite", "deep", "wrong_type", "blank_field", "not_object",
                                 "two_formats", "truncated", "bom", "huge"]))
    if kind == "utf8":
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(st.sampled_from(INVALID_UTF8)) + line[at:], "not valid UTF-8 at byte column"
    if kind == "non_finite":
        return with_field(line, draw(st.sampled_from(NON_FINITE))), "non-finite numbers"
    if kind == "deep":
        depth = draw(st.integers(LIMITS.max_json_depth, 30000))
        return with_field(line, b"[" * depth + b"]" * depth), "JSON nesting is deeper than"
    if kind == "wrong_type":
        return wrong_type(draw, fmt, record)
    if kind == "blank_field":
        key = {"text": "text", "prompt_completion": "completion", "messages": None}[fmt]
        blank = draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))
        if key is None:
            i = draw(st.integers(0, len(record["messages"]) - 1))
            record["messages"][i]["content"] = blank
            return serialized(record, True), f"messages[{i}].content is"
        return serialized({**record, key: blank}, True), f"'{key}' is"
    if kind == "not_object":
        value = draw(st.lists(scalars, max_size=3) | scalars)
        return serialized(value, True), "expected a JSON object {...} on each line, got"
    if kind == "two_formats":
        other = draw(st.sampled_from([f for f in FORMATS if f != fmt]))
        return serialized({**draw(RECORDS[other]), **record}, True), "has keys of two formats"
    if kind == "truncated":
        return line[:draw(st.integers(1, len(line) - 1))], "not valid JSON"
    if kind == "bom":
        return b"\xef\xbb\xbf" + line, "byte order mark"
    size = draw(st.integers(LIMITS.max_line_size + 1, 3 * LIMITS.max_line_size))
    return with_field(line, b'"' + b"x" * size + b'"'), "limit (max_line_size)"


def wrong_type(draw, fmt: str, record: dict) -> tuple[bytes, str]:
    value = draw(WRONG_TYPES)
    if fmt == "text":
        return serialized({**record, "text": value}, True), "'text' must be a string"
    if fmt == "prompt_completion":
        key = draw(st.sampled_from(["prompt", "completion"]))
        says = "both must be strings" if isinstance(value, list) else f"'{key}' must be a string"
        return serialized({**record, key: value}, True), says
    target = draw(st.sampled_from(["messages", "message", "role", "content"]))
    if target == "messages":
        assume(not isinstance(value, list))  # an array is checked message by message
        return serialized({**record, "messages": value}, True), "'messages' must be an array"
    i = draw(st.integers(0, len(record["messages"]) - 1))
    if target == "message":
        assume(not isinstance(value, dict))
        record["messages"][i] = value
        return serialized(record, True), f"messages[{i}] must be an object"
    record["messages"][i][target] = value
    # content: a string, text parts or (with tool calls) null; anything else is refused by name
    expected = f"messages[{i}].role is" if target == "role" else f"messages[{i}].content"
    return serialized(record, True), expected


@st.composite
def files_with_one_broken_line(draw):
    fmt, lines = draw(valid_files())
    bad, says = draw(broken_lines(fmt))
    # A byte order mark starting the file is skipped (and noted); anywhere else it is an error.
    at = draw(st.integers(1 if says == "byte order mark" else 0, len(lines)))
    return fmt, lines[:at] + [bad] + lines[at:], at + 1, says


@FUZZ
@given(files_with_one_broken_line())
def test_one_broken_line_is_the_only_error_on_its_own_line_with_its_reason(case):
    fmt, lines, lineno, says = case
    report = validate(joined(lines))
    assert not report.ok and report.error_count == 1, report.errors
    (line, message), = report.errors
    assert line == lineno and says in message, (lineno, says, message)
    assert (report.lines, report.examples, report.format) == (len(lines), len(lines) - 1, fmt)
    skipping = validate(joined(lines), skip_up_to=1)  # [inbox] bad_lines = "skip": that line, and only it
    assert skipping.ok == (report.examples > 0)
    if skipping.ok:
        assert skipping.skipped_lines == [lineno] and skipping.skipped == [(line, message)]
        assert (skipping.examples, skipping.format) == (report.examples, fmt)


@FUZZ
@given(valid_files(), st.data())
def test_blank_lines_anywhere_are_passed_over(file, data):
    fmt, lines = file
    blanks = data.draw(st.lists(st.tuples(st.integers(0, len(lines)), st.sampled_from([b"", b" ", b"\t", b"  \t "])),
                                max_size=4))
    for at, blank in sorted(blanks, reverse=True):
        lines = lines[:at] + [blank] + lines[at:]
    report = validate(joined(lines))
    assert report.ok and (report.examples, report.format, report.blank_lines) == (len(lines) - len(blanks), fmt,
                                                                                 len(blanks))


@settings(FUZZ, max_examples=examples(100))
@given(valid_files(), st.data())
def test_a_line_in_another_format_is_refused_after_the_first_sets_the_files(file, data):
    fmt, lines = file
    other = data.draw(st.sampled_from([f for f in FORMATS if f != fmt]))
    at = data.draw(st.integers(1, len(lines)))
    lines = lines[:at] + [serialized(data.draw(RECORDS[other]), True)] + lines[at:]
    report = validate(joined(lines))
    assert report.errors == [(at + 1, f"line is in the '{other}' format but the file is in the '{fmt}' format "
                                      "(set by line 1): use one format per file")]


# -- anything at all --------------------------------------------------------------------------

json_anything = st.recursive(
    st.none() | st.booleans() | st.integers(-10**40, 10**40) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FORMAT_KEYS) | st.text(max_size=6),
                                                                inner, max_size=3),
    max_leaves=12)


@st.composite
def mutated(draw) -> bytes:
    """A valid record with a few bytes replaced, inserted or deleted."""
    line = bytearray(serialized(draw(RECORDS[draw(st.sampled_from(FORMATS))]), draw(st.booleans())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(line)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        if op == "insert" or at == len(line):
            line[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif op == "replace":
            line[at] = draw(st.integers(0, 255))
        else:
            del line[at]
    return bytes(line)


hostile = st.one_of(
    st.binary(max_size=300),
    json_anything.map(lambda v: json.dumps(v).encode()),  # NaN and Infinity included
    st.builds(lambda n, o: o * n, st.integers(1, 50000), st.sampled_from([b"[", b"{\"a\":", b"[{\"text\": "])),
    st.builds(lambda n: b'{"text": ' + b"9" * n + b"}", st.integers(1, 5000)),
    st.sampled_from([b'{"text": "\\ud800"}', b'{"text": "a"} {"text": "b"}', b"\xef\xbb\xbf{}", b'{"text": NaN}',
                     b'{"messages": []}', b'{"messages": [{"role": "user", "content": "hi"}]}', b"\x00", b"\r"]),
)
any_line = st.one_of(RECORDS["text"].map(lambda r: serialized(r, False)),
                     RECORDS["messages"].map(lambda r: serialized(r, True)), mutated(), hostile)


def check_consistent(data: bytes, report, limits: ValidationConfig) -> None:
    assert orjson.loads(orjson.dumps(report.to_json())) == json.loads(json.dumps(report.to_json()))
    assert report.ok == (report.error_count == 0)
    assert len(report.errors) == min(report.error_count, limits.max_errors_shown)
    if report.ok:
        assert report.examples >= 1 and report.format in FORMATS
    for line, message in report.errors:
        assert isinstance(message, str) and len(message) > 10
        assert 0 <= line <= report.lines
        assert line > 0 or "max_file_size" in message or message.startswith(("file is empty", "no known format"))
    numbered = [line for line, _ in report.errors if line]
    assert numbered == sorted(set(numbered))  # at most one error a line, in file order


@FUZZ
@given(st.lists(any_line, max_size=10), st.sampled_from([b"\n", b"\r\n"]), st.booleans(),
       st.sampled_from([LIMITS, ValidationConfig(max_line_size=256, max_json_depth=3, max_errors_shown=2)]))
def test_validate_never_raises_and_its_report_is_consistent(lines, ending, final, limits):
    data = joined(lines, ending, final) if lines else b""
    report = validate(data, limits)
    check_consistent(data, report, limits)
    body = data.removeprefix(b"\xef\xbb\xbf")  # a byte order mark starting the file is skipped
    count = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
    assert (report.lines, report.bytes, report.bom) == (count, len(data), body != data)
    if report.errors and report.errors[0][1].startswith("no known format:"):  # one error for all such lines
        assert report.examples == 0
    elif body and report.lines > report.blank_lines:  # every line is an example, blank, or has exactly one error
        assert report.error_count == report.lines - report.examples - report.blank_lines
    else:  # nothing, or blank lines only: no example
        assert report.errors == [(0, "file is empty: at least one example is needed")]


@FUZZ
@given(st.binary(max_size=4000), st.integers(1, 3000))
def test_arbitrary_bytes_on_disk_under_a_small_file_size_limit(data, max_file_size):
    limits = ValidationConfig(max_file_size=max_file_size, max_line_size=512, max_errors_shown=3)
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    try:
        os.write(fd, data)
        os.close(fd)
        report = validate_file(path, limits)
    finally:
        os.unlink(path)
    check_consistent(data, report, limits)
    if len(data) > max_file_size:  # refused from fstat, unread
        (line, message), = report.errors
        assert line == 0 and f"({len(data):,} bytes), over the " in message and "(max_file_size)" in message
        assert report.lines == 0
    else:
        assert report.bytes == len(data)
