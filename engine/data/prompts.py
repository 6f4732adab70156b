"""The prompts every version answers: eval/prompts.jsonl (or [samples] prompts), read and checked line by line.

One prompt a line, in one of three shapes, each with an optional "id" (a
string or an integer, unique in the file; the line number otherwise):

- {"messages": [...]}: a conversation that ends with a user turn (a system
  turn, and "tools", as in training files); answered through the chat
  template with the generation prompt;
- {"prompt": "..."}: the text a completion follows, as prompt_completion
  files have it;
- {"text": "..."}: plain text to go on from.

A bad line is named with its number and why, and left out: the other prompts
are still answered. Past `max_prompts` the rest of the file is left out, and
said once. Reads only; never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data import formats

PROMPTS_NAME = "prompts.jsonl"  # in the workspace's eval/ folder
SHAPES = ("messages", "prompt", "text")
KEYS = frozenset({"id", "tools", *SHAPES})


@dataclass
class Prompts:
    items: list[dict[str, Any]] = field(default_factory=list)  # {"id", "line", "kind", "messages"|"text", "tools"?}
    problems: list[str] = field(default_factory=list)  # "PATH line N: why", each left out


def location(root: Path, configured: str) -> Path:
    """Where the prompts file is: [samples] prompts, in the workspace `root` unless it is absolute."""
    return root / Path(configured).expanduser()


def check(obj: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the prompt, None) or (None, why this line is not one)."""
    if type(obj) is not dict:
        return None, f"expected an object with 'messages', 'prompt' or 'text', got {formats.type_name(obj)}"
    shapes = [key for key in SHAPES if key in obj]
    if len(shapes) != 1:
        return None, ("expected one of 'messages', 'prompt' or 'text'" if not shapes
                      else f"has {', '.join(repr(k) for k in shapes)}: expected only one of them")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        return None, f"unknown key {unknown[0]!r}: a prompt has 'id' and one of 'messages', 'prompt', 'text' (and 'tools')"
    kind = shapes[0]
    if "id" in obj and (type(obj["id"]) not in (str, int) or obj["id"] == ""):
        return None, f"'id' must be a non-empty string or an integer, got {formats.type_name(obj['id'])}"
    if "tools" in obj and kind != "messages":
        return None, "'tools' goes with 'messages' only"
    prompt: dict[str, Any] = {"kind": kind}
    if kind == "messages":
        problem, _ = formats.check_messages(obj["messages"], "messages", need_assistant=False)
        if problem is None:
            problem = formats.check_tools(obj)
        if problem is None:
            last = obj["messages"][-1] if obj["messages"] else None
            if last is None or last.get("role") != "user":
                role = last.get("role") if last else None
                problem = (f"'messages' must end with a user turn (the one to answer), not "
                           f"{'nothing' if role is None else repr(role)}")
        if problem:
            return None, problem
        prompt["messages"] = obj["messages"]
        if "tools" in obj:
            prompt["tools"] = obj["tools"]
    else:
        value = obj[kind]
        if type(value) is not str or not value.strip():
            return None, f"'{kind}' must be a non-empty string, got {formats.type_name(value)}"
        prompt["text"] = value
    return prompt, None


def read(path: Path, max_prompts: int, shown: str | None = None) -> Prompts:
    """Every valid prompt of the file, up to `max_prompts`, and what was left out. A missing file: no prompts, no
    problem (samples are off). `shown`: how the path is named in problems (eval/prompts.jsonl)."""
    shown = shown or str(path)
    out = Prompts()
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return out
    except OSError as e:
        out.problems.append(f"{shown}: cannot be read: {e.strerror or e}")
        return out
    seen: dict[str, int] = {}
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if len(out.items) == max_prompts:
                out.problems.append(f"{shown} line {number} and after: left out, past samples.max_prompts = "
                                    f"{max_prompts}")
                break
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as e:
                out.problems.append(f"{shown} line {number}: not JSON ({e}): left out")
                continue
            prompt, problem = check(obj)
            if prompt is not None:
                key = str(obj.get("id", number))
                if key in seen:
                    problem, prompt = f"id {key!r} is line {seen[key]}'s already", None
                else:
                    seen[key] = number
            if prompt is None:
                out.problems.append(f"{shown} line {number}: {problem}: left out")
                continue
            out.items.append({"id": key, "line": number, **prompt})
    return out


def plan(root: Path, samples: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """What a job spec carries for [samples] (`samples`, a config.SamplesConfig) in the workspace `root`: None when
    answers are off or there is no valid prompt; and the problems with the file's lines."""
    if not samples.enabled:
        return None, []
    path = location(root, samples.prompts)
    shown = samples.prompts if not Path(samples.prompts).is_absolute() else str(path)
    read_ = read(path, samples.max_prompts, shown)
    if not read_.items:
        return None, read_.problems
    return {"prompts": read_.items, "max_new_tokens": samples.max_new_tokens, "temperature": samples.temperature,
            "path": str(path)}, read_.problems
