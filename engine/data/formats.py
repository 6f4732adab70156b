"""The accepted input formats: which one a record is in, whether its shape is right, and what it trains.

Both sides use this module: the daemon's validation (engine/data/validate.py) asks
`check` for a line's format or the reason it is refused; the worker's
tokenization (engine/worker/data.py) asks `conversation` for a chat record as
plain messages, each marked trained or not, and the tools its template renders.
docs/formats.md describes every format; keep the two in step.

Format names are stable strings: they are recorded in job records and shown by
`traind validate`. This module never imports torch or transformers (the daemon
imports it), never reads files, and never raises on bad content: a problem is
a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

TEXT, PROMPT_COMPLETION, MESSAGES = "text", "prompt_completion", "messages"
CHAT_PROMPT_COMPLETION, SHAREGPT, ALPACA = "chat_prompt_completion", "sharegpt", "alpaca"
FORMATS = (TEXT, PROMPT_COMPLETION, MESSAGES, CHAT_PROMPT_COMPLETION, SHAREGPT, ALPACA)
CHAT_FORMATS = (MESSAGES, CHAT_PROMPT_COMPLETION, SHAREGPT, ALPACA)

ROLES = ("system", "user", "assistant", "tool")
_PLAIN_ROLES = frozenset(ROLES)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
CONVERTING = "docs/formats.md#converting"

# The keys that say which format a line is in, in the order they are named in messages.
_MARKERS = (
    (TEXT, ("text",), "'text'"),
    (PROMPT_COMPLETION, ("prompt", "completion"), "'prompt'/'completion'"),
    (MESSAGES, ("messages",), "'messages'"),
    (SHAREGPT, ("conversations",), "'conversations'"),
    (ALPACA, ("instruction", "output"), "'instruction'/'output'"),
)


class UnknownShape(str):
    """The message for a line with no format's keys; `keys` are the keys it has. A file whose lines are
    all like this gets one error for the whole file (engine/data/validate.py), not one a line."""

    keys: str


def unknown_shape(obj: dict) -> UnknownShape:
    keys = ", ".join(repr(k[:40]) for k in list(obj)[:5]) or "none"
    problem = UnknownShape(f"no known format's keys in this line (keys found: {keys})")
    problem.keys = keys
    return problem


def no_known_format(keys: str) -> str:
    """The whole file's error when no line is in a known format."""
    return (f"no known format: keys found {keys}; known formats: {', '.join(FORMATS)}; "
            f"see {CONVERTING}")


def type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _blank(what: str, value: str) -> str:
    return f"{what} is {'empty' if not value else 'blank (only whitespace)'}"


def _short(value: object) -> str:
    return orjson.dumps(value).decode()[:60] if isinstance(value, (str, int, float, bool, type(None))) \
        else type_name(value)


# -- checking one line -------------------------------------------------------------------------


def check(obj: object) -> tuple[str | None, str | None, int]:
    """(format, problem, depth) of one parsed line. depth is the nesting depth when the line holds nothing
    beyond its format's plainest shape (then the format fixes it), else 0: unknown, the caller walks it."""
    if type(obj) is not dict:
        return None, f"expected a JSON object {{...}} on each line, got {type_name(obj)}", 0
    # Plain lookups on the hot path (a line of one format); the marker table only to explain a mix.
    has_text = "text" in obj
    has_pc = "prompt" in obj or "completion" in obj
    has_messages = "messages" in obj
    has_sharegpt = "conversations" in obj
    has_alpaca = "instruction" in obj or "output" in obj
    if has_text + has_pc + has_messages + has_sharegpt + has_alpaca != 1:
        found = [(fmt, keys, label) for fmt, keys, label in _MARKERS if any(k in obj for k in keys)]
        if not found:
            return None, unknown_shape(obj), 0
        labels = " and ".join(label for _, _, label in found)
        hint = f"jq -c 'del({', '.join('.' + k for k in found[0][1])})' keeps the other" if len(found) == 2 else ""
        return None, (f"has keys of two formats ({labels}): use exactly one format per line"
                      + (f" ({hint})" if hint else "")), 0
    fmt = TEXT if has_text else PROMPT_COMPLETION if has_pc else MESSAGES if has_messages \
        else SHAREGPT if has_sharegpt else ALPACA
    if fmt == TEXT:
        text = obj["text"]
        if type(text) is not str:
            return None, f"'text' must be a string, got {type_name(text)}", 0
        if not text or text.isspace():
            return None, _blank("'text'", text), 0
        return TEXT, None, 1 if len(obj) == 1 else 0
    if fmt == PROMPT_COMPLETION:
        return _check_prompt_completion(obj)
    if fmt == MESSAGES:
        problem, plain = check_messages(obj["messages"], "messages")
        problem = problem or check_tools(obj)
        return (None, problem, 0) if problem else (MESSAGES, None, 3 if plain and len(obj) == 1 else 0)
    if fmt == SHAREGPT:
        problem = _check_sharegpt(obj["conversations"])
        return (None, problem, 0) if problem else (SHAREGPT, None, 0)
    return _check_alpaca(obj)


