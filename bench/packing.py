"""Packing: trained tokens/s of traind with and without padding-free packing, against a plain padded Trainer
script and TRL's SFTTrainer, side by side in one run, on a small Llama on this CPU; and the eval loss of the
plain script and of packed traind after the same trained tokens.

Data (seeded): single-turn conversations (`messages`: a user turn, an assistant turn) whose rendered length
through the tiny tokenizer's chat template follows a lognormal (median `--median` 200 tokens, `--sigma` 0.8),
capped at `--max-length` 2048: with `max_seq_length` 1024 a few are cut. The same records are also written as
prompt/completion (prompt: the rendered user turn and the assistant header; completion: the assistant's
content, EOS appended by the trainer). The realised median is measured with the tokenizer and printed.

Model: the tiny model's tokenizer with a larger random-init LlamaConfig (`--hidden`, `--layers`, `--heads`,
`--intermediate`), saved once as a normal HF model directory; every case loads it, fp32, sdpa, AdamW, the same
learning rate, schedule, seed, clipping and one epoch.

Cases (each its own process; they alternate over `--repeats`, the median is reported):
  a   plain `Trainer` script: the examples tokenized by traind's encoder (messages; loss on the assistant's
      turn, end of turn included), padded per micro-batch by `DataCollatorForSeq2Seq`;
  b   TRL `SFTTrainer`, packing=False, on prompt/completion (completion-only loss: the same tokens);
  b+  TRL `SFTTrainer`, packing=True, packing_strategy='bfd' (TRL then sets padding_free), sdpa;
  c   traind (`traind daemon --once`, messages), training.packing = false: padded micro-batches;
  d   traind, training.packing = true: rows of max_seq_length by best-fit decreasing, no padding computed.
Padded cases take `--padded-batch` examples a micro-batch (default: chosen so the real tokens of a step match
the packed rows': `--rows` rows of max_seq_length times their fill over the mean example length); packed ones
`--rows` rows. Both are printed. A case that fails is reported as failed with the reason.

What is counted: trained tokens, the label positions that bear loss after the model's shift (labels[..., 1:]
!= -100), over every optimizer step but the first (warm-up), over the wall time from the end of the first step
to the end of the last. In the scripts (a, b, b+) each micro-batch's labels are counted as it is trained. For
traind (c, d) the times are the `step` events' of metrics.jsonl (one a step) and the tokens come from the job's
examples (traind's encoder, as its token cache holds them): every example's loss-mask tokens but its first (the
same count, padded or packed), all of them, less the first step's, estimated as its non-padding tokens
(`tokens_seen`) times the share of trained tokens (the first step is about 1/steps of the epoch, so the
estimate moves the figure by well under 1%). Real (non-padding) tokens/s are shown beside.

Eval loss: the models of a and d (first repeat), each evaluated on the same held-out conversations
(`--eval-examples`) with the same padded evaluation (traind's collator, loss summed over the trained tokens,
divided by their count).

    .venv/bin/python bench/packing.py [--examples 600] [--repeats 2] [--json]     # about 12 minutes on 2 cores
    .venv/bin/python bench/packing.py --quick       # a smoke run: tiny sizes, about a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, new_workspace

from engine.core import protocol

CASES = {"a": "plain Trainer, padded", "b": "TRL SFTTrainer, packing=False",
         "b+": "TRL SFTTrainer, packing=True bfd (padding_free)", "c": "traind, packing off",
         "d": "traind, packing on"}
TRL_CASES = ("b", "b+")
HYPER = {"learning_rate": 5e-4, "lr_scheduler": "constant_with_warmup", "warmup_steps": 5, "seed": 7,
         "max_grad_norm": 1.0, "weight_decay": 0.0, "optim": "adamw_torch"}


# --- model and data ------------------------------------------------------------------------------------


def build_model(target: Path, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.worker import tiny_model

    tokenizer = tiny_model.build_tokenizer(tiny_model.builtin_corpus())
    tokenizer.model_max_length = args.max_length
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


class Conversations:
    """Seeded conversations of lognormal rendered length; a word's tokens are additive (the byte-level
    pre-tokenizer splits at spaces), so a turn of n tokens is drawn word by word."""

    OVERHEAD = 6  # <|user|> \n <|eos|> <|assistant|> \n <|eos|>

    def __init__(self, tokenizer, median: float, sigma: float, max_length: int):
        from engine.worker import tiny_model

        words = sorted({w for text in tiny_model.builtin_corpus() for w in text.split()})
        self.words = [(w, len(tokenizer(" " + w, add_special_tokens=False)["input_ids"])) for w in words]
        self.median, self.sigma, self.max_length = median, sigma, max_length

    def _content(self, rng: random.Random, n: int) -> str:
        out, used = [], 0
        while used < n:
            word, cost = rng.choice(self.words)
            out.append(word)
            used += cost
        return " ".join(out)

    def records(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        records = []
        for _ in range(n):
            length = min(self.max_length, max(16, round(rng.lognormvariate(math.log(self.median), self.sigma))))
            content = length - self.OVERHEAD
            user = max(2, round(content * rng.uniform(0.2, 0.5)))
            records.append({"messages": [{"role": "user", "content": self._content(rng, user)},
                                         {"role": "assistant", "content": self._content(rng, content - user)}]})
        return records


def prompt_completion(tokenizer, record: dict) -> dict:
    user, assistant = record["messages"]
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    return {"prompt": prompt, "completion": assistant["content"]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(tmp: Path, args) -> dict:
    """The model, the three files and the batch sizes; prints what was made."""
    import numpy as np
    from transformers import AutoTokenizer

    from engine.worker import data, packing

    model = tmp / "model"
    build_model(model, args)
    tokenizer = AutoTokenizer.from_pretrained(model)
    gen = Conversations(tokenizer, args.median, args.sigma, args.max_length)
    train, held = gen.records(args.examples, seed=11), gen.records(args.eval_examples, seed=12)
    files = {"messages": write_jsonl(tmp / "train_messages.jsonl", train),
             "prompt_completion": write_jsonl(tmp / "train_pc.jsonl", [prompt_completion(tokenizer, r) for r in train]),
             "eval": write_jsonl(tmp / "eval_messages.jsonl", held)}
    full = [len(ids) for ids, _ in data.encode_records(train, "messages", tokenizer, args.max_length)]
    examples = data.encode_records(train, "messages", tokenizer, args.max_seq_length)
    lengths = np.array([len(ids) for ids, _ in examples])
    offsets, _ = packing.plan_rows(lengths, args.max_seq_length, HYPER["seed"])
    fill = lengths.sum() / ((len(offsets) - 1) * args.max_seq_length)
    per_step = args.rows * args.max_seq_length * fill
    padded_batch = args.padded_batch or max(1, round(per_step / lengths.mean()))
    info = {"examples": len(train), "eval_examples": len(held), "median_tokens": float(np.median(full)),
            "mean_tokens": float(np.mean(full)), "max_tokens": int(max(full)),
            "cut": int(sum(n > args.max_seq_length for n in full)), "rows": int(len(offsets) - 1),
            "fill": round(float(fill), 4), "packed_rows_per_step": args.rows,
            "packed_tokens_per_step": round(per_step), "padded_batch": padded_batch,
            "padded_tokens_per_step": round(padded_batch * float(lengths.mean())),
            "trained_tokens": int(sum(int(np.sum(m[1:])) for _, m in examples)), "tokens": int(lengths.sum())}
    print(f"data: {info['examples']} conversations, rendered length median {info['median_tokens']:.0f} tokens "
          f"(mean {info['mean_tokens']:.0f}, max {info['max_tokens']}), {info['cut']} cut at max_seq_length "
          f"{args.max_seq_length}; {info['trained_tokens']:,} trained tokens", file=sys.stderr)
    print(f"tokens a step: packed {args.rows} rows of {args.max_seq_length} at {fill:.1%} = "
          f"{info['packed_tokens_per_step']}; padded {padded_batch} examples x {lengths.mean():.0f} = "
          f"{info['padded_tokens_per_step']}", file=sys.stderr)
    return {"model": model, "files": files, "info": info}


# --- the script cases (a, b, b+), each run in its own process -------------------------------------------


def counting(trainer_class):
    """`trainer_class` that counts each micro-batch's trained and real tokens, and marks each step's end."""
    from transformers import TrainerCallback

    class Counting(trainer_class):
        def __init__(self, *a, **kw):
            self.trained = self.real = 0
            self.marks: list[tuple[float, int, int]] = []
            outer = self

            class Clock(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    outer.marks.append((time.time(), outer.trained, outer.real))

            super().__init__(*a, callbacks=[Clock()], **kw)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.trained += int((inputs["labels"][..., 1:] != -100).sum())
            mask = inputs.get("attention_mask")  # none: TRL's padding-free sequence, not padded on a CPU
            self.real += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    return Counting


def run_script(case: str, cfg: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(HYPER["seed"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32, attn_implementation="sdpa")
    common = dict(output_dir=str(Path(cfg["out"]) / "ckpt"), learning_rate=HYPER["learning_rate"],
                  lr_scheduler_type=HYPER["lr_scheduler"], warmup_steps=HYPER["warmup_steps"], seed=HYPER["seed"],
                  max_grad_norm=HYPER["max_grad_norm"], weight_decay=HYPER["weight_decay"], optim=HYPER["optim"],
                  num_train_epochs=1, use_cpu=True, save_strategy="no", report_to="none", logging_steps=1,
                  disable_tqdm=True, bf16=False, gradient_checkpointing=False)
    if case == "a":
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        from engine.worker import data

        records = [json.loads(line) for line in Path(cfg["messages"]).read_text().splitlines()]
        dataset = [{"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [t if m else -100 for t, m in zip(ids, mask)]}
                   for ids, mask in data.encode_records(records, "messages", tokenizer, cfg["max_seq_length"])]
        trainer = counting(Trainer)(
            model=model, args=TrainingArguments(per_device_train_batch_size=cfg["padded_batch"], **common),
            train_dataset=dataset, processing_class=tokenizer,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    else:
        from datasets import load_dataset
        from trl import SFTConfig, SFTTrainer

        packed = case == "b+"
        config = SFTConfig(per_device_train_batch_size=cfg["rows"] if packed else cfg["padded_batch"],
                           max_length=cfg["max_seq_length"], packing=packed, packing_strategy="bfd",
                           dataset_num_proc=1, **common)
        dataset = load_dataset("json", data_files=cfg["prompt_completion"], split="train")
        trainer = counting(SFTTrainer)(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    if cfg.get("save"):
        trainer.save_model(str(Path(cfg["out"]) / "model"))
    return timed(trainer.marks, trainer.trained)


def timed(marks: list[tuple[float, int, int]], total: int) -> dict:
    (t0, trained0, real0), (t1, trained1, real1) = marks[0], marks[-1]
    return {"trained_tokens_per_s": (trained1 - trained0) / (t1 - t0), "real_tokens_per_s": (real1 - real0) / (t1 - t0),
            "steps": len(marks), "trained_tokens": total}


def script(case: str, tmp: Path, prepared: dict, args, save: bool) -> dict:
    out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"case-{case}-"))
    cfg = {"model": str(prepared["model"]), "out": str(out), "messages": str(prepared["files"]["messages"]),
           "prompt_completion": str(prepared["files"]["prompt_completion"]), "max_seq_length": args.max_seq_length,
           "rows": args.rows, "padded_batch": prepared["info"]["padded_batch"], "save": save}
    done = subprocess.run([sys.executable, __file__, "--run-case", case, json.dumps(cfg)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True)
    (out / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"failed": _reason(done.stderr)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if save:
        result["model"] = str(out / "model")
    return result


# --- the traind cases (c, d) ----------------------------------------------------------------------------


def traind(case: str, tmp: Path, prepared: dict, args) -> dict:
    packed = case == "d"
    training = {**HYPER, "max_seq_length": args.max_seq_length, "packing": packed, "precision": "fp32",
                "attn_implementation": "sdpa", "batch_size": args.rows if packed else prepared["info"]["padded_batch"]}
    ws = new_workspace(tmp, prepared["model"], {
        "training": training, "checkpoint": {"every_steps": 10**9, "every_minutes": 10**6},
        "jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.0}, "disk": {"reserve": 0},
        "snapshots": {"daily_at": "off", "every_files": 0}, "replay": {"fraction": 0.0},
        "eval": {"gate": "off", "holdout_fraction": 0.0, "holdout_min": 0}})
    (ws.inbox / "train.jsonl").write_bytes(prepared["files"]["messages"].read_bytes())
    done = subprocess.run([sys.executable, "-m", "engine.cli", "daemon", "--once", "-w", str(ws.root)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True)
    runs = list(ws.runs.iterdir())
    if done.returncode != 0 or len(runs) != 1 or not (runs[0] / "metrics.jsonl").is_file():
        return {"failed": f"the daemon failed ({ws.root}): {_reason(done.stderr)}"}
    run = runs[0]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    if not any(e["event"] == "job_end" and e.get("outcome") == "done" for e in events):
        return {"failed": f"the job did not finish ({run})"}
    # the cache is gone with the finished job: the same encoder's count (prepare) is what it held
    trained, real = prepared["info"]["trained_tokens"], prepared["info"]["tokens"]
    first, last = steps[0], steps[-1]
    span = last["time"] - first["time"]
    trained_timed = trained - first["tokens_seen"] * trained / real
    models = [p for p in ws.models.iterdir() if (p / protocol.MODEL_MARKER).is_file()]
    return {"trained_tokens_per_s": trained_timed / span,
            "real_tokens_per_s": (last["tokens_seen"] - first["tokens_seen"]) / span, "steps": len(steps),
            "trained_tokens": trained, "tokens_seen": last["tokens_seen"], "cache_tokens": real,
            "model": str(models[0]) if models else None}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


def _reason(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["no output"])[-1][:300]


# --- eval ------------------------------------------------------------------------------------------------


def eval_loss(model_dir: str, eval_file: Path, max_seq_length: int, batch_size: int = 8) -> float:
    """Mean loss over the trained tokens of the held-out conversations, padded batches of traind's collator."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.worker import data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    records = [json.loads(line) for line in eval_file.read_text().splitlines()]
    examples = [{"input_ids": ids, "loss_mask": mask}
                for ids, mask in data.encode_records(records, "messages", tokenizer, max_seq_length)]
    collate = data.Collator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate([{k: np.asarray(v) for k, v in e.items()} for e in examples[i: i + batch_size]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


# --- the run ---------------------------------------------------------------------------------------------


def run_case(case: str, tmp: Path, prepared: dict, args, first: bool) -> dict:
    began = time.monotonic()
    if case in ("c", "d"):
        result = traind(case, tmp, prepared, args)
    else:
        result = script(case, tmp, prepared, args, save=first and case == "a")
    result["wall_s"] = round(time.monotonic() - began, 1)
    status = result.get("failed") or f"{result['trained_tokens_per_s']:,.0f} trained tokens/s"
    print(f"  {case:2} {CASES[case]}: {status} ({result['wall_s']:.0f}s)", file=sys.stderr)
    return result


def summarise(cases: list[str], runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for case in cases:
        ok = [r for r in runs[case] if "failed" not in r]
        if not ok:
            rows[case] = {"name": CASES[case], "failed": runs[case][0]["failed"]}
            continue
        rows[case] = {"name": CASES[case],
                      "trained_tokens_per_s": round(statistics.median(r["trained_tokens_per_s"] for r in ok)),
                      "real_tokens_per_s": round(statistics.median(r["real_tokens_per_s"] for r in ok)),
                      "runs": [round(r["trained_tokens_per_s"]) for r in ok], "steps": ok[0]["steps"],
                      "trained_tokens": ok[0]["trained_tokens"]}
    return rows


def ratios(rows: dict) -> dict:
    def speed(case):
        return rows.get(case, {}).get("trained_tokens_per_s")

    out = {}
    if speed("d") and speed("a"):
        out["d/a"] = round(speed("d") / speed("a"), 3)
    trl = [(speed(c), c) for c in TRL_CASES if speed(c)]
    if speed("d") and trl:
        best, which = max(trl)
        out["d/best_trl"], out["best_trl"] = round(speed("d") / best, 3), which
    if speed("d") and speed("c"):
        out["d/c"] = round(speed("d") / speed("c"), 3)
    return out


def print_table(result: dict, args) -> None:
    info = result["data"]
    print(f"packing bench: {info['examples']} conversations (median {info['median_tokens']:.0f} tokens, "
          f"max {info['max_tokens']}, {info['cut']} cut), max_seq_length {args.max_seq_length}, Llama hidden "
          f"{args.hidden} x {args.layers} layers, fp32 sdpa, CPU, {os.environ.get('OMP_NUM_THREADS', 'all')} threads")
    print(f"a step: packed {info['packed_rows_per_step']} rows (~{info['packed_tokens_per_step']} tokens, "
          f"{info['fill']:.1%} full); padded {info['padded_batch']} examples (~{info['padded_tokens_per_step']} tokens)")
    print(f"{'case':4} {'':48} {'trained tok/s':>13} {'real tok/s':>10} {'steps':>6}  runs")
    for case, row in result["cases"].items():
        if "failed" in row:
            print(f"{case:4} {row['name']:48} {'FAILED':>13}  {row['failed']}")
            continue
        print(f"{case:4} {row['name']:48} {row['trained_tokens_per_s']:>13,} {row['real_tokens_per_s']:>10,} "
              f"{row['steps']:>6}  {row['runs']}")
    r = result["ratios"]
    if "d/a" in r:
        print(f"(d)/(a)        {r['d/a']:.2f}   (target >= 1.5)")
    if "d/best_trl" in r:
        print(f"(d)/best TRL   {r['d/best_trl']:.2f}   (best TRL: {r['best_trl']}; target >= 1.0)")
    if "d/c" in r:
        print(f"(d)/(c)        {r['d/c']:.2f}")
    ev = result.get("eval")
    if ev:
        print(f"eval loss on {info['eval_examples']} held-out conversations after one epoch "
              f"({ev['trained_tokens_a']:,} / {ev['trained_tokens_d']:,} trained tokens): (a) {ev['a']:.4f}  "
              f"(d) {ev['d']:.4f}  (d)-(a) {ev['d'] - ev['a']:+.4f}")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--run-case":  # one script case, in its own process
        print(json.dumps(run_script(sys.argv[2], json.loads(sys.argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=600, help="training conversations")
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--median", type=float, default=200.0, help="median rendered length, tokens")
    parser.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of the lengths")
    parser.add_argument("--max-length", type=int, default=2048, help="longest conversation, tokens")
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2, help="packed rows a micro-batch")
    parser.add_argument("--padded-batch", type=int, default=0, help="padded examples a micro-batch (0: matched)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma separated, of {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model and data, one repeat")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.eval_examples, args.repeats = 48, 8, 1
        args.median, args.max_length, args.max_seq_length = 60, 512, 256
        args.hidden, args.intermediate, args.layers = 64, 128, 2
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {', '.join(sorted(unknown))}: expected {', '.join(CASES)}")
    with tempfile.TemporaryDirectory(prefix="traind-bench-packing-") as tmp:
        tmp = Path(tmp)
        prepared = prepare(tmp, args)
        runs: dict[str, list[dict]] = {c: [] for c in cases}
        for repeat in range(args.repeats):
            for case in cases:
                runs[case].append(run_case(case, tmp, prepared, args, first=repeat == 0))
        result = {"data": prepared["info"], "cases": summarise(cases, runs)}
        result["ratios"] = ratios(result["cases"])
        a, d = runs.get("a", [{}])[0], runs.get("d", [{}])[0]
        if a.get("model") and d.get("model"):
            eval_file = prepared["files"]["eval"]
            result["eval"] = {"a": round(eval_loss(a["model"], eval_file, args.max_seq_length), 4),
                              "d": round(eval_loss(d["model"], eval_file, args.max_seq_length), 4),
                              "trained_tokens_a": a["trained_tokens"], "trained_tokens_d": d["trained_tokens"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
