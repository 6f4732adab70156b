"""One training job: spec -> tokenized cache -> HF Trainer -> complete checkpoints -> finished model.

The loop is the Trainer's own (resume, schedules, mixed precision, DDP); traind
adds callbacks (callbacks.py), a few overrides (trainer.py: anomaly guard feeds,
disk gate, pause hold) and chooses the newest complete checkpoint to resume
from. After an anomaly (`spec.rollback = {"bad_step": K}`) it resumes instead
from a checkpoint-K derived from the newest complete one before K
(checkpoints.derive), so the batches of the steps since are skipped. On success
the model and tokenizer are saved to `spec.model_out`, fsynced, and
`protocol.MODEL_MARKER` is written last: only if every parameter is finite and
the write fits on disk.

A different micro-batch with the same effective batch (auto_batch after a CUDA
OOM: half `batch_size`, twice `gradient_accumulation_steps`) resumes at the same
data position: the Trainer skips global_step x accumulation micro-batches of the
new size, the same examples, and the optimizer steps per epoch,
ceil(ceil(N / b) / a), do not change when b is halved and a doubled.

This module never reads stdin or the events pipe directly, and never touches the
queue, `models/current.json` or anything outside the job's run directory and
`model_out`: publishing the model is the daemon's job.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback, Trainer, TrainerControl, TrainerState, TrainingArguments

from engine.core import atomic, hashing, model_check, protocol
from engine.ops import memory
from engine.store import checkpoints
from engine.core.config import CheckpointConfig, GuardConfig, TrainingConfig
from engine.worker import adapters, data, evaluation, lr_schedule, packing, replay, samples, sharding
from engine.core.resources import format_bytes
from engine.core.protocol import EVAL_HOLDOUT
from engine.worker import callbacks as cb
from engine.worker.callbacks import log_line as log
from engine.worker.control import Commands, Interrupted, StopControl
from engine.worker.disk import DiskGate, tokenizer_bytes
from engine.worker.errors import GpuUnavailable, ModelUnavailable
from engine.worker.events import EventSink
from engine.worker.guard import GuardCallback, NonFiniteGuard, SpikeDetector, check_before_save
from engine.worker.ranks import agree, distributed
from engine.worker.trainer import TraindTrainer

GPU_HINT = ("check `nvidia-smi` (driver loaded, GPU not in an error state, not held exclusively by another "
            "process) and CUDA_VISIBLE_DEVICES")


def resolve_precision(name: str) -> str:
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_attn_implementation(name: str, precision: str) -> str:
    """traind.toml's training.attn_implementation as from_pretrained takes it: "auto" is flash_attention_2 where
    flash-attn is installed and training runs on a GPU in 16-bit (its only dtypes), else sdpa."""
    if name == "auto":
        flash = installed("flash_attn") and torch.cuda.is_available() and precision in ("bf16", "fp16")
        return "flash_attention_2" if flash else "sdpa"
    if name == "flash_attention_2" and not installed("flash_attn"):
        raise ValueError("traind.toml: training.attn_implementation = 'flash_attention_2': the flash-attn package is "
                         "not installed (pip install flash-attn), or set it to 'auto' or 'sdpa'")
    return name


def use_liger_kernel(t: TrainingConfig) -> bool:
    if t.use_liger_kernel and not installed("liger_kernel"):
        log("training.use_liger_kernel is set but the liger-kernel package is not installed: going on without it")
        return False
    return t.use_liger_kernel


def trackers(t: TrainingConfig, run_dir: Path) -> list[str]:
    """training.report_to, less what is not installed (said in the log: the job goes on without it). TensorBoard
    writes to runs/JOB/tensorboard/, every attempt of a job into the same run."""
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    missing = [name for name in t.report_to if name not in available]
    if missing:
        log(f"training.report_to: {', '.join(missing)} not installed (pip install {' '.join(missing)}): "
            "going on without")
    chosen = [name for name in t.report_to if name in available]
    if "tensorboard" in chosen:  # TensorBoardCallback reads its folder from here only
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return chosen


def peak_memory(device: torch.device) -> int | None:
    """The most GPU memory this process's tensors held (torch.cuda.max_memory_allocated); None on a CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def memory_estimate(spec: protocol.JobSpec, t: TrainingConfig, precision: str, ranks: int) -> dict[str, Any] | None:
    """engine/ops/memory.py's estimate for this attempt (its own micro-batch, precision and sharding, per rank),
    reported in job_start so it can be set beside the peak job_end reports."""
    adapter = spec.adapter  # None: a full fine-tune
    estimate = memory.estimate_job(spec.model_in, dataclasses.asdict(t), adapter, precision, sharding=spec.sharding,
                                   ranks=ranks)
    if estimate is None:
        log(f"no GPU memory estimate: the shape of {spec.model_in} is not known from its files")
        return None
    log(f"GPU memory estimate: {estimate.describe()}")
    return estimate.to_dict()


