"""The formats people bring (OpenAI chat with tools and weights, TRL's chat prompt/completion, ShareGPT,
Alpaca): validated with the right name, trained on exactly the right tokens, previewed as trained, and
trained end to end on the tiny model."""

from __future__ import annotations

import copy
import io
import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core import config
from engine.data import demo_data
from engine.store import models
from engine.core.config import ValidationConfig
from engine.data.validate import validate_fileobj
from workspaces import files_in, make_workspace, run_cli

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
OPENAI = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": [{"type": "text", "text": "2+3?"}], "name": "ann"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "5"},
    {"role": "assistant", "content": "wrong", "weight": 0},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "It is 5.", "weight": 1}]}
CALL = '<call>{"name": "add", "arguments": {"a": 2, "b": 3}}</call><|eos|>'
CHAT_PC = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
           "completion": [{"role": "assistant", "content": "hello"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "yo"}, {"from": "human", "value": "and?"},
                              {"from": "gpt", "value": "done"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
# What each example trains, exactly: never a system turn, a user turn, a tool result or a weight-0 turn.
TRAINED = {"messages": [CALL, "It is 5.<|eos|>"], "chat_prompt_completion": ["hello<|eos|>"],
           "sharegpt": ["yo<|eos|>", "done<|eos|>"], "alpaca": ["5<|eos|>"]}
RECORDS = {"messages": OPENAI, "chat_prompt_completion": CHAT_PC, "sharegpt": SHAREGPT, "alpaca": ALPACA}


def lines(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def validate(data: bytes):
    return validate_fileobj(io.BytesIO(data), "data.jsonl", ValidationConfig())


def trained_pieces(tokenizer, fmt, record, max_len=256) -> list[str]:
    from engine.worker import data

    [(ids, mask)] = data.encode_records([record], fmt, tokenizer, max_len)
    pieces, run = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return pieces


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def with_template(tokenizer, template):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_each_format_is_recognised_by_its_stable_name(fmt):
    report = validate(lines(RECORDS[fmt], RECORDS[fmt]))
    assert (report.ok, report.format, report.examples) == (True, fmt, 2), report.errors


@pytest.mark.parametrize("record, says", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
     "messages[1].weight is 2: expected 0 (not trained) or 1 (trained)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "every assistant message in 'messages' has weight 0: nothing to train on"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
     "messages[0].content is null: only an assistant message with 'tool_calls' may have no content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                   {"role": "assistant", "content": "a"}]}, "messages[0].content[0] is \"image_url\" part"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls[0].function.arguments is a string but not valid JSON"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
     "'prompt' is a string and 'completion' is an array: both must be strings"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from is \"bot\""),
    ({"instruction": "do", "input": ""}, "'instruction' without 'output'"),
    ({"text": "full prompt", **ALPACA}, "has keys of two formats ('text' and 'instruction'/'output'): use exactly "
                                        "one format per line (jq -c 'del(.text)' keeps the other)"),
])
def test_a_bad_record_is_refused_with_a_reason_that_says_how_to_fix_it(record, says):
    report = validate(lines(record))
    assert not report.ok
    assert report.errors[0][0] == 1 and says in report.errors[0][1], report.errors


def test_a_file_in_no_known_format_gets_one_error_naming_its_keys_and_the_converters():
    report = validate(lines(*({"question": f"q{i}", "answer": "a"} for i in range(30))))
    assert report.error_count == 1 and report.examples == 0
    assert report.errors == [(0, "no known format: keys found 'question', 'answer'; known formats: text, "
                                 "prompt_completion, messages, chat_prompt_completion, sharegpt, alpaca; see "
                                 "docs/formats.md#converting (every line)")]


def test_an_unknown_line_in_a_file_with_a_format_is_an_error_on_its_line():
    report = validate(lines(ALPACA, {"question": "q"}, ALPACA))
    assert report.errors == [(2, "no known format's keys in this line (keys found: 'question'); the file is in "
                                 "the 'alpaca' format (set by line 1)")]


# -- what is trained ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_exactly_the_right_tokens_are_trained(tokenizer, fmt):
    assert trained_pieces(tokenizer, fmt, RECORDS[fmt]) == TRAINED[fmt]


def test_a_tool_call_chat_with_real_tool_schemas_trains_whole_at_the_default_row_length(tokenizer):
    """A tool schema as APIs send it runs to hundreds of tokens before the first assistant turn (here about 650
    with the tiny byte-level tokenizer): at the old default of 256 such a chat was cut before anything it trains."""
    param = {"type": "string", "description": "The value, as the user wrote it, with its unit if it has one."}
    tools = [{"type": "function", "function": {
        "name": name, "description": f"Look up the {name.replace('_', ' ')} for a place and a date, in local units.",
        "parameters": {"type": "object", "properties": {"place": param, "date": param, "unit": param},
                       "required": ["place", "date"]}}} for name in ("weather",)]
    record = dict(OPENAI, tools=tools + TOOLS)
    default = config.TrainingConfig().max_seq_length
    from engine.worker import data

    assert not any(sum(mask) for _, mask in data.encode_records([record], "messages", tokenizer, 256))  # cut before
    assert trained_pieces(tokenizer, "messages", record, max_len=default) == TRAINED["messages"]


@st.composite
def tokens_and_spans(draw):
    """Token offsets in order (some empty, gaps between some) and trained spans in order, as a template gives."""
    offsets, at = [], 0
    for width, gap in draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1)), max_size=40)):
        offsets.append((at, at + width))
        at += width + gap
    spans, at = [], 0
    for skip, width in draw(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 12)), max_size=4)):
        spans.append((at + skip, at + skip + width))
        at += skip + width
    return offsets, spans