def _check_prompt_completion(obj: dict) -> tuple[str | None, str | None, int]:
    if "prompt" not in obj:
        return None, "'completion' without 'prompt': the prompt_completion format needs both (an empty prompt is allowed)", 0
    if "completion" not in obj:
        return None, "'prompt' without 'completion': the prompt_completion format needs both", 0
    prompt, completion = obj["prompt"], obj["completion"]
    if type(prompt) is list or type(completion) is list:
        if type(prompt) is not list or type(completion) is not list:
            return None, (f"'prompt' is {type_name(prompt)} and 'completion' is {type_name(completion)}: both must be "
                          "strings (prompt_completion) or both arrays of messages (chat_prompt_completion)"), 0
        problem, _ = check_messages(prompt, "prompt", need_assistant=False, may_be_empty=True)
        if problem is None:
            problem, _ = check_messages(completion, "completion")
        problem = problem or check_tools(obj)
        return (None, problem, 0) if problem else (CHAT_PROMPT_COMPLETION, None, 0)
    if type(prompt) is not str:
        return None, f"'prompt' must be a string (or an array of messages), got {type_name(prompt)}", 0
    if type(completion) is not str:
        return None, f"'completion' must be a string (or an array of messages), got {type_name(completion)}", 0
    if not completion or completion.isspace():
        return None, _blank("'completion'", completion), 0
    return PROMPT_COMPLETION, None, 1 if len(obj) == 2 else 0


def _content_problem(where: str, content: object, role: str, has_calls: bool) -> str | None:
    if type(content) is str:
        if content and not content.isspace():
            return None
        return None if has_calls else _blank(f"{where}.content", content)
    if content is None:
        return None if has_calls else (f"{where}.content is null: only an assistant message with 'tool_calls' "
                                       "may have no content")
    if type(content) is not list:
        return f"{where}.content must be a string or an array of text parts, got {type_name(content)}"
    text = []
    for j, part in enumerate(content):
        if type(part) is not dict or part.get("type") != "text" or type(part.get("text")) is not str:
            kind = part.get("type") if type(part) is dict else None
            return (f"{where}.content[{j}] is {_short(kind) + ' part' if kind else type_name(part)}: "
                    "expected {\"type\": \"text\", \"text\": \"...\"} (only text can be trained)")
        text.append(part["text"])
    joined = "".join(text)
    if (not joined or joined.isspace()) and not has_calls:
        return _blank(f"{where}.content", joined)
    return None


def _tool_calls_problem(where: str, calls: object) -> str | None:
    if type(calls) is not list or not calls:
        return f"{where}.tool_calls must be a non-empty array, got {type_name(calls)}"
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if type(call) is dict else None
        if type(function) is not dict:
            return f"{at} must be an object with a 'function' {{\"name\", \"arguments\"}}"
        if type(function.get("name")) is not str or not function["name"]:
            return f"{at}.function.name must be a non-empty string"
        arguments = function.get("arguments", {})
        if type(arguments) is str:
            try:
                arguments = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                return f"{at}.function.arguments is a string but not valid JSON"
        if type(arguments) is not dict:
            return f"{at}.function.arguments must be a JSON object (or a string of one), got {type_name(arguments)}"
    return None