def check_gpu(hooks: dict[str, Any]) -> None:
    """Allocate and synchronize on this rank's GPU; GpuUnavailable if it does not answer. Nothing to do on a CPU."""
    injected = hooks.get("gpu_check_error")
    if not injected and not (torch.cuda.is_available() or torch.cuda.device_count() > 0):
        return
    try:
        if injected:
            raise RuntimeError(injected)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        x = torch.ones(1024, device=device)
        (x * 2).sum().item()
        torch.cuda.synchronize(device)
    except Exception as e:
        raise GpuUnavailable(f"GPU unavailable: {type(e).__name__}: {e}. Hint: {GPU_HINT}") from e


def cap_gpu_memory(hooks: dict[str, Any]) -> None:
    """The gpu_memory_limit_bytes test hook: allocations past it raise CUDA's own out-of-memory error."""
    limit = hooks.get("gpu_memory_limit_bytes")
    if limit and torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(device).total_memory),
                                                   device)


def check_model(source: str) -> None:
    """Before anything is loaded: a local directory must hold what loading needs (engine/core/model_check.py)."""
    problem = model_check.source_problem(source)
    if problem is not None:
        raise ModelUnavailable(problem)


@contextmanager
def loading(source: str, what: str):
    """What from_pretrained raises when the files are not there (OSError: unreadable, or a hub id that cannot
    be fetched) or are damaged (SafetensorError) becomes ModelUnavailable; anything else stays a failure."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise ModelUnavailable(f"{model_check.UNAVAILABLE}: {source}: loading the {what} failed: "
                               f"{type(e).__name__}: {e}") from e


def training_arguments(run_dir: Path, t: TrainingConfig, c: CheckpointConfig, precision: str,
                       eval_batch_size: int = 0, adapter: bool = False,
                       report_to: list[str] | None = None, sharded: bool = False) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        # a model sharded outside the Trainer: its checkpoints are traind's own (TraindTrainer.save_model writes
        # the shards, _save_checkpoint the scheduler and RNG state)
        save_only_model=sharded,
        output_dir=str(checkpoints.checkpoints_dir(run_dir)),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=eval_batch_size or t.batch_size,
        # A PeftModel is no PreTrainedModel, so DDP would search for unused parameters every step; every LoRA one is used.
        ddp_find_unused_parameters=False if adapter else None,
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
        logging_nan_inf_filter=False,  # a NaN loss must show (the guard stops it before it is applied anyway)
        report_to=report_to or "none",
        run_name=run_dir.name,  # the job id: one run a job in TensorBoard, W&B, MLflow
        disable_tqdm=True,  # the log is a file: traind's line a log step (EventsCallback) reads better than bars
        log_level="warning",  # transformers' INFO is config dumps and save paths: traind says what matters itself
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing,  # transformers' new name for gradient checkpointing
        # non-reentrant: the one torch recommends, and it works with frozen inputs (adapters) and DDP
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        use_liger_kernel=use_liger_kernel(t),
        torch_compile=t.torch_compile,
    )
    if sharded:  # one device a process: a rank on its own would otherwise count every GPU of the machine as its own
        args._n_gpu = 1  # (as the Trainer itself does for a model placed across devices)
    return args


def run_job(spec: protocol.JobSpec, events: EventSink, stop: StopControl, commands: Commands | None = None) -> int:
    """Train one job; returns protocol.EXIT_DONE or EXIT_INTERRUPTED (exceptions mean failure or an anomaly)."""
    code = _run_job(spec, events, stop, commands or Commands(stop, spec.disk_reserve))
    if distributed():  # leave together: a rank torn down while gloo still talks to it can abort at exit
        torch.distributed.barrier()
    if torch.distributed.is_initialized():  # (one rank sharding with cpu_offload has a group of its own)
        torch.distributed.destroy_process_group()
    return code


def _run_job(spec: protocol.JobSpec, events: EventSink, stop: StopControl, commands: Commands) -> int:
    t = TrainingConfig(**spec.training)
    c = CheckpointConfig(**spec.checkpoint)
    g = GuardConfig(**spec.guard)
    hooks = cb.validate_test_hooks(spec.test_hooks)
    check_gpu(hooks)
    cap_gpu_memory(hooks)
    run_dir = Path(spec.run_dir)
    precision = resolve_precision(t.precision)
    attn_implementation = resolve_attn_implementation(t.attn_implementation, precision)
    transformers.utils.logging.disable_progress_bar()
    if spec.sharding:
        sharding.init_process_group(TrainingArguments.ddp_timeout)
    args = training_arguments(run_dir, t, c, precision, (spec.eval or {}).get("batch_size", 0), bool(spec.adapter),
                              trackers(t, run_dir), sharded=bool(spec.sharding))
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    rank0 = args.process_index == 0

    if rank0:
        checkpoints.checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
        for path in checkpoints.remove_incomplete(run_dir):
            log(f"removed incomplete checkpoint {path.name}")

    check_model(spec.model_in)
    with loading(spec.model_in, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(spec.model_in)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    def tokenizing(share: float) -> None:
        events.emit("tokenizing", share=round(share, 4))

    # Rank 0 (on the head) builds it, the other ranks then reuse it: the workspace is shared across machines, so
    # "first" is the job's rank 0, not each machine's.
    with args.main_process_first(local=False, desc="tokenizing"):
        meta = data.build_cache(spec.data_file, spec.format, tokenizer, t.max_seq_length, run_dir / "data", log=log,
                                holdout=(spec.eval or {}).get("holdout"), holdout_out=run_dir / EVAL_HOLDOUT,
                                cross_document=t.packing_cross_document, progress=tokenizing if rank0 else None,
                                skip_lines=spec.skip_lines)
    own_data = data.TokenDataset(run_dir / "data")
    fingerprint = data.tokenizer_fingerprint(tokenizer)
    if spec.replay and rank0:  # the job's contribution to the pool, from its training examples only
        replay.write_sample(own_data, run_dir / replay.SAMPLE, spec.replay.get("sample_tokens", 0), t.seed, spec.job_id,
                            fingerprint, t.max_seq_length, log)
    dataset, replayed = replay.mix(own_data, spec.replay, fingerprint, t.max_seq_length, spec.job_id, log)
    examples = len(dataset)
    collator = data.Collator(tokenizer.pad_token_id)
    if t.packing:  # rows of whole examples; the plan is stored with the cache, the same for every attempt
        with args.main_process_first(local=False, desc="packing"):
            dataset = packing.row_plan(dataset, run_dir / "data", t.max_seq_length, t.seed, log)
        collator = packing.PackedCollator(tokenizer.pad_token_id, flash=attn_implementation == "flash_attention_2")
    suite = None
    if spec.eval is not None:
        own = (spec.job_id, run_dir / EVAL_HOLDOUT, spec.format) if meta.get("held_out") else None
        with args.main_process_first(local=False, desc="eval suite"):  # every rank evaluates the same sources together
            suite = evaluation.Suite(spec.eval, own, tokenizer, t.max_seq_length, run_dir, log,
                                     hooks.get("eval_sleep_seconds", 0.0))
    stop.raise_if_requested()

    # Sharded on several ranks, rank 0 alone reads the weights; the others build the model's shape on the meta
    # device and get their shards from rank 0 once it is sharded: the host holds one copy, not one a rank. (A
    # 4-bit base is quantized as it is loaded: every rank loads it.)
    spread = bool(spec.sharding) and args.world_size > 1 and (spec.adapter or {}).get("method") != "qlora"
    with loading(spec.adapter["base"]["path"] if spec.adapter else spec.model_in, "model"), \
            sharding.shape_only(spread and not rank0):
        if spec.adapter:
            base = adapters.load_base(spec.adapter, precision, sharded=bool(spec.sharding),
                                      shape_only=spread and not rank0, attn_implementation=attn_implementation)
            model = adapters.with_adapter(base, spec.adapter, t.seed)
        elif spread and not rank0:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec.model_in), dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.model_in, dtype=torch.float32,  # fp32 master weights
                                                         attn_implementation=attn_implementation)
    counts = adapters.parameter_counts(model)
    log(f"training {counts['trainable_params']:,} of {counts['total_params']:,} parameters"
        + (f" ({spec.adapter['method']} adapter)" if spec.adapter else ""))
    gate = DiskGate(events, commands, stop, run_dir, adapters.trainable_bytes(model), tokenizer_bytes(spec.model_in),
                    rank0)
    stop.raise_if_requested()

    if spec.rollback:
        with args.main_process_first(local=False, desc="rollback"):  # rank 0 derives; the others then find it done
            roll_back(spec, args, model, tokenizer, gate)
    shards = None
    if spec.sharding:  # after a rollback's derive, which saves the starting model whole (on rank 0)
        whole = model.state_dict() if spread and rank0 else None
        units = sharding.shard(model, spec.sharding, precision)
        if spread:
            sharding.load_from_rank0(model, whole, bool(spec.sharding.get("cpu_offload")))
            del whole
            if not rank0:
                log(f"rank {args.process_index} read no weights: its shards came from rank 0")
        shards = {"method": spec.sharding["method"], "ranks": args.world_size, **sharding.parameter_counts(model)}
        log(f"sharded with FSDP2 across {args.world_size} ranks, {units} units: rank {args.process_index} holds "
            f"{shards['params_per_rank']:,} of {shards['params_total']:,} parameters"
            + (" (on the host: cpu_offload)" if spec.sharding.get("cpu_offload") else ""))
    # Rank 0 chooses (its hashes of every pickle, shards included, read once) and every rank resumes from its choice.
    resume = (checkpoints.newest_trusted(run_dir, log=log, accept=resumable(bool(spec.sharding), run_dir, log))
              if rank0 else None)
    (resume_step,) = agree(args.device, resume[0] if resume else -1)
    resume = (resume_step, checkpoints.checkpoint_path(run_dir, resume_step)) if resume_step >= 0 else None
    log(f"resuming from {resume[1].name}" if resume else "starting fresh: no complete checkpoint")

    tracker = cb.LossTracker()
    extra: dict[str, Any] = {"examples_skipped": meta["skipped"], "precision": precision, "device": str(args.device),
                             "method": spec.adapter["method"] if spec.adapter else "full", **counts,
                             "attn_implementation": attn_implementation, "replay": replayed,
                             "rows": len(dataset) if t.packing else None, "sharding": shards,
                             "memory_estimate": memory_estimate(spec, t, precision, args.world_size) if rank0 else None}
    if resume:  # the loss last logged before that checkpoint, until this attempt logs one
        marker = checkpoints.read_marker(resume[1]) or {}
        tracker.loss, tracker.step = marker.get("loss"), marker.get("loss_step", resume[0])
        if "derived_from" in marker:
            extra.update(rolled_back_from=marker["derived_from"], skipped=marker["skipped"])
    step_control = cb.StepControlCallback(stop, commands, c.every_minutes)
    nonfinite = NonFiniteGuard(check_grad_norm=precision != "fp16") if g.nonfinite else None
    spikes = SpikeDetector(g.spike_factor, g.spike_window) if g.spikes else None
    callbacks = [
        cb.TestHooksCallback(hooks, run_dir),
        GuardCallback(nonfinite, spikes),
        step_control,
        cb.CompletenessCallback(events, run_dir, c.keep, tracker, gate),
        cb.EventsCallback(events, spec.job_id, examples, meta["tokens"] + (replayed or {}).get("tokens", 0),
                          tracker, extra=extra),
    ]
    trainer = TraindTrainer(model=model, args=args, data_collator=collator,
                            train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks,
                            guard=nonfinite, gate=gate, step_control=step_control, events=events,
                            commands=commands, stop=stop, hooks=hooks, suite=suite,
                            eval_every=(spec.eval or {}).get("every_steps", 0),
                            schedule=lr_schedule.Schedule.of(t, spec.chain_steps), sharded=bool(spec.sharding))
    trainer.remove_callback(PrinterCallback)  # its log dicts: EventsCallback writes traind's own step lines
    trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    state = trainer.state

    peak = peak_memory(args.device)
    peaks = per_rank(peak)
    if peak is not None:
        log(f"peak GPU memory {format_bytes(peak)} (estimated {format_bytes(extra['memory_estimate']['total'])})"
            if extra["memory_estimate"] else f"peak GPU memory {format_bytes(peak)}")
    if state.global_step < state.max_steps:
        saved = "no checkpoint (the disk was full)" if gate.skipped else "checkpoint saved"
        log(f"stopped at step {state.global_step} on {stop.signal_name or 'request'}; {saved}")
        events.emit("job_end", outcome="interrupted", step=state.global_step, loss=tracker.loss, peak_memory=peak,
                    peak_memory_per_rank=peaks)
        return protocol.EXIT_INTERRUPTED

    evaluated = None
    if suite is not None:  # before the save: a saved candidate always carries its evaluation
        evaluated = evaluation.result(suite, trainer.before, suite.after(trainer, events, rank0), state.global_step)
        if rank0:
            evaluation.write_result(run_dir, evaluated)
    # after the evaluation, before the save: the version is written with its answers
    answers = samples.answer_all(trainer.model, tokenizer, spec, args.device, events, rank0, hooks) \
        if spec.samples else None
    if not save_final_model(trainer, spec, tracker.loss, gate, evaluated, answers):
        events.emit("job_end", outcome="interrupted", step=state.global_step, loss=tracker.loss, peak_memory=peak,
                    peak_memory_per_rank=peaks)
        return protocol.EXIT_INTERRUPTED
    events.emit("job_end", outcome="done", step=state.global_step, loss=tracker.loss, model_out=spec.model_out,
                peak_memory=peak, peak_memory_per_rank=peaks,
                samples={"prompts": len(spec.samples["prompts"]), "seconds": round(answers.seconds, 3)} if answers else None)
    return protocol.EXIT_DONE


def resumable(sharded: bool, run_dir: Path, say=lambda message: None):
    """Which complete checkpoints this attempt can resume from (or roll back to). A sharded one, on any number of
    ranks, sharded or not (DCP reshards on load). A replica's (the Trainer's own files) only without sharding,
    unless it holds no optimizer state: a rollback's checkpoint derived from the starting model, which is what
    was loaded."""
    def accept(marker: dict[str, Any]) -> bool:
        path = checkpoints.checkpoint_path(run_dir, marker.get("step", -1))
        if not sharded or sharding.is_sharded_checkpoint(path):
            return True
        if any(rel.startswith("optimizer.") for rel in marker.get("files", {})):
            say(f"not resuming from {path.name}: it holds a replica's optimizer state, and training is sharded now")
            return False
        return True
    return accept


def per_rank(value: int | None) -> list[int | None]:
    """Every rank's value, in rank order (collective); [value] outside torchrun."""
    if not distributed():
        return [value]
    values: list[int | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def roll_back(spec: protocol.JobSpec, args: TrainingArguments, model, tokenizer, gate: DiskGate) -> None:
    """Make checkpoint-K (K = spec.rollback["bad_step"]) the resume point, from the newest complete one before K."""
    bad = int(spec.rollback["bad_step"])
    run_dir = Path(spec.run_dir)
    newest = checkpoints.newest_complete(run_dir)
    if newest and newest[0] >= bad:  # derived by an earlier attempt (or by rank 0 just now): resume from it
        log(f"rollback past step {bad}: already done, resuming from {newest[1].name}")
        return
    base = checkpoints.rollback_base(run_dir, bad, log, resumable(bool(spec.sharding), run_dir))
    base_step = base[0] if base else 0
    if base_step == 0:  # no checkpoint before the anomaly: the starting model is the base
        def populate(target: Path) -> None:
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)

        if not gate.wait_for_room(args.device, checkpoints.checkpoints_dir(run_dir), gate.model_bytes(),
                                  f"checkpoint-{bad}", collective=False):
            raise Interrupted("stop while blocked before the rollback")
        state = TrainerState(train_batch_size=args.per_device_train_batch_size * max(1, args.n_gpu),
                             logging_steps=args.logging_steps, save_steps=args.save_steps,
                             eval_steps=args.eval_steps or args.logging_steps,
                             stateful_callbacks=[TrainerControl()])  # what the Trainer's own state holds
        path = checkpoints.derive(run_dir, 0, bad, populate=populate, trainer_state=dataclasses.asdict(state))
    else:
        path = checkpoints.derive(run_dir, base_step, bad)
    log(f"rolled back: {path.name} derived from "
        f"{'the starting model' if base_step == 0 else f'checkpoint-{base_step}'}; steps {base_step + 1}..{bad} skipped")


