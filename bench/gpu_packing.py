"""Benchmark for a GPU: padding-free packing against padding, with sdpa and flash_attention_2, and its correctness.

A random-init model of Qwen2.5-0.5B's shape (bench/gpu_adapters.py's; 494M parameters) trained as the worker
trains a full fine-tune: fp32 master weights, bf16 autocast, AdamW (transformers' adamw_torch), gradients
clipped at 1.0. The data are generated text documents of lognormal token lengths (median 200, cut at 2,048,
one token a word, so a document's length is what was drawn), tokenized into traind's own cache (data.build_cache)
and served by traind's own classes, the two ways a job can take them:

- padded: data.TokenDataset + data.Collator, each micro-batch padded to its longest example;
- packed: packing.row_plan (best-fit decreasing rows of max_seq_length) + packing.PackedCollator: for sdpa the
  rows stacked, positions per example, no attention_mask; for flash_attention_2 one flattened sequence with
  cu_seq_lens_q/k and max_length_q/k (`flash=True`, as transformers' DataCollatorWithFlattening).

An optimizer step is the same examples either way: those of --rows packed rows (the rows in a seeded random
order, as the Trainer's sampler takes them), one micro-batch packed; padded, the same examples shuffled in
micro-batches of --pad-batch (default --rows), their gradients accumulated; the loss is the sum over the step's
trained tokens divided by their count (num_items_in_batch), so both take the same real tokens and the same
loss-bearing tokens a step (checked). Per case, over --steps timed steps after --warmup (torch.cuda.synchronize
at both ends): real (non-padding) tokens/s, trained (loss-bearing) tokens/s, MFU = 6 x params x real tokens/s
over the GPU's peak dense bf16 FLOP/s (attention's FLOPs not counted; the peak from a table by the GPU's name
or --peak-flops, and which one is said), torch.cuda.max_memory_allocated over the case (weights, gradients,
AdamW state, activations), the token slots the model ran on and the padding among them, and the first step's
loss (the same examples from the same init, so padded and packed should agree).

flash_attention_2 runs where the flash_attn package imports, on CUDA; elsewhere its rows say why not.

The correctness check, per attention implementation (no gradients, eval mode, bf16 autocast on a GPU, fp32 on
a CPU): two rows of the plan (the one holding the most examples, and the least full of those holding two or
more, so the stacked batch has tail padding), through PackedCollator, per-token losses (each token's next-token
cross-entropy) against the same example run alone; max and mean abs difference against --tolerance. A control
shows the check can tell: the same rows with positions running on across examples, so they attend to one
another. And PackedCollator(flash=True) against transformers' DataCollatorWithFlattening(return_flash_attn_kwargs
=True) on the same examples: the same tensors.

The JSON document (--out) and a Markdown summary to paste into docs/performance.md (--markdown) are rewritten
after each case, so a run cut short keeps what it measured.

    python bench/gpu_packing.py [--seq 2048] [--rows 8] [--steps 10] [--warmup 3] [--peak-flops F]
                                [--out packing.json] [--markdown packing.md]      # estimated 1-2 minutes on an H200
    python bench/gpu_packing.py --smoke     # tiny shapes, fp32, sdpa only: the script itself, on a CPU (~5 s)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adapter_jobs import Shape
from gpu_adapters import SIZES, SMOKE

from engine.core.resources import format_bytes
from engine.worker import data, packing
from engine.worker.tiny_model import build_tokenizer, builtin_corpus

# Dense (not sparse) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name(); first match.
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989.4e12), ("H100", 989.4e12), ("H800", 989.4e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
)
ATTENTION = ("sdpa", "flash_attention_2")
LAYOUTS = ("padded", "packed")


def peak_flops(device_name: str, override: float | None) -> tuple[float | None, str]:
    """The peak to take MFU against, and where it came from."""
    if override:
        return override, "--peak-flops"
    for key, flops in PEAK_BF16:
        if key.lower() in device_name.lower():
            return flops, f"dense bf16 peak of {key} (from the GPU's name {device_name!r})"
    return None, f"no known peak for {device_name!r}: give --peak-flops"


def flash_unavailable(cuda: bool, smoke: bool) -> str | None:
    if smoke:
        return "skipped in --smoke"
    if not cuda:
        return "no CUDA here"
    if importlib.util.find_spec("flash_attn") is None:
        return "not installed (the flash_attn package does not import)"
    return None


# --- data -------------------------------------------------------------------------------------------


def write_documents(path: Path, tokenizer, tokens: int, median: float, sigma: float, longest: int,
                    seed: int) -> None:
    """Text records, one single-token word a token and EOS, of lognormal lengths, until `tokens` in all."""
    words = [t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()]
    words = np.array([w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1])
    rng = np.random.default_rng(seed)
    total = 0
    with path.open("w") as f:
        while total < tokens:
            n = int(np.clip(round(rng.lognormal(math.log(median), sigma)), 8, longest))
            f.write(json.dumps({"text": " " + " ".join(rng.choice(words, n - 1))}) + "\n")  # + EOS: n tokens
            total += n


def length_summary(lengths: np.ndarray) -> dict[str, Any]:
    return {"examples": len(lengths), "tokens": int(lengths.sum()), "median": float(np.median(lengths)),
            "mean": round(float(lengths.mean()), 1), "p90": float(np.percentile(lengths, 90)),
            "max": int(lengths.max())}


def plan_steps(rows: packing.PackedDataset, dataset: data.TokenDataset, args, n_steps: int,
               seed: int) -> list[dict[str, Any]]:
    """Per optimizer step: its rows (packed) and the same examples, shuffled, in micro-batches (padded)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    if len(order) < n_steps * args.rows:
        raise RuntimeError(f"{len(order)} rows, {n_steps * args.rows} needed")
    steps = []
    for s in range(n_steps):
        picked = order[s * args.rows: (s + 1) * args.rows].tolist()
        examples = [int(i) for r in picked for i in rows.items[rows.offsets[r]: rows.offsets[r + 1]]]
        rng.shuffle(examples)
        steps.append({"rows": picked, "micro": [examples[i: i + args.pad_batch]
                                                for i in range(0, len(examples), args.pad_batch)]})
    return steps


