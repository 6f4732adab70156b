"""One training job: spec -> tokenized cache -> HF Trainer -> complete checkpoints -> finished model.

The loop is the Trainer's own (resume, schedules, mixed precision, DDP); traind
adds callbacks (callbacks.py) and chooses the newest complete checkpoint to
resume from. On success the model and tokenizer are saved to `spec.model_out`,
fsynced, and `protocol.MODEL_MARKER` is written last.

This module never reads stdin or the events pipe directly, and never touches the
queue, `models/current.json` or anything outside the job's run directory and
`model_out`: publishing the model is the daemon's job.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from engine import atomic, checkpoints, protocol
from engine.config import CheckpointConfig, TrainingConfig
from engine.worker import callbacks as cb
from engine.worker import data
from engine.worker.control import StopControl
from engine.worker.events import EventSink


def log(message: str) -> None:
    print(f"traind-worker: {message}", flush=True)


def resolve_precision(name: str) -> str:
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def training_arguments(run_dir: Path, t: TrainingConfig, c: CheckpointConfig, precision: str) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoints.checkpoints_dir(run_dir)),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs_per_file,
        seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        logging_strategy="steps",
        logging_steps=t.log_every_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=c.every_steps,
        save_total_limit=None,  # we rotate, after the new checkpoint is marked complete
        eval_strategy="no",
        dataloader_num_workers=t.dataloader_workers,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,  # our collator needs loss_mask
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,  # the log is a file: one line a log step (PrinterCallback) reads better than bars
        log_level="info",
    )


def run_job(spec: protocol.JobSpec, events: EventSink, stop: StopControl) -> int:
    """Train one job; returns protocol.EXIT_DONE or EXIT_INTERRUPTED (exceptions mean failure)."""
    t = TrainingConfig(**spec.training)
    c = CheckpointConfig(**spec.checkpoint)
    hooks = cb.validate_test_hooks(spec.test_hooks)
    run_dir = Path(spec.run_dir)
    precision = resolve_precision(t.precision)
    transformers.utils.logging.disable_progress_bar()
    args = training_arguments(run_dir, t, c, precision)
    rank0 = args.process_index == 0

    if rank0:
        checkpoints.checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
        for path in checkpoints.remove_incomplete(run_dir):
            log(f"removed incomplete checkpoint {path.name}")

    tokenizer = AutoTokenizer.from_pretrained(spec.model_in)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with args.main_process_first(desc="tokenizing"):  # rank 0 builds the cache, the others then reuse it
        meta = data.build_cache(spec.data_file, spec.format, tokenizer, t.max_seq_length, run_dir / "data", log=log)
    dataset = data.TokenDataset(run_dir / "data")

    model = AutoModelForCausalLM.from_pretrained(spec.model_in, dtype=torch.float32)  # fp32 master weights
    resume = checkpoints.newest_complete(run_dir)
    log(f"resuming from {resume[1].name}" if resume else "starting fresh: no complete checkpoint")

    tracker = cb.LossTracker()
    if resume:  # the loss last logged before that checkpoint, until this attempt logs one
        marker = checkpoints.read_marker(resume[1]) or {}
        tracker.loss, tracker.step = marker.get("loss"), marker.get("loss_step", resume[0])
    step_control = cb.StepControlCallback(stop, c.every_minutes)
    callbacks = [
        cb.TestHooksCallback(hooks, run_dir),
        step_control,
        cb.CompletenessCallback(events, run_dir, c.keep, tracker),
        cb.EventsCallback(events, spec.job_id, len(dataset), meta["tokens"], tracker,
                          extra={"skipped": meta["skipped"], "precision": precision, "device": str(args.device)}),
    ]
    trainer = Trainer(model=model, args=args, data_collator=data.Collator(tokenizer.pad_token_id),
                      train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    state = trainer.state

    if state.global_step < state.max_steps:
        log(f"stopped at step {state.global_step} on {stop.signal_name or 'request'}; checkpoint saved")
        events.emit("job_end", outcome="interrupted", step=state.global_step, loss=tracker.loss)
        return protocol.EXIT_INTERRUPTED

    save_final_model(trainer, spec, tracker.loss)
    events.emit("job_end", outcome="done", step=state.global_step, loss=tracker.loss, model_out=spec.model_out)
    return protocol.EXIT_DONE


def save_final_model(trainer: Trainer, spec: protocol.JobSpec, loss: float | None) -> None:
    """Model + tokenizer into model_out, fsynced, MODEL_MARKER last (rank 0 writes; all ranks take part)."""
    out = Path(spec.model_out)
    rank0 = trainer.args.process_index == 0
    if rank0 and out.exists():  # a previous attempt died while saving: that copy was never marked
        shutil.rmtree(out)
    trainer.save_model(str(out))
    if not rank0:
        return
    files = checkpoints.fsync_tree(out)
    marker: dict[str, Any] = {"job_id": spec.job_id, "step": trainer.state.global_step, "loss": loss,
                              "time": time.time(), "files": files}
    atomic.write_json_atomic(out / protocol.MODEL_MARKER, marker)
    atomic.fsync_dir(out.parent)
    log(f"model saved to {out}")
