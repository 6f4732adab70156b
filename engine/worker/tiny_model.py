"""A tiny, randomly initialised causal LM with its own tokenizer, built offline in a second.

It stands in for a real model in the demo and the tests: Llama architecture
(2 layers, hidden 64, 4 heads), a byte-level BPE tokenizer of ~1024 tokens
trained on the given corpus (or on engine.data.demo_data plus a little English),
bos/eos/pad tokens and a chat template, saved as a normal Hugging Face model
directory (safetensors) that `from_pretrained` loads.

The directory is written under a temporary name and renamed into place, so it
is whole or absent. This module must never touch the network.

    python -m engine.worker.tiny_model OUT_DIR [--corpus FILE.jsonl ...] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from engine.core import atomic
from engine.data import demo_data, formats

VOCAB_SIZE = 1024
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# Role tag, newline, content, eos. Roles other than the three above are spelled out (`<|tool|>`). Tools
# come first as a system turn of JSON; each tool call follows its message's content as
# `<call>{"name": ..., "arguments": ...}</call>`. A conversation without them renders as it always has.
# GENERATION_CHAT_TEMPLATE is the same with `{% generation %}` around what an assistant says (tests use it).
_BODY = (
    "{{ message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</call>' }}"
    "{% endfor %}"
    "{{ eos_token }}"
)
_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\ntools: ' + (tools | tojson) + eos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}@ASSISTANT@{% else %}" + _BODY + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_TEMPLATE = _TEMPLATE.replace("@ASSISTANT@", _BODY)
GENERATION_CHAT_TEMPLATE = _TEMPLATE.replace("@ASSISTANT@", "{% generation %}" + _BODY + "{% endgeneration %}")

_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "A model learns from the data it is given, one step at a time.",
    "Training keeps going while new files arrive in the inbox.",
    "What is the answer? The answer is short and exact.",
    "Numbers, letters and words: count them, reverse them, add them up.",
)


def builtin_corpus() -> Iterator[str]:
    yield from _ENGLISH
    yield from demo_data.demo_texts(400, seed=1234)
    yield from (m["content"] for r in demo_data.demo_records(200, "messages", seed=4321) for m in r["messages"])


def corpus_from_jsonl(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """The texts of JSONL files in any of the accepted formats."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield from formats.texts(json.loads(line))


def build_tokenizer(corpus: Iterable[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one: arithmetic is then learnable by a tiny model.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tiny_model(out_dir: str | os.PathLike, corpus: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Build the tiny model and tokenizer into `out_dir`, which must not exist yet."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; the tiny model is built into a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus if corpus is not None else builtin_corpus())
    model = build_model(tokenizer, seed)
    tmp = Path(tempfile.mkdtemp(prefix=atomic.TEMP_PREFIX, dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        atomic.durable_rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker.tiny_model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="directory to create")
    parser.add_argument("--corpus", nargs="*", default=None, help="JSONL files whose texts train the tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = corpus_from_jsonl(args.corpus) if args.corpus else None
    try:
        path = build_tiny_model(args.out_dir, corpus, args.seed)
    except FileExistsError as e:
        parser.exit(2, f"error: {e}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