def save_final_model(trainer: Trainer, spec: protocol.JobSpec, loss: float | None, gate: DiskGate,
                     evaluated: dict[str, Any] | None = None, answers: samples.Answers | None = None) -> bool:
    """Model + tokenizer (+ the answers to the prompts, samples.jsonl) into model_out, fsynced, MODEL_MARKER last
    (rank 0 writes; all ranks take part).

    False, with nothing written, when a stop came while the disk had no room for it.
    """
    out = Path(spec.model_out)
    rank0 = trainer.args.process_index == 0
    step = trainer.state.global_step
    check_before_save(trainer.model, None, step, "the final model")
    if not gate.wait_for_room(trainer.args.device, out.parent, gate.model_bytes(), "the final model"):
        return False
    if rank0 and out.exists():  # a previous attempt died while saving: that copy was never marked
        shutil.rmtree(out)
    trainer.save_model(str(out))
    if not rank0:
        return True
    if answers is not None:
        samples.write(out, answers, spec.job_id, spec.samples)
    adapter = adapters.version_record(out, spec.adapter) if spec.adapter else None
    files = checkpoints.fsync_tree(out)
    algo = hashing.algorithm()  # recorded so the first snapshot of this version need not hash it again
    marker: dict[str, Any] = {"job_id": spec.job_id, "step": step, "chain_steps": spec.chain_steps + step,
                              "loss": loss, "time": time.time(), "files": files,
                              "hash_algorithm": algo, "hashes": hashing.hash_files(out, list(files), algo)}
    if adapter:
        marker["adapter"] = adapter
    if evaluated is not None:
        marker["eval"] = evaluated
    atomic.write_json_atomic(out / protocol.MODEL_MARKER, marker)
    atomic.fsync_dir(out.parent)
    log(f"model saved to {out}")
    return True