@given(tokens_and_spans())
def test_a_token_is_trained_exactly_when_its_characters_overlap_a_trained_span(case):
    from engine.worker import data

    offsets, spans = case
    expected = [int(any(a < end and b > start for start, end in spans)) for a, b in offsets]
    assert data._trained(offsets, spans) == expected


def test_generation_markers_give_the_same_spans_through_the_assistant_mask(tokenizer):
    from engine.worker import chat
    from engine.worker.tiny_model import GENERATION_CHAT_TEMPLATE

    marked = with_template(tokenizer, GENERATION_CHAT_TEMPLATE)
    assert chat.has_generation_markers(marked) and not chat.has_generation_markers(tokenizer)
    for fmt, record in RECORDS.items():
        assert trained_pieces(marked, fmt, record) == TRAINED[fmt], fmt


def test_conversations_render_exactly_as_apply_chat_template_renders_them(tokenizer):
    from engine.data import formats
    from engine.worker import chat
    from engine.worker.tiny_model import GENERATION_CHAT_TEMPLATE

    # a dict of templates too: its "tool_use" one for a conversation with tools, its default for the others
    named = with_template(tokenizer, {"default": tokenizer.chat_template,
                                      "tool_use": "{{ 'with tools: ' }}" + tokenizer.chat_template})
    for tok in (tokenizer, with_template(tokenizer, GENERATION_CHAT_TEMPLATE), named):
        renderer = chat.ChatRenderer(tok)
        for fmt, record in RECORDS.items():
            conv = formats.conversation(fmt, record)
            for n in range(1, len(conv.messages) + 1):
                for prompt in (False, True):
                    expected = tok.apply_chat_template(conv.messages[:n], tools=conv.tools, tokenize=False,
                                                       add_generation_prompt=prompt)
                    assert renderer.chat(1, conv.messages[:n], conv.tools, prompt) == expected, (fmt, n, prompt)


def test_alpaca_without_a_chat_template_is_a_prompt_and_a_completion(tokenizer):
    from engine.worker import data

    plain = with_template(tokenizer, None)
    [(ids, mask)] = data.encode_records([ALPACA], "alpaca", plain, 256)
    assert tokenizer.decode(ids) == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n5<|eos|>"
    assert trained_pieces(plain, "alpaca", ALPACA) == ["5<|eos|>"]


def test_a_template_that_cannot_render_tools_rejects_the_file_naming_the_line(tokenizer):
    from engine.worker import data

    bare = with_template(tokenizer, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}"
                                    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(data.DataError, match="line 2: the model's chat template cannot render tools"):
        data.encode_records([plain, OPENAI], "messages", bare, 256)
    no_tools = {"messages": OPENAI["messages"]}
    with pytest.raises(data.DataError, match="line 1: the model's chat template cannot render tool calls: the call "
                                             "to 'add' in message 2 is not in its output"):
        data.encode_records([no_tools], "messages", bare, 256)


# -- end to end: preview, validate, training -------------------------------------------------------

# Packed: a row of 256 tokens holds about ten records, so one row a step still makes dozens of steps.
SETTINGS = {"training": {"max_seq_length": 256, "batch_size": 1, "learning_rate": 3e-3, "warmup_steps": 2},
            "eval": {"gate": "off", "holdout_fraction": 0.0, "holdout_min": 0},
            "replay": {"fraction": 0.0}, "jobs": {"warm_worker": True}, "inbox": {"settle_seconds": 0.5}}


