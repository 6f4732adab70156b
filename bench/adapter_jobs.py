"""What the adapter benchmarks share (bench/adapters.py on a CPU, bench/gpu_adapters.py on a GPU).

- `build_model`: a random-init Llama or Qwen2 of a given shape, with the tiny model's tokenizer, saved as a
  normal model directory, built in a subprocess (on the GPU where there is one) so the benchmark process holds
  no torch memory while the workers it measures run;
- `write_blocks_file`: a text JSONL file that packs into exactly N training blocks, so a job of batch B makes
  exactly N / B optimizer steps (the worker has no max-steps knob: one epoch of the file is the job);
- `job_spec`: the spec of a full, LoRA or QLoRA job, the base pinned as the daemon pins it (engine/store/bases.py);
- `steady_tokens_per_s`: the training rate from the worker's step events, warm-up steps and checkpoint saves left out.

    python bench/adapter_jobs.py build OUT_DIR SHAPE_JSON   # what build_model runs; prints the model's facts as JSON
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import ROOT

from engine.core import protocol
from engine.data import demo_data
from engine.store import bases
from engine.store.workspace import Workspace


@dataclasses.dataclass(frozen=True)
class Shape:
    arch: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int | None = None  # None: the tokenizer's own size
    tie: bool = False
    dtype: str = "float32"  # what the weights are saved in

    def describe(self) -> str:
        vocab = self.vocab or "tokenizer"
        return (f"{self.arch}, hidden {self.hidden}, {self.layers} layers, intermediate {self.intermediate}, "
                f"{self.heads} heads ({self.kv_heads} kv), vocab {vocab}, {'tied' if self.tie else 'untied'} "
                f"embeddings, {self.dtype}")


def build_model(target: Path, shape: Shape) -> dict[str, Any]:
    """Build the model into `target`; its facts: params, embedding_params, vocab, tied, device."""
    result = subprocess.run([sys.executable, __file__, "build", str(target), json.dumps(dataclasses.asdict(shape))],
                            cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _build(target: Path, shape: Shape) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from engine.worker.tiny_model import build_tokenizer, builtin_corpus

    tokenizer = build_tokenizer(builtin_corpus())
    vocab = shape.vocab or len(tokenizer)
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[shape.arch]
    config = config_class(vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                          num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                          num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                          tie_word_embeddings=shape.tie, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of a 1.5B model is seconds on a GPU
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, shape.dtype))
    params = sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter, counted once
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return {"params": params, "embedding_params": model.get_input_embeddings().weight.numel(), "vocab": vocab,
            "tokenizer_vocab": len(tokenizer), "tied": shape.tie, "device": device}


def write_blocks_file(path: Path, tokenizer_dir: Path, blocks: int, max_seq_length: int, seed: int = 3) -> Path:
    """Demo text records, as many as pack into exactly `blocks` blocks of `max_seq_length` (the worker's own
    encoder counts them; the jobs train with training.packing_cross_document, full blocks), written as JSONL."""
    from transformers import AutoTokenizer

    from engine.worker import data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = list(demo_data.demo_records(max(16, blocks * max_seq_length // 32), "text", seed))

    def count(n: int) -> int:
        return len(data.encode_records(records[:n], "text", tokenizer, max_seq_length, cross_document=True))

    while count(len(records)) < blocks:
        records = list(demo_data.demo_records(len(records) * 2, "text", seed))
    low, high = 1, len(records)  # the fewest records that make `blocks` blocks; a document adds at most one
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if count(mid) < blocks else (low, mid)
    if count(low) != blocks:
        raise RuntimeError(f"cannot make exactly {blocks} blocks of {max_seq_length} tokens from demo records")
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:low]))
    return path


def job_spec(ws: Workspace, base: Path, data: Path, job_id: str, method: str, training: dict[str, Any],
             checkpoint: dict[str, Any], r: int = 16) -> protocol.JobSpec:
    """A job as the daemon would start it on `base` in `ws`: the model saved to models/.partial-JOB."""
    run_dir = ws.runs / job_id
    run_dir.mkdir(parents=True)
    adapter = None
    if method != "full":
        adapter = {"method": method, "r": r, "alpha": 2 * r, "dropout": 0.05, "target_modules": "all-linear",
                   "modules_to_save": [], "base": bases.pin(bases.record(ws, base)), "adapter_in": None}
    return protocol.JobSpec(job_id=job_id, data_file=str(data), format="text", run_dir=str(run_dir),
                            model_in=str(base), model_out=str(ws.models / f".partial-{job_id}"),
                            log_path=str(run_dir / "worker.log"), training=training, checkpoint=checkpoint,
                            adapter=adapter)


def steady_tokens_per_s(events: list[dict], warmup: int) -> float | None:
    """Tokens over seconds from the end of step `warmup` to the end of the last step, leaving out each step
    whose interval holds a checkpoint's save (the step event is sent before the save, the next one after)."""
    steps = [e for e in events if e["event"] == "step"]
    saved = {e["step"] for e in events if e["event"] == "checkpoint"}
    tokens = seconds = 0.0
    for before, after in zip(steps, steps[1:]):
        if before["step"] >= warmup and before["step"] not in saved:
            tokens += after["tokens_seen"] - before["tokens_seen"]
            seconds += after["time"] - before["time"]
    return tokens / seconds if seconds > 0 else None


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


if __name__ == "__main__":
    if sys.argv[1:2] == ["build"] and len(sys.argv) == 4:
        print(json.dumps(_build(Path(sys.argv[2]), Shape(**json.loads(sys.argv[3])))))
    else:
        sys.exit(__doc__)