def trained_tokens(batch: dict[str, Any]) -> int:
    """Loss-bearing tokens: the model shifts labels left, so a row's first label is never a target."""
    return int((batch["labels"][..., 1:] != data.IGNORE_INDEX).sum())


def real_tokens(batch: dict[str, Any]) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "cu_seq_lens_q" in batch:
        return batch["input_ids"].numel()
    return int(packing.real_tokens(batch))


def collate(steps, rows, dataset, layout: str, attention: str, pad_id: int) -> list[list[dict[str, Any]]]:
    if layout == "packed":
        collator = packing.PackedCollator(pad_id, flash=attention == "flash_attention_2")
        return [[collator([rows[r] for r in step["rows"]])] for step in steps]
    collator = data.Collator(pad_id)
    return [[collator([dataset[i] for i in micro]) for micro in step["micro"]] for step in steps]


# --- the model and the loop ---------------------------------------------------------------------


def build_model(shape: Shape, vocab: int, tokenizer, attention: str, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                         tie_word_embeddings=shape.tie, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         use_cache=False)  # as the Trainer sets it; with a cache, transformers skips the packed mask
    torch.manual_seed(0)  # every case starts from the same weights
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model, batches: list[list[dict[str, Any]]], warmup: int, device: torch.device) -> dict[str, Any]:
    """Train on `batches` (micro-batches a step); time the steps after `warmup`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    model.train()
    losses, t0 = [], None
    real = trained = slots = 0
    for s, micro in enumerate(batches):
        if s == warmup:
            sync(device)
            t0 = time.perf_counter()
        n_items = sum(trained_tokens(b) for b in micro)
        loss_sum = torch.zeros((), device=device)
        for b in micro:
            with autocast(device):
                loss = model(**to_device(b, device), num_items_in_batch=n_items).loss
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum)
        if s >= warmup:
            real += sum(real_tokens(b) for b in micro)
            trained += n_items
            slots += sum(b["input_ids"].numel() for b in micro)
    sync(device)
    seconds = time.perf_counter() - t0
    del optimizer
    return {"seconds": round(seconds, 3), "steps": len(batches) - warmup, "real_tokens": real,
            "trained_tokens": trained, "token_slots": slots, "padding_share": round(1 - real / slots, 4),
            "real_tokens_per_s": round(real / seconds, 1), "trained_tokens_per_s": round(trained / seconds, 1),
            "micro_batches_per_step": round(sum(len(m) for m in batches) / len(batches), 2),
            "first_loss": round(float(losses[0]), 5), "last_loss": round(float(losses[-1]), 5)}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- correctness ------------------------------------------------------------------------------


def check_rows(rows: packing.PackedDataset) -> list[int]:
    """The row holding the most examples, and the least full of those with two or more (a shorter row)."""
    counts = np.diff(rows.offsets)
    most = int(np.argmax(counts))
    sizes = np.array([len(rows[r]["input_ids"]) if counts[r] >= 2 and r != most else 1 << 30
                      for r in range(len(rows))])
    return [most, int(np.argmin(sizes))]


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each token's next-token cross-entropy: logits (n, vocab) of tokens 0..n-1 against ids 1..n."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


@torch.no_grad()
def check_losses(model, rows, picked: list[int], flash: bool, pad_id: int, device: torch.device) -> dict:
    """Per-token losses of the packed rows against each example alone; and with positions running on."""
    model.eval()
    features = [rows[r] for r in picked]
    batch = packing.PackedCollator(pad_id, flash=flash)(features)
    segments = []  # (row in the batch, start, length)
    for b, f in enumerate(features):
        starts = np.cumsum(f["lengths"]) - f["lengths"]
        base = sum(len(g["input_ids"]) for g in features[:b]) if flash else 0
        segments += [(0 if flash else b, base + int(s), int(n)) for s, n in zip(starts, f["lengths"])]
    running = dict(batch)  # the control: one position count a row, so the examples of a row attend to each other
    running["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).contiguous()
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        running.pop(key, None)
    with autocast(device):
        packed = model(**{k: v for k, v in to_device(batch, device).items() if k != "labels"}).logits
        control = model(**{k: v for k, v in to_device(running, device).items() if k != "labels"}).logits
    ids = batch["input_ids"].to(device)
    diffs, control_diffs = [], []
    for row, start, n in segments:
        example = ids[row, start: start + n]
        with autocast(device):
            alone = token_losses(model(input_ids=example[None]).logits[0], example)
        diffs.append((token_losses(packed[row, start: start + n], example) - alone).abs())
        control_diffs.append((token_losses(control[row, start: start + n], example) - alone).abs())
    diff, control_diff = torch.cat(diffs), torch.cat(control_diffs)
    model.train()
    return {"rows": picked, "row_lengths": [len(f["input_ids"]) for f in features], "examples": len(segments),
            "tokens": int(diff.numel()), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "control_max_abs_diff": float(control_diff.max()), "control_mean_abs_diff": float(control_diff.mean())}


def compare_with_transformers(rows, picked: list[int], pad_id: int) -> dict[str, Any]:
    """PackedCollator(flash=True) against DataCollatorWithFlattening(return_flash_attn_kwargs=True)."""
    from transformers import DataCollatorWithFlattening

    ours = packing.PackedCollator(pad_id, flash=True)([rows[r] for r in picked])
    examples = []
    for r in picked:
        for i in rows.items[rows.offsets[r]: rows.offsets[r + 1]]:
            e = rows.examples[int(i)]
            labels = np.where(e["loss_mask"].astype(bool), e["input_ids"], data.IGNORE_INDEX)
            examples.append({"input_ids": e["input_ids"].tolist(), "labels": labels.tolist()})
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples)
    differing = sorted(k for k in set(ours) | set(theirs) if k not in ours or k not in theirs
                       or not torch.equal(torch.as_tensor(ours[k]).long(), torch.as_tensor(theirs[k]).long()))
    return {"same": not differing, "differing_keys": differing, "keys": sorted(theirs)}


# --- the report ---------------------------------------------------------------------------------


def markdown(doc: dict[str, Any]) -> str:
    m, j = doc["model"], doc["job"]
    lengths = doc["data"]
    lines = [
        f"### Padding-free packing on {doc['device_name']} (`bench/gpu_packing.py`{' --smoke' if doc['smoke'] else ''})",
        "",
        f"{m['shape']}; {m.get('params', 0):,} parameters, random init; full fine-tune, fp32 master weights, "
        f"{doc['precision']}, AdamW, clip 1.0. {lengths['examples']:,} generated text examples "
        f"(lengths median {lengths['median']:.0f}, mean {lengths['mean']:.0f}, p90 {lengths['p90']:.0f}, "
        f"max {lengths['max']}), max_seq_length {j['seq']}: {doc['packing']['rows']:,} packed rows, "
        f"{doc['packing']['fill']:.1%} full. A step: the examples of {j['rows']} rows "
        f"(~{doc['packing']['tokens_per_step']:,.0f} real tokens); padded, the same examples in micro-batches "
        f"of {j['pad_batch']}, accumulated. {j['steps']} timed steps after {j['warmup']}. "
        f"MFU: 6 x params x real tokens/s over {doc['peak_flops_source']}"
        + (f", {doc['peak_flops'] / 1e12:,.1f} TFLOP/s." if doc["peak_flops"] else "."),
        "",
        "| attention | data | real tokens/s | trained tokens/s | MFU | peak memory | padding | micro-batches/step |"
        " first loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in doc["cases"].items():
        attention, layout = name.split(" ")
        if "real_tokens_per_s" not in row:
            lines.append(f"| {attention} | {layout} | {row.get('skipped') or row.get('error')} | | | | | | |")
            continue
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        peak = "-" if row["peak_memory_bytes"] is None else format_bytes(row["peak_memory_bytes"])
        lines.append(f"| {attention} | {layout} | {row['real_tokens_per_s']:,.0f} | {row['trained_tokens_per_s']:,.0f} "
                     f"| {mfu} | {peak} | {row['padding_share']:.1%} | {row['micro_batches_per_step']:g} "
                     f"| {row['first_loss']:.4f} |")
    for attention in ATTENTION:
        pair = [doc["cases"].get(f"{attention} {layout}", {}) for layout in LAYOUTS]
        if all("real_tokens_per_s" in r for r in pair):
            speed = pair[1]["real_tokens_per_s"] / pair[0]["real_tokens_per_s"]
            memory = (f", peak memory x{pair[1]['peak_memory_bytes'] / pair[0]['peak_memory_bytes']:.2f}"
                      if pair[0]["peak_memory_bytes"] else "")
            lines.append(f"\n{attention}: packed/padded tokens/s x{speed:.2f}{memory}.")
    lines += ["", f"Correctness: per-token losses of two packed rows against each example alone "
                  f"({doc['precision']}, eval; tolerance {doc['tolerance']:g}); the control lets the examples "
                  f"of a row attend to each other.", "",
              "| attention | collator | rows (tokens) | examples | max abs diff | mean abs diff | within tolerance "
              "| control max | control mean |", "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for attention, row in doc["correctness"].items():
        if "max_abs_diff" not in row:
            lines.append(f"| {attention} | | {row.get('skipped') or row.get('error')} | | | | | | |")
            continue
        collator = "PackedCollator(flash=True)" if attention == "flash_attention_2" else "PackedCollator()"
        lines.append(f"| {attention} | {collator} | {' + '.join(map(str, row['row_lengths']))} | {row['examples']} "
                     f"| {row['max_abs_diff']:.2e} | {row['mean_abs_diff']:.2e} | {'yes' if row['ok'] else 'NO'} "
                     f"| {row['control_max_abs_diff']:.2e} | {row['control_mean_abs_diff']:.2e} |")
    same = doc.get("flattening")
    if same is not None:
        lines += ["", "PackedCollator(flash=True) against transformers' DataCollatorWithFlattening("
                      "return_flash_attn_kwargs=True) on the same examples: "
                  + ("the same tensors." if same["same"] else f"DIFFERENT in {', '.join(same['differing_keys'])}.")]
    return "\n".join(lines) + "\n"


def describe(row: dict[str, Any]) -> str:
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    peak = "-" if row["peak_memory_bytes"] is None else format_bytes(row["peak_memory_bytes"])
    return (f"{row['real_tokens_per_s']:>10,.0f} real tokens/s {row['trained_tokens_per_s']:>10,.0f} trained  "
            f"MFU {mfu}  peak {peak}  padding {row['padding_share']:.1%}  first loss {row['first_loss']:.4f}")


def write(doc: dict[str, Any], args) -> None:
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(doc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, sdpa only: the script, on a CPU too")
    ap.add_argument("--seq", type=int, default=2048, help="max_seq_length: tokens a row (default 2048)")
    ap.add_argument("--rows", type=int, default=8, help="packed rows a step (default 8)")
    ap.add_argument("--pad-batch", type=int, help="examples a padded micro-batch (default --rows)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps a case (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (default 3)")
    ap.add_argument("--median", type=float, default=200, help="median example length in tokens (default 200)")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the lengths (default 1.0)")
    ap.add_argument("--peak-flops", type=float, help="the GPU's peak FLOP/s for MFU (default: by its name)")
    ap.add_argument("--tolerance", type=float, help="max abs per-token loss difference (default 0.1 in bf16, "
                    "1e-4 in fp32)")
    ap.add_argument("--attention", default=",".join(ATTENTION), help="comma-separated (default both)")
    ap.add_argument("--out", type=Path, help="write the JSON document here, rewritten after each case")
    ap.add_argument("--markdown", type=Path, help="write the Markdown summary here, rewritten after each case")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq, args.rows, args.steps, args.warmup, args.median = 256, 4, 3, 1, 40
    args.pad_batch = args.pad_batch or args.rows
    shape = SMOKE if args.smoke else SIZES["0.5b"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16 autocast" if cuda else "fp32"
    tolerance = args.tolerance or (0.1 if cuda else 1e-4)
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    flops, flops_source = peak_flops(device_name, args.peak_flops) if cuda else (None, "no GPU: no MFU")
    attentions = args.attention.split(",")
    if unknown := sorted(set(attentions) - set(ATTENTION)):
        ap.error(f"--attention: unknown {', '.join(unknown)}")

    tmp = Path(tempfile.mkdtemp(prefix="traind-bench-gpu-packing-"))
    try:
        t0 = time.monotonic()
        tokenizer = build_tokenizer(builtin_corpus())
        n_steps = args.warmup + args.steps
        write_documents(tmp / "data.jsonl", tokenizer, int(1.2 * n_steps * args.rows * args.seq), args.median,
                        args.sigma, 2048, seed=3)
        data.build_cache(tmp / "data.jsonl", "text", tokenizer, args.seq, tmp / "cache", log=lambda _: None)
        dataset = data.TokenDataset(tmp / "cache")
        rows = packing.row_plan(dataset, tmp / "cache", args.seq, seed=7, log=lambda _: None)
        lengths = dataset.lengths()
        steps = plan_steps(rows, dataset, args, n_steps, seed=11)
        row_tokens = np.array([len(rows[r]["input_ids"]) for r in range(len(rows))])
        vocab = shape.vocab or len(tokenizer)
        pad_id = tokenizer.pad_token_id
        doc: dict[str, Any] = {
            "smoke": args.smoke, "device_name": device_name, "torch": torch.__version__, "precision": precision,
            "peak_flops": flops, "peak_flops_source": flops_source, "tolerance": tolerance,
            "model": {"shape": shape.describe().replace(", bfloat16", "").replace("vocab tokenizer", f"vocab {vocab}")},
            "job": {"seq": args.seq, "rows": args.rows, "pad_batch": args.pad_batch, "steps": args.steps,
                    "warmup": args.warmup, "lognormal": {"median": args.median, "sigma": args.sigma}},
            "data": length_summary(lengths),
            "packing": {"rows": len(rows), "fill": round(float(row_tokens.sum()) / (len(rows) * args.seq), 4),
                        "tokens_per_step": float(np.mean([row_tokens[s["rows"]].sum() for s in steps]))},
            "cases": {}, "correctness": {},
        }
        picked = check_rows(rows)
        doc["flattening"] = compare_with_transformers(rows, picked, pad_id)
        doc["setup_s"] = round(time.monotonic() - t0, 1)
        print(f"{device_name}, {precision}; {doc['model']['shape']}; {len(lengths):,} examples (median "
              f"{doc['data']['median']:.0f}, max {doc['data']['max']}) in {len(rows):,} rows of {args.seq} "
              f"({doc['packing']['fill']:.1%} full); setup {doc['setup_s']} s; MFU against {flops_source}",
              flush=True)
        for attention in attentions:
            unavailable = flash_unavailable(cuda, args.smoke) if attention == "flash_attention_2" else None
            for layout in LAYOUTS:
                name = f"{attention} {layout}"
                if unavailable:
                    doc["cases"][name] = {"skipped": unavailable}
                    print(f"{name:<26} {unavailable}", flush=True)
                    continue
                free(device)
                model = None
                try:
                    model = build_model(shape, vocab, tokenizer, attention, device)
                    doc["model"]["params"] = sum(p.numel() for p in model.parameters())
                    row = run_case(model, collate(steps, rows, dataset, layout, attention, pad_id), args.warmup,
                                   device)
                    row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
                    row["mfu"] = (round(6 * doc["model"]["params"] * row["real_tokens_per_s"] / flops, 4)
                                  if flops else None)
                    if layout == "packed":  # after the padded case, whose model this one's is rebuilt like
                        doc["correctness"][attention] = check = check_losses(
                            model, rows, picked, attention == "flash_attention_2", pad_id, device)
                        check["ok"] = check["max_abs_diff"] <= tolerance
                except torch.OutOfMemoryError as e:
                    row = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                except Exception as e:  # one case failing leaves the others to measure
                    row = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                finally:
                    del model
                doc["cases"][name] = row
                print(f"{name:<26} {row.get('error') or describe(row)}", flush=True)
                write(doc, args)
            if attention not in doc["correctness"]:
                doc["correctness"][attention] = {"skipped": unavailable or "the packed case did not run"}
        trained = {name: row["trained_tokens"] for name, row in doc["cases"].items() if "trained_tokens" in row}
        doc["same_trained_tokens"] = len(set(trained.values())) <= 1
        write(doc, args)
        print(markdown(doc))
        bad = [n for n, r in doc["correctness"].items() if r.get("ok") is False]
        if bad or not doc["same_trained_tokens"] or not doc["flattening"]["same"]:
            print(f"FAILED: losses off in {bad or 'none'}; same trained tokens: {doc['same_trained_tokens']}; "
                  f"collator as transformers': {doc['flattening']['same']}")
            return 1
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