def check_messages(messages: object, key: str, need_assistant: bool = True,
                   may_be_empty: bool = False) -> tuple[str | None, bool]:
    """(problem or None, whether every message holds exactly 'role' and a string 'content')."""
    if type(messages) is not list:
        return f"'{key}' must be an array, got {type_name(messages)}", False
    if not messages and not may_be_empty:
        return f"'{key}' is empty: at least one assistant message is needed", False
    trained = False
    plain = True
    for i, m in enumerate(messages):
        if type(m) is dict and len(m) == 2 and type(m.get("content")) is str and m["content"] \
                and not m["content"].isspace() and type(m.get("role")) is str and m["role"] in _PLAIN_ROLES:
            trained = trained or m["role"] == "assistant"
            continue  # the common case: role and content only
        where = f"{key}[{i}]"
        if type(m) is not dict:
            return f"{where} must be an object with 'role' and 'content', got {type_name(m)}", False
        role = m.get("role")
        if type(role) is not str or role not in ROLES:
            if role is None and "role" not in m:
                return f"{where} has no 'role'", False
            return f"{where}.role is {_short(role)}: expected 'system', 'user', 'assistant' or 'tool'", False
        if "content" not in m and "tool_calls" not in m:
            return f"{where} has no 'content'", False
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                return f"{where} has 'tool_calls' but its role is '{role}': only assistant messages call tools", False
            if problem := _tool_calls_problem(where, calls):
                return problem, False
        if problem := _content_problem(where, m.get("content"), role, calls is not None):
            return problem, False
        if "name" in m and type(m["name"]) is not str:
            return f"{where}.name must be a string, got {type_name(m['name'])}", False
        weight = m.get("weight", 1)
        if "weight" in m:
            if role != "assistant":
                return f"{where} has a 'weight' but its role is '{role}': only assistant messages are weighted", False
            if type(weight) not in (int, float) or weight not in (0, 1):
                return f"{where}.weight is {_short(weight)}: expected 0 (not trained) or 1 (trained)", False
        if role == "assistant" and weight:
            trained = True
        if len(m) != 2 or type(m.get("content")) is not str:
            plain = False
    if need_assistant and not trained:
        if any(type(m) is dict and m.get("role") == "assistant" for m in messages):
            return f"every assistant message in '{key}' has weight 0: nothing to train on", False
        return f"'{key}' has no assistant message: nothing to train on", False
    return None, plain


def check_tools(obj: dict) -> str | None:
    if "tools" not in obj:
        return None
    tools = obj["tools"]
    if type(tools) is not list:
        return f"'tools' must be an array, got {type_name(tools)}"
    for j, tool in enumerate(tools):
        function = tool.get("function") if type(tool) is dict else None
        if type(function) is not dict or type(function.get("name")) is not str or not function["name"]:
            return f"tools[{j}] must be an object {{\"type\": \"function\", \"function\": {{\"name\": ..., ...}}}}"
    return None


def _check_sharegpt(turns: object) -> str | None:
    if type(turns) is not list:
        return f"'conversations' must be an array, got {type_name(turns)}"
    if not turns:
        return "'conversations' is empty: at least one 'gpt' turn is needed"
    gpt = False
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if type(turn) is not dict:
            return f"{where} must be an object with 'from' and 'value', got {type_name(turn)}"
        source = turn.get("from")
        if source not in SHAREGPT_ROLES:
            if "from" not in turn:
                return f"{where} has no 'from'"
            return f"{where}.from is {_short(source)}: expected 'human', 'gpt', 'system' or 'tool'"
        value = turn.get("value")
        if type(value) is not str:
            if "value" not in turn:
                return f"{where} has no 'value'"
            return f"{where}.value must be a string, got {type_name(value)}"
        if not value or value.isspace():
            return _blank(f"{where}.value", value)
        gpt = gpt or source == "gpt"
    return None if gpt else "'conversations' has no 'gpt' turn: nothing to train on"


_ALPACA_KEYS = {"instruction", "input", "output", "system"}


