"""A conversation through the tokenizer's chat template: the text the model sees and the spans it learns.

`ChatRenderer.render` takes an `engine.data.formats.Conversation` (plain messages,
each marked trained or not, and the tools) and returns the rendered text with
the character spans of its trained messages. Two ways to find them:

- a template with `{% generation %}` markers: the blocks transformers'
  assistant tracker records in the one render (what its
  `return_assistant_tokens_mask` is made from) are the assistant messages in
  order, and those not trained (weight 0, a prompt's) are dropped;
- any other template: the conversation rendered up to each trained message
  (with the generation prompt) and through it; the difference is its span,
  role header excluded, end-of-turn token included. Where prefixes do not
  render as prefixes, the message's content is looked for instead.

Tools and tool calls are passed to the template (`tools=`); a template that
leaves them out of its output is an error naming the line, as is one that
fails. The template is rendered as `apply_chat_template` renders it (the same
compiled jinja environment, the tokenizer's special tokens as variables), but
straight through: the wrapper's per-call work, copying messages that are plain
JSON already, was most of the time a conversation took to tokenize. This
module only renders: it never tokenizes and never touches the cache.
"""

from __future__ import annotations

import json
import re

from transformers.utils import chat_template_utils as jinja_templates

from engine.data.formats import Conversation

_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


class DataError(Exception):
    """The input cannot be trained on; the message says why, with a line number where there is one."""


def has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), "")
    return bool(template) and bool(_GENERATION.search(template))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class ChatRenderer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.generation = has_generation_markers(tokenizer)
        self.variables = dict(tokenizer.special_tokens_map)  # what apply_chat_template gives the template
        self._templates: dict[bool, object] = {}  # with tools or not: a dict of templates may differ
        self._tools_checked: set[str] = set()

    def _template(self, tools):
        key = tools is not None
        if key not in self._templates:
            self._templates[key] = jinja_templates._compile_jinja_template(self.tok.get_chat_template(None, tools))
        return self._templates[key]

    def chat(self, line: int, messages: list, tools=None, generation_prompt: bool = False,
             spans: bool = False):
        """The conversation rendered; with `spans`, also the character spans of its {% generation %} blocks."""
        try:
            template = self._template(tools)
            if spans:
                return jinja_templates._render_with_assistant_indices(
                    template, messages, tools, None, generation_prompt, **self.variables)
            return template.render(messages=messages, tools=tools, documents=None,
                                   add_generation_prompt=generation_prompt, **self.variables)
        except Exception as e:  # jinja raises its own errors, e.g. a template that requires alternating roles
            raise DataError(f"line {line}: the tokenizer's chat template failed: {e}") from None

    def render(self, line: int, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its trained messages."""
        if self.generation:
            text, blocks = self.chat(line, conv.messages, conv.tools, spans=True)
            self._check_tools(line, conv, text)
            return text, self._generation_spans(line, conv, blocks)
        text = self.chat(line, conv.messages, conv.tools)
        self._check_tools(line, conv, text)
        return text, self._prefix_spans(line, conv, text)

    def _check_tools(self, line: int, conv: Conversation, text: str) -> None:
        if conv.tools:
            key = json.dumps(conv.tools, sort_keys=True)
            if key not in self._tools_checked:
                if self.chat(line, conv.messages, None) == text:
                    raise DataError(f"line {line}: the model's chat template cannot render tools: its output is "
                                    "the same with and without this line's 'tools' (use a model whose template "
                                    "supports tools, or leave 'tools' out)")
                self._tools_checked.add(key)
        for i, m in enumerate(conv.messages):
            for call in m.get("tool_calls", ()):
                name = call["function"]["name"]
                if name not in text:
                    raise DataError(f"line {line}: the model's chat template cannot render tool calls: the call to "
                                    f"'{name}' in message {i} is not in its output (use a model whose template "
                                    "supports tool calls)")

    def _prefix_spans(self, line: int, conv: Conversation, text: str) -> list[tuple[int, int]]:
        messages, tools = conv.messages, conv.tools
        spans, cursor = [], 0
        for i, (m, trained) in enumerate(zip(messages, conv.trained)):
            if not trained:
                continue
            start = end = -1
            prefix = upto = None
            if i or not tools:  # an empty conversation cannot be rendered; without tools it renders as ""
                try:
                    prefix = self.chat(line, messages[:i], tools, generation_prompt=True) if i else ""
                    # through the last message is the whole conversation: rendered already
                    upto = text if i == len(messages) - 1 else self.chat(line, messages[: i + 1], tools)
                except DataError:
                    prefix = upto = None
            if prefix is not None and text.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor:
                start, end = len(prefix), len(upto)
            else:  # a template whose prefixes do not render as prefixes: find the content itself
                content = m.get("content") or ""
                start = text.find(content, cursor) if content else -1
                if start >= 0:
                    end = start + len(content)
                    eos = self.tok.eos_token or ""
                    if eos and text.startswith(eos, end):
                        end += len(eos)
            if start < 0 or end <= start:
                raise DataError(f"line {line}: cannot locate assistant message {i} in the chat template's output")
            spans.append((start, end))
            cursor = end
        return spans

    def _generation_spans(self, line: int, conv: Conversation,
                          blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        assistants = [t for m, t in zip(conv.messages, conv.trained) if m["role"] == "assistant"]
        if all(assistants) and len(assistants) == sum(conv.trained):
            return blocks
        if len(blocks) != len(assistants):
            raise DataError(f"line {line}: the chat template marks {len(blocks)} generation blocks for "
                            f"{len(assistants)} assistant messages: cannot leave the untrained ones out")
        return [block for block, trained in zip(blocks, assistants) if trained]
