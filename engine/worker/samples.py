"""The version's answers to the prompts file: generated after a file's training and evaluation, saved beside the
weights (samples.jsonl) before the version's marker, so a version never lacks its answers nor has torn ones.

Each prompt becomes the text the model goes on from: a conversation through the chat template with the
generation prompt (its tools passed in), a prompt or a text as it is. They are answered in batches, left-padded,
with the KV cache; greedy at temperature 0, else sampled with a seed made from the version, so the same version
answers the same way again. Sharded (FSDP2), every rank generates the same batches together (each forward is a
collective); otherwise rank 0 alone generates.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.worker.callbacks import log_line

SAMPLES = "samples.jsonl"  # in the version's folder, listed with its other files and hashed
BATCH = 8


@dataclass
class Answers:
    records: list[dict[str, Any]]  # one a prompt (rank 0's; empty on the other ranks)
    seconds: float


def answer_all(model, tokenizer, spec, device, events, rank0: bool, hooks: dict[str, Any]) -> Answers:
    """The candidate's answers to spec.samples' prompts, said as they begin (`answering`) and timed. Sharded, every
    rank's forward is a collective: all generate together; otherwise rank 0 alone."""
    events.emit("answering", prompts=len(spec.samples["prompts"]))
    time.sleep(hooks.get("samples_sleep_seconds", 0.0))
    began = time.monotonic()
    records = answer(model, tokenizer, spec.samples, spec.job_id, device) if rank0 or spec.sharding else []
    answers = Answers(records, time.monotonic() - began)
    log_line(f"samples: {len(spec.samples['prompts'])} prompts answered in {answers.seconds:.1f}s")
    return answers


def prompt_ids(tokenizer, prompt: dict[str, Any]) -> list[int]:
    if prompt["kind"] == "messages":
        return tokenizer.apply_chat_template(prompt["messages"], tools=prompt.get("tools"), tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
    return tokenizer(prompt["text"])["input_ids"]


def seed_of(version: str) -> int:
    return zlib.crc32(version.encode())


@torch.no_grad()
def answer(model, tokenizer, plan: dict[str, Any], version: str, device) -> list[dict[str, Any]]:
    """One record a prompt: {"id", "line", "prompt" (the text the model went on from), "answer", "tokens"}."""
    was_training = model.training
    model.eval()
    temperature = float(plan.get("temperature", 0.0))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator_seed = seed_of(version)
    records = []
    try:
        for start in range(0, len(plan["prompts"]), BATCH):
            prompts = plan["prompts"][start:start + BATCH]
            ids = [prompt_ids(tokenizer, p) for p in prompts]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
            if temperature > 0:
                torch.manual_seed(generator_seed + start)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=int(plan["max_new_tokens"]),
                                 do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                 top_p=None, top_k=None, pad_token_id=pad, use_cache=True)
            for prompt, row, prefix in zip(prompts, out, ids):
                new = row[width:].tolist()
                if tokenizer.eos_token_id in new:  # the answer ends at its first end of sequence
                    new = new[:new.index(tokenizer.eos_token_id)]
                records.append({"id": prompt["id"], "line": prompt["line"],
                                "prompt": tokenizer.decode(prefix, skip_special_tokens=False),
                                "answer": tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new)})
    finally:
        model.train(was_training)
    return records


def write(folder: Path, answers: Answers, version: str, plan: dict[str, Any]) -> None:
    """samples.jsonl in the version's folder (not yet marked: the marker that lists it comes after)."""
    header = {"version": version, "max_new_tokens": plan["max_new_tokens"], "temperature": plan.get("temperature", 0.0),
              "prompts": len(answers.records), "seconds": round(answers.seconds, 3), "time": time.time()}
    lines = [json.dumps({"samples": header})] + [json.dumps(r, ensure_ascii=False) for r in answers.records]
    (folder / SAMPLES).write_text("\n".join(lines) + "\n", encoding="utf-8")