def _check_alpaca(obj: dict) -> tuple[str | None, str | None, int]:
    if "instruction" not in obj:
        return None, "'output' without 'instruction': the alpaca format needs both ('input' may be empty)", 0
    if "output" not in obj:
        return None, "'instruction' without 'output': the alpaca format needs both", 0
    for key in ("instruction", "output", "input", "system"):
        if key in obj and type(obj[key]) is not str:
            return None, f"'{key}' must be a string, got {type_name(obj[key])}", 0
    for key in ("instruction", "output"):
        if not obj[key] or obj[key].isspace():
            return None, _blank(f"'{key}'", obj[key]), 0
    return ALPACA, None, 1 if obj.keys() <= _ALPACA_KEYS else 0


# -- what a record trains (the worker's side) ---------------------------------------------------


@dataclass
class Conversation:
    """A chat record as the chat template takes it: plain messages, which of them are trained, the tools."""

    messages: list[dict[str, Any]]
    trained: list[bool]
    tools: list[dict[str, Any]] | None = None
    prompt_messages: int = 0  # chat_prompt_completion: how many leading messages are the prompt

    @property
    def has_tool_calls(self) -> bool:
        return any("tool_calls" in m for m in self.messages)


def _plain_content(content: object) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _plain_call(call: dict) -> dict:
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        function["arguments"] = orjson.loads(function["arguments"])
    function.setdefault("arguments", {})
    out = {"type": call.get("type", "function"), "function": function}
    if "id" in call:
        out["id"] = call["id"]
    return out


def plain_message(m: dict) -> dict[str, Any]:
    """An OpenAI message as chat templates take it: content a string (text parts joined; null made ""),
    tool call arguments an object (templates render them with tojson), weight and unknown keys dropped."""
    out: dict[str, Any] = {"role": m["role"], "content": _plain_content(m.get("content"))}
    for key in ("name", "tool_call_id"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    if m.get("tool_calls"):
        out["tool_calls"] = [_plain_call(c) for c in m["tool_calls"]]
    return out


def _is_trained(m: dict) -> bool:
    return m.get("role") == "assistant" and m.get("weight", 1) != 0


def alpaca_user_text(record: dict) -> str:
    extra = record.get("input") or ""
    return record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")


def alpaca_prompt_completion(record: dict) -> tuple[str, str]:
    """An alpaca record for a tokenizer with no chat template: the classic Alpaca layout, loss on the output."""
    parts = [record["system"]] if (record.get("system") or "").strip() else []
    parts.append(f"### Instruction:\n{record['instruction']}")
    if (record.get("input") or "").strip():
        parts.append(f"### Input:\n{record['input']}")
    parts.append("### Response:\n")
    return "\n\n".join(parts), record["output"]


def conversation(fmt: str, record: dict) -> Conversation:
    """The record of a chat format (valid, as `check` found it) as a Conversation."""
    if fmt == MESSAGES:
        messages = record["messages"]
        return Conversation([plain_message(m) for m in messages], [_is_trained(m) for m in messages],
                            record.get("tools") or None)
    if fmt == CHAT_PROMPT_COMPLETION:
        prompt, completion = record["prompt"], record["completion"]
        return Conversation([plain_message(m) for m in prompt + completion],
                            [False] * len(prompt) + [_is_trained(m) for m in completion],
                            record.get("tools") or None, prompt_messages=len(prompt))
    if fmt == SHAREGPT:
        turns = record["conversations"]
        return Conversation([{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns],
                            [t["from"] == "gpt" for t in turns])
    if fmt == ALPACA:
        messages = [{"role": "system", "content": record["system"]}] if (record.get("system") or "").strip() else []
        messages += [{"role": "user", "content": alpaca_user_text(record)},
                     {"role": "assistant", "content": record["output"]}]
        return Conversation(messages, [False] * (len(messages) - 1) + [True])
    raise ValueError(f"{fmt!r} is not a chat format")


def texts(record: dict) -> list[str]:
    """Every string a record of any format holds for training (a tokenizer's corpus)."""
    fmt, problem, _ = check(record)
    if problem is not None or fmt is None:
        return []
    if fmt == TEXT:
        return [record["text"]]
    if fmt == PROMPT_COMPLETION:
        return [record["prompt"] + record["completion"]]
    return [m["content"] for m in conversation(fmt, record).messages if m["content"]]