def arithmetic(fmt: str, n: int, seed: int) -> list[dict]:
    """Learnable records of each format, from the demo's arithmetic."""
    out = []
    for r in demo_data.demo_records(n, "messages", seed=seed):
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        out.append({
            "messages": {"tools": TOOLS[:1], "messages": [
                {"role": "user", "content": [{"type": "text", "text": q}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": json.dumps({"q": q})}}]},
                {"role": "tool", "content": a}, {"role": "assistant", "content": "no", "weight": 0},
                {"role": "assistant", "content": a}]},
            "chat_prompt_completion": {"prompt": [{"role": "user", "content": q}],
                                       "completion": [{"role": "assistant", "content": a}]},
            "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
            "alpaca": {"instruction": q, "input": "", "output": a},
        }[fmt])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One workspace that trained one file of each format through the daemon."""
    root = tmp_path_factory.mktemp("formats")
    ws = make_workspace(root / "ws", SETTINGS, model_dir=tiny_model_dir)
    for i, fmt in enumerate(sorted(RECORDS)):
        (root / f"{fmt}.jsonl").write_bytes(lines(*arithmetic(fmt, 400, seed=i)))
    for fmt in sorted(RECORDS):
        assert run_cli("add", str(root / f"{fmt}.jsonl"), "-w", str(ws.root)).returncode == 0
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False)
    return ws, root, result


def test_every_format_trains_end_to_end_and_its_loss_falls(trained):
    ws, _, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    done = files_in(ws, "done")
    assert len(done) == len(RECORDS), (done, files_in(ws, "failed"), files_in(ws, "rejected"))
    for name in done:
        job = name.removesuffix(".jsonl")
        record = json.loads((ws.run_dir(job) / "job.json").read_text())
        assert record["format"] == name.split("-", 1)[1].removesuffix(".jsonl")
        losses = [e["loss"] for e in map(json.loads, (ws.run_dir(job) / "metrics.jsonl").read_text().splitlines())
                  if e["event"] == "step" and e.get("loss") is not None]
        assert len(losses) >= 20 and sum(losses[-5:]) < 0.8 * sum(losses[:5]), (job, losses)


def test_preview_shows_exactly_what_is_trained(trained, tmp_path):
    ws, _, _ = trained
    paths = {}
    for fmt, record in RECORDS.items():
        paths[fmt] = tmp_path / f"{fmt}.jsonl"
        paths[fmt].write_bytes(lines(record, record))
    result = run_cli("preview", *map(str, paths.values()), "-n", "1", "--json", "-w", str(ws.root))
    assert result.returncode == 0, result.stderr
    for fmt, f in zip(paths, json.loads(result.stdout)["files"]):
        [ex] = f["examples"]
        assert f["format"] == fmt
        assert [ex["text"][a:b] for a, b in (s["chars"] for s in ex["spans"])] == TRAINED[fmt], fmt
        assert f["counts"]["examples"] == 2 and f["counts"]["trained_tokens"] == 2 * ex["trained_tokens"]
        assert sum(b - a for a, b in (s["tokens"] for s in ex["spans"])) == ex["trained_tokens"]
    text = run_cli("preview", str(paths["messages"]), "-w", str(ws.root))
    assert text.returncode == 0, text.stderr
    assert "<|assistant|>\n[[<call>" in text.stdout and "<|tool|>\n5<|eos|>" in text.stdout
    assert "[[It is 5.<|eos|>]]" in text.stdout and "<|assistant|>\nwrong<|eos|>" in text.stdout
    assert f"{paths['messages']}: messages, 2 examples" in text.stdout
    assert "0 cut at max_seq_length 256" in text.stdout and "0 with nothing to train" in text.stdout


def test_preview_counts_examples_cut_and_with_nothing_to_train(trained, tmp_path):
    ws, _, _ = trained
    long_prompt = {"prompt": [{"role": "user", "content": "x " * 700}],
                   "completion": [{"role": "assistant", "content": "a"}]}
    path = tmp_path / "long.jsonl"
    path.write_bytes(lines(CHAT_PC, long_prompt, CHAT_PC))
    [f] = json.loads(run_cli("preview", str(path), "-n", "0", "--json", "-w", str(ws.root)).stdout)["files"]
    assert f["examples"] == [] and (f["counts"]["examples"], f["counts"]["cut"], f["counts"]["nothing_to_train"]) \
        == (3, 1, 1)
    shown = run_cli("validate", str(path), "-w", str(ws.root))
    assert shown.returncode == 0 and "ok, 3 examples (chat_prompt_completion)" in shown.stdout
    assert f"{path}: 1 of 3 examples (33.3%) cut at max_seq_length 256" in shown.stdout
    alone = run_cli("validate", str(path), "--json", "-w", str(tmp_path))  # not a workspace
    doc = json.loads(alone.stdout)
    assert doc["files"][0]["cut_at_max_seq_length"] is None and "not measured" in doc["cut_note"]


def test_a_file_the_template_cannot_render_fails_with_the_line_named(trained, tmp_path):
    from transformers import AutoTokenizer

    ws, _, _ = trained
    bare = tmp_path / "bare-model"
    shutil.copytree(models.current_source(ws), bare)
    tok = AutoTokenizer.from_pretrained(bare)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    tok.save_pretrained(bare)
    other = make_workspace(tmp_path / "ws", SETTINGS, model_dir=bare)
    path = tmp_path / "tools.jsonl"
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_bytes(lines(plain, OPENAI))
    result = run_cli("preview", str(path), "-w", str(other.root))
    assert result.returncode == 1
    assert "line 2: the model's chat template cannot render tools" in result.stderr
