"""Typed configuration: frozen dataclasses loaded from a workspace's traind.toml.

Every key has a default, a type, a range and a one-line doc. The template that
`traind init` writes is generated from these same fields, so the file, the
defaults and the checks cannot drift apart. A bad key or value stops with a
message naming the file, the key, the value and what was expected; every
problem of the file is found before it stops, so one edit can fix them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

CONFIG_NAME = "traind.toml"


class ConfigError(Exception):
    """Raised with a message that names the file, the key, the value and what was expected: one line a problem
    (`problems`), every problem of the file at once."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))


def _key(default, doc, *, min=None, max=None, choices=None, size=False, min_open=False, max_open=False, pattern=None,
         shape=None, names=False, members=None, check=None):
    """names: a list of names (module names), or a string among `choices` (e.g. "all-linear"); `members`: the
    names such a list may hold; `check`: a function of the value that raises ValueError saying what is wrong
    with it, for what a pattern cannot say (a command template)."""
    return field(default=default, metadata=dict(doc=doc, min=min, max=max, choices=choices, size=size, min_open=min_open,
                                                max_open=max_open, pattern=pattern, shape=shape, names=names,
                                                members=members, check=check))


# transformers' OptimizerNames (the version in constraints.txt; tests/test_memory_knobs.py keeps this in step), so
# a misspelt training.optim is caught when traind.toml is read, by a daemon that never imports transformers.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)


def sharding_optimizer(name: str) -> bool:
    """Whether an optimizer (training.optim) steps FSDP2's sharded (DTensor) parameters: torch's own do;
    bitsandbytes' (8-bit, paged, *_bnb), the layer-wise ones and the low-rank projections (GaLore, APOLLO, LOMO)
    want each parameter whole."""
    whole = ("8bit", "4bit", "paged", "bnb", "layerwise", "galore", "apollo", "lomo", "xla", "npu", "anyprecision")
    return not any(part in name for part in whole)


# transformers' reporting integrations (integration_utils.INTEGRATION_TO_CALLBACK, the version in constraints.txt)
REPORT_TO = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "mlflow",
             "neptune", "swanlab", "tensorboard", "trackio", "wandb")


@dataclass(frozen=True)
class ModelConfig:
    source: str = _key("tiny", "The model a workspace starts from, read by 'traind init': 'tiny' (built offline), "
                       "a local Hugging Face model directory, or a hub id. Editing it later changes no model (a "
                       "warning says so).")


@dataclass(frozen=True)
class TrainingConfig:
    learning_rate: float = _key(5e-4, "Peak learning rate.", min=0.0, min_open=True)
    lr_scheduler: str = _key("constant_with_warmup", "Learning-rate shape within one file (transformers names), "
                             "times the warm-up: 'constant' (no warm-up at all), 'constant_with_warmup', 'linear' or "
                             "'cosine' (decay to 0 over the file), 'warmup_stable_decay' (the peak, then an anneal "
                             "over the file's last steps; see docs/continual.md).",
                             choices=("constant", "constant_with_warmup", "linear", "cosine", "warmup_stable_decay"))
    warmup_steps: int = _key(10, "Warm-up optimizer steps, counted once across the stream's files (recorded with "
                             "each model version), from 1/(warmup_steps+1) of the peak: no step trains at rate 0.",
                             min=0)
    warmup_per_file: bool = _key(False, "Warm up again at the start of every file (re-warming): more room for a file "
                                 "far from the earlier ones, at the cost of more forgetting (see docs/continual.md).")
    decay_fraction: float = _key(0.1, "warmup_stable_decay only: the share of each file's optimizer steps over which "
                                 "the learning rate anneals, at the end of the file.", min=0.0, min_open=True, max=1.0)
    min_lr_ratio: float = _key(0.0, "warmup_stable_decay only: the learning rate the anneal ends at, as a fraction of "
                               "the peak.", min=0.0, max=1.0, max_open=True)
    weight_decay: float = _key(0.0, "AdamW weight decay.", min=0.0)
    batch_size: int = _key(8, "Micro-batch size per device.", min=1)
    gradient_accumulation_steps: int = _key(1, "Micro-batches accumulated per optimizer step.", min=1)
    max_seq_length: int = _key(1024, "Tokens per training row: a longer example is cut, a longer text split into "
                               "pieces; with packing, the length of the rows examples are packed into.", min=8)
    packing: bool = _key(True, "Pack examples into rows of max_seq_length tokens (best-fit decreasing), each with its "
                         "own positions and no attention across them: no padding computed. Off: each example its own "
                         "row, batches padded to their longest.")
    packing_cross_document: bool = _key(False, "text only: join documents (with EOS) into blocks of max_seq_length "
                                        "tokens that attend across document boundaries, as in pretraining.")
    epochs_per_file: float = _key(1.0, "Passes over each file.", min=0.0, min_open=True)
    precision: str = _key("auto", "'auto' (bf16 where the GPU has it, else fp32), 'fp32', 'bf16' or 'fp16'.", choices=("auto", "fp32", "bf16", "fp16"))
    seed: int = _key(42, "Seed for initialisation, shuffling and dropout.", min=0)
    log_every_steps: int = _key(1, "Report loss, learning rate and speed every this many optimizer steps.", min=1)
    auto_batch: bool = _key(True, "After a CUDA out-of-memory error, retry with half the micro-batch and twice the accumulation (same effective batch).")
    dataloader_workers: int = _key(0, "Data-loading worker processes.", min=0)
    processes: int = _key(1, "Training processes on this machine, data parallel as under torchrun (one per GPU; "
                          "batch_size is per process).", min=1)
    gradient_checkpointing: bool = _key(False, "Recompute each layer's activations in the backward pass instead of "
                                        "keeping them: far less GPU memory for about a third more compute.")
    attn_implementation: str = _key("auto", "Attention kernel: 'auto' (flash_attention_2 where flash-attn is installed "
                                    "and training runs on a GPU in bf16 or fp16, else sdpa), 'sdpa', 'eager' or "
                                    "'flash_attention_2'.", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    optim: str = _key("adamw_torch", "Optimizer, by its transformers name: e.g. 'adamw_torch_fused' (faster on a GPU), "
                      "'adamw_8bit' or 'paged_adamw_8bit' (a quarter of AdamW's state; need bitsandbytes).",
                      choices=OPTIMIZERS, shape="a transformers optimizer name (OptimizerNames), such as 'adamw_torch', "
                      "'adamw_torch_fused', 'adamw_8bit' or 'paged_adamw_8bit'")
    max_grad_norm: float = _key(1.0, "Clip the gradient norm to this before each optimizer step (0: no clipping).", min=0.0)
    use_liger_kernel: bool = _key(False, "Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused cross-entropy) "
                                  "where the liger-kernel package is installed; without it the job goes on without them.")
    torch_compile: bool = _key(False, "Compile the model with torch.compile: faster steps after a slow first one.")
    report_to: tuple[str, ...] = _key((), "Experiment trackers the Trainer logs to, where installed, e.g. "
                                      "[\"tensorboard\"] (logs in runs/JOB/tensorboard/, one run a job: "
                                      "'tensorboard --logdir WS/runs' shows the stream), \"wandb\", \"mlflow\".",
                                      names=True, members=REPORT_TO)


ADAPTER_METHODS = ("full", "lora", "qlora")
QLORA_NEEDS_CUDA = "qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora here"


@dataclass(frozen=True)
class AdapterConfig:
    method: str = _key("full", "'full' trains every parameter; 'lora' trains a LoRA adapter on the frozen base; 'qlora' "
                       "the same on a base loaded in 4-bit (a CUDA GPU). Changing it mid-stream needs 'traind rebase'.",
                       choices=ADAPTER_METHODS)
    r: int = _key(16, "LoRA rank.", min=1)
    alpha: int = _key(32, "LoRA alpha (the update is scaled by alpha / r).", min=1)
    dropout: float = _key(0.05, "Dropout on the LoRA path while training.", min=0.0, max=1.0)
    target_modules: str | tuple[str, ...] = _key("all-linear", "Modules that get an adapter: 'all-linear', or a list of "
                                                 "module names such as [\"q_proj\", \"v_proj\"].",
                                                 choices=("all-linear",), names=True)
    modules_to_save: tuple[str, ...] = _key((), "Modules trained and saved whole beside the adapter (e.g. "
                                            "[\"lm_head\"] after adding tokens).", names=True)

    def chain(self) -> dict[str, Any]:
        """What an adapter chain is made with: a job continuing an adapter must use the same."""
        return {"method": self.method, "r": self.r, "alpha": self.alpha,
                "target_modules": self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
                "modules_to_save": list(self.modules_to_save)}


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = _key(200, "Save a checkpoint every this many optimizer steps...", min=1)
    every_minutes: float = _key(10.0, "...or after this many minutes, whichever comes first.", min=0.0, min_open=True)
    keep: int = _key(2, "Complete checkpoints kept per job (older ones are removed).", min=1)


@dataclass(frozen=True)
class JobsConfig:
    max_attempts: int = _key(3, "Failed attempts in a row without progress (no new checkpoint) before a file moves to "
                             "queue/failed/; interruptions (stop, shutdown, a kill after progress) never count.", min=1)
    max_oom_kills: int = _key(3, "Attempts in a row taken by the kernel's OOM killer without progress before a file "
                              "moves to queue/failed/ (counted apart from max_attempts).", min=1)
    stop_grace_seconds: float = _key(60.0, "On shutdown, time the worker has to checkpoint before its process group is killed.", min=0.0)
    warm_worker: bool = _key(True, "Keep a worker with torch already imported waiting while idle, so a new file starts in seconds.")
    fork_server: bool = _key(True, "Fork each worker from a process that imported torch and transformers once (ready in "
                             "about 0.1 s, not 6-9 s); false: every worker is a new python.")


@dataclass(frozen=True)
class GuardConfig:
    nonfinite: bool = _key(True, "Catch a NaN or infinite loss or gradient norm before the optimizer applies it, and roll back.")
    spikes: bool = _key(False, "Also treat a loss spike (above spike_factor times the recent median) as an anomaly.")
    spike_factor: float = _key(10.0, "A logged loss above this multiple of the median over spike_window is a spike.", min=1.0, min_open=True)
    spike_window: int = _key(50, "Logged losses in the median that spikes are measured against.", min=3)
    max_rollbacks: int = _key(3, "Rollbacks per file; one more anomaly and the file moves to queue/failed/.", min=0)


@dataclass(frozen=True)
class DiskConfig:
    reserve: int = _key(2**30, "Bytes that must stay free after any checkpoint or model write (or a string such as '1 GiB').", min=0, size=True)


@dataclass(frozen=True)
class GpuConfig:
    min_free_memory: int = _key(0, "GPU memory that must be free before a job starts, in bytes (or a string such as '8 GiB').", min=0, size=True)


@dataclass(frozen=True)
class SnapshotsConfig:
    daily_at: str = _key("03:00", "Local time of day for the daily snapshot of the current model; 'off' for none.",
                         pattern=r"off|([01][0-9]|2[0-3]):[0-5][0-9]", shape="a time of day 'HH:MM' (24-hour) or 'off'")
    interval_hours: float = _key(0.0, "Instead of daily_at: a snapshot every this many hours (0: use daily_at).", min=0.0)
    every_files: int = _key(0, "Also a snapshot after every this many trained files (0: off).", min=0)
    keep_daily: int = _key(7, "Scheduled snapshots kept: the newest of each of this many days...", min=0)
    keep_weekly: int = _key(4, "...and the newest of each of this many weeks. Manual and pre-rollback ones stay until removed.", min=0)
    include_optimizer: bool = _key(False, "Keep the final optimizer state with each model version, so snapshots carry it.")


@dataclass(frozen=True)
class ValidationConfig:
    max_file_size: int = _key(10 * 2**30, "Largest accepted file, in bytes (or a string such as '10 GiB').", min=1, size=True)
    max_line_size: int = _key(100 * 2**20, "Longest accepted line, in bytes (or a string such as '100 MiB').", min=1, size=True)
    max_json_depth: int = _key(64, "Deepest accepted JSON nesting.", min=1)
    max_errors_shown: int = _key(20, "Errors listed per file; the total is always counted.", min=1)


GATES = ("hold", "warn", "off")


@dataclass(frozen=True)
class EvalConfig:
    holdout_fraction: float = _key(0.02, "Share of each file's lines held out from training, chosen by a hash of the line "
                                   "and the seed, and kept as that file's source in the eval suite.", min=0.0, max=0.5)
    holdout_min: int = _key(8, "Held-out lines per file at least (never more than half the file)...", min=0)
    holdout_max: int = _key(500, "...and at most.", min=0)
    per_source_examples: int = _key(200, "Held-out lines of each earlier file (and of each file in eval/) that the suite "
                                    "measures.", min=1)
    max_suite_examples: int = _key(4000, "Lines in the whole suite at most: past it every source is measured on fewer.",
                                   min=1)
    every_steps: int = _key(0, "Also evaluate on the suite every this many optimizer steps (0: at the end of each file "
                            "only).", min=0)
    batch_size: int = _key(0, "Evaluation micro-batch (0: training.batch_size).", min=0)
    gate: str = _key("hold", "'hold': a model that forgets an earlier source, or does not improve on its own file, is "
                     "kept as a version but not made current (the file goes to queue/held/); 'warn': made current with an "
                     "alert; 'off': no check.", choices=GATES)
    max_forgetting: float = _key(0.05, "Largest accepted relative rise of the eval loss on any earlier source.", min=0.0)
    min_improvement: float = _key(0.0, "A file must lower the loss on its own held-out lines by more than this share.",
                                  min=0.0, max=1.0)


@dataclass(frozen=True)
class ReplayConfig:
    fraction: float = _key(0.05, "Share of each job's training examples drawn from earlier files' training examples "
                           "(the replay pool): a few percent keeps a weak shift from forgetting, a quarter a strong "
                           "one (docs/continual.md). 0: no replay.", min=0.0, max=0.9)
    max_pool_tokens: int = _key(50_000_000, "Tokens the replay pool (replay/) keeps in all: past it every earlier "
                                "file keeps a smaller sample.", min=0)
    per_source_cap: int = _key(0, "Tokens the pool keeps of any one file at most (0: an equal share of "
                               "max_pool_tokens).", min=0)


BAD_LINES = ("reject_file", "skip")


@dataclass(frozen=True)
class InboxConfig:
    settle_seconds: float = _key(2.0, "A file written in place is taken once its size and mtime have not changed for this long.", min=0.0)
    bad_lines: str = _key("reject_file", "A file with lines that are not valid examples (a truncated last line, a line "
                          "of another shape): 'reject_file' refuses the whole file; 'skip' trains on the rest, each "
                          "skipped line named with why (traind validate, traind add, the job record, the 'accepted' "
                          "event). Blank lines are never errors: they are passed over.", choices=BAD_LINES)
    max_bad_lines: int = _key(100, "With bad_lines = 'skip': a file with more bad lines than this is rejected all the "
                              "same.", min=0)

    def skip_up_to(self) -> int | None:
        """How many bad lines a file may have skipped (validate.py's `skip_up_to`); None: none, it is rejected."""
        return self.max_bad_lines if self.bad_lines == "skip" else None


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = _key("off", "Serve Prometheus metrics at http://LISTEN/metrics, LISTEN being 'HOST:PORT' (e.g. "
                       "'127.0.0.1:9464'; port 0: any free port; status.json's metrics_url says which), or 'off'.",
                       pattern=r"off|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}",
                       shape="'HOST:PORT' (such as '127.0.0.1:9464') or 'off'")


@dataclass(frozen=True)
class DistributedConfig:
    nodes: int = _key(1, "Machines each job runs on: this one (the head, where the daemon runs) and nodes - 1 "
                      "others, each running 'traind node' on this same workspace path (docs/distributed.md).", min=1)
    rdzv_endpoint: str = _key("off", "With nodes > 1: 'HOST:PORT' where the other machines reach this one's "
                              "rendezvous (PyTorch's c10d store), e.g. '10.0.0.1:29400'.",
                              pattern=r"off|(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}",
                              shape="'HOST:PORT' (such as '10.0.0.1:29400') or 'off'")
    join_timeout: float = _key(600.0, "Seconds every machine has to join a job's rendezvous before the attempt "
                               "fails.", min=0.0, min_open=True)
    sharding: str = _key("none", "'none': every rank holds the whole model, its gradients and optimizer state "
                         "(data parallel). 'fsdp': PyTorch FSDP2 shards them across the ranks, so a model bigger "
                         "than one GPU trains; checkpoints are sharded too (docs/distributed.md).",
                         choices=("none", "fsdp"))
    reshard_after_forward: bool = _key(True, "With sharding = 'fsdp': free each block's gathered parameters after its "
                                       "forward and gather them again for the backward (less memory, more traffic).")
    cpu_offload: bool = _key(False, "With sharding = 'fsdp': parameters, gradients and optimizer state on the host, "
                             "each block brought to the GPU for its compute: a model larger than the GPUs, slower.")
    wrap_modules: tuple[str, ...] = _key((), "With sharding = 'fsdp': the module classes sharded as one unit each "
                                         "(e.g. [\"LlamaDecoderLayer\"]); empty: the model's own blocks "
                                         "(its _no_split_modules, the decoder layers).", names=True)


@dataclass(frozen=True)
class SamplesConfig:
    enabled: bool = _key(True, "Answer the prompts file's prompts with every version (and the chain's starting model), "
                         "to read side by side with 'traind samples'; nothing is generated while there is no prompts "
                         "file.")
    prompts: str = _key("eval/prompts.jsonl", "The prompts file, in the workspace unless the path is absolute: one "
                        "prompt a line, {\"messages\": [... a user turn last]}, {\"prompt\": \"...\"} or "
                        "{\"text\": \"...\"}, each with an optional \"id\" (docs/samples.md).")
    max_new_tokens: int = _key(128, "Tokens each answer may have at most.", min=1)
    temperature: float = _key(0.0, "0: greedy; above 0, sampled with a seed made from the version, so a version's "
                              "answers repeat.", min=0.0)
    max_prompts: int = _key(32, "Prompts answered at most (the first ones of the file).", min=1)


HOOK_PLACEHOLDERS = ("kind", "level", "message", "job", "file", "step", "loss", "workspace")
WEBHOOK_FORMATS = ("json", "slack", "discord", "ntfy")


def split_hook_command(template: str) -> list[str]:
    """hooks.command split into its arguments (shlex: quotes group, nothing is a shell), each placeholder known;
    ValueError says what is wrong. Placeholders are filled per argument later (engine/ops/hooks.py)."""
    try:
        argv = shlex.split(template)
    except ValueError as e:  # "No closing quotation"
        raise ValueError(f"cannot be split into arguments ({e})") from None
    if not argv:
        raise ValueError("has no program to run")
    for arg in argv:
        for name in re.findall(r"\{([A-Za-z_]+)\}", arg):
            if name not in HOOK_PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {{{name}}}: {did_you_mean(name, HOOK_PLACEHOLDERS)}expected "
                                 + ", ".join(f"{{{p}}}" for p in HOOK_PLACEHOLDERS))
    return argv


def _hook_command(value: str) -> None:
    if value != "off":
        split_hook_command(value)


@dataclass(frozen=True)
class HooksConfig:
    on: tuple[str, ...] = _key((), "Event kinds that fire the hooks (those state/events.jsonl records, e.g. "
                               "[\"job_failed\", \"rollback\", \"blocked\"]), or \"alerts\" for every warning and "
                               "error. Empty: no hooks.", names=True)
    command: str = _key("off", "A program run for each such event, with its arguments, e.g. 'notify-send traind "
                        "{message}': split like a shell line but never run by a shell; {kind}, {level}, {message}, "
                        "{job}, {file}, {step}, {loss} and {workspace} are filled into each argument (docs/hooks.md). "
                        "'off': none.", check=_hook_command,
                        shape="a command line such as 'notify-send traind {message}', or 'off'")
    webhook: str = _key("off", "A URL each such event is POSTed to, or 'off'.", pattern=r"off|https?://[^\s/]+\S*",
                        shape="an http:// or https:// URL, or 'off'")
    webhook_format: str = _key("json", "The webhook's body: 'json' (the event as logged), 'slack' ({\"text\": ...}), "
                               "'discord' ({\"content\": ...}) or 'ntfy' (the message as plain text, with a title and "
                               "a priority).", choices=WEBHOOK_FORMATS)
    timeout_seconds: float = _key(10.0, "A hook still running after this long is killed (a command's whole process "
                                  "group); a webhook waits this long for the server.", min=0.0, min_open=True)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=dict(doc="The base model."))
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata=dict(doc="Training hyper-parameters, applied to every file."))
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata=dict(doc="What is trained: the whole model, or a LoRA adapter on a frozen base (peft)."))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=dict(doc="Checkpoints within a job: resume points after any interruption."))
    jobs: JobsConfig = field(default_factory=JobsConfig, metadata=dict(doc="The queue of jobs."))
    guard: GuardConfig = field(default_factory=GuardConfig, metadata=dict(doc="Anomalies: a non-finite loss or gradient, loss spikes."))
    disk: DiskConfig = field(default_factory=DiskConfig, metadata=dict(doc="Disk preflight: a write that will not fit is never started. Applies live when this file is saved."))
    gpu: GpuConfig = field(default_factory=GpuConfig, metadata=dict(doc="GPU preflight (ignored in CPU mode)."))
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig, metadata=dict(doc="Snapshots: immutable, hash-verified copies of the current model, and their retention."))
    validation: ValidationConfig = field(default_factory=ValidationConfig, metadata=dict(doc="Limits every input file is checked against before training."))
    inbox: InboxConfig = field(default_factory=InboxConfig, metadata=dict(doc="How files are taken from inbox/."))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=dict(doc="Held-out evaluation of every candidate model on every earlier file and on eval/, and the gate that keeps a worse one from becoming current."))
    replay: ReplayConfig = field(default_factory=ReplayConfig, metadata=dict(doc="Replay: earlier files' examples mixed into each job, so what the model learnt stays learnt."))
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata=dict(doc="The daemon's Prometheus endpoint (docs/metrics.md)."))
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata=dict(doc="Several machines: one job's ranks across this one and others on PyTorch's elastic launcher (docs/distributed.md)."))
    samples: SamplesConfig = field(default_factory=SamplesConfig, metadata=dict(doc="Sample answers: every version answers the same prompts, so what changed can be read (docs/samples.md)."))
    hooks: HooksConfig = field(default_factory=HooksConfig, metadata=dict(doc="Alert hooks: a command and/or a webhook run for chosen events, in the background (docs/hooks.md). Applies live when this file is saved."))

    def sharding_plan(self) -> dict[str, Any] | None:
        """What a job spec carries of [distributed]'s sharding (protocol.JobSpec.sharding); None: a replica a rank."""
        d = self.distributed
        if d.sharding == "none":
            return None
        return {"method": d.sharding, "reshard_after_forward": d.reshard_after_forward, "cpu_offload": d.cpu_offload,
                "wrap_modules": list(d.wrap_modules)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changes_from(self, old: "Config") -> dict[str, Any]:
        """This config's values where they differ from the old one's, by dotted key ("disk.reserve")."""
        before = old.to_dict()
        return {f"{section}.{key}": value for section, values in self.to_dict().items()
                for key, value in values.items() if before[section][key] != value}


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 1000**2, "mb": 1000**2, "mib": 2**20,
               "g": 1000**3, "gb": 1000**3, "gib": 2**30, "t": 1000**4, "tb": 1000**4, "tib": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(text)
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = {"TiB": 2**40, "GiB": 2**30, "MiB": 2**20, "KiB": 2**10}[unit]
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return str(n)


def _describe(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta.get("names"):
        names = "a non-empty list of names" if meta["choices"] else "a list of names"
        return " or ".join([*(repr(c) for c in meta["choices"] or ()), names])
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[_type(f)]
    if meta.get("size"):
        kind = "a size in bytes (an integer, or a string such as '100 MiB')"
    if meta.get("shape"):  # before choices: a long list of choices reads better summarised
        return meta["shape"]
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    parts = [kind]
    if meta.get("min") is not None:
        parts.append(f"{'>' if meta.get('min_open') else '>='} {meta['min']}")
    if meta.get("max") is not None:
        parts.append(f"{'<' if meta.get('max_open') else '<='} {meta['max']}")
    return " ".join(parts)


def _sections() -> list[tuple[dataclasses.Field, type]]:
    return [(f, f.default_factory) for f in dataclasses.fields(Config)]


def _fields(section_cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(section_cls)


def _type(f: dataclasses.Field) -> type:
    return type(f.default)


def _check_value(path: Path, dotted: str, f: dataclasses.Field, value: Any) -> Any:
    meta = f.metadata
    given = value

    def bad() -> ConfigError:
        return ConfigError(f"{path}: {dotted} = {given!r}: expected {_describe(f)}")

    if meta.get("names"):
        if isinstance(value, str) and value in (meta["choices"] or ()):
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad()
        if not value and meta["choices"]:  # no module at all: an adapter on nothing
            raise bad()
        for name in value:
            if meta.get("members") and name not in meta["members"]:
                raise ConfigError(f"{path}: {dotted} = {given!r}: unknown {name!r}: {did_you_mean(name, meta['members'])}"
                                  f"expected names among {', '.join(meta['members'])}")
        return tuple(value)
    if meta.get("size") and isinstance(value, str):
        try:
            value = parse_size(value)
        except ValueError:
            raise bad() from None
    t = _type(f)
    if t is bool:
        if not isinstance(value, bool):
            raise bad()
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif t is str:
        if not isinstance(value, str):
            raise bad()
        if not value.strip():
            raise ConfigError(f"{path}: {dotted} = {given!r} is empty: expected {_describe(f)}")
    if meta.get("choices") and value not in meta["choices"]:
        raise bad()
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        raise bad()
    if meta.get("check"):
        try:
            meta["check"](value)
        except ValueError as e:
            raise ConfigError(f"{path}: {dotted} = {given!r}: {e}") from None
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
        raise bad()
    if hi is not None and (value > hi or (meta.get("max_open") and value == hi)):
        raise bad()
    return value


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def _section(data: dict[str, Any], name: str, cls: type, path: Path, problems: list[str]) -> Any:
    """The section, its good keys taken and each bad one added to `problems` (its default stands in for it)."""
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        problems.append(f"{path}: {name} = {raw!r}: expected a [{name}] table")
        return cls()
    fields = {f.name: f for f in _fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{path}: unknown key '{name}.{key}': {did_you_mean(key, fields)}"
                            f"expected one of {', '.join(fields)}")
            continue
        try:
            values[key] = _check_value(path, f"{name}.{key}", fields[key], value)
        except ConfigError as e:
            problems.extend(e.problems)
    return cls(**values)


def from_dict(data: dict[str, Any], path: Path = Path(CONFIG_NAME), check_gpu: bool = False) -> Config:
    """The config `data` describes; ConfigError listing every problem. `check_gpu`: also refuse what this
    machine cannot run (qlora without a CUDA GPU)."""
    known = {f.name: cls for f, cls in _sections()}
    problems = [f"{path}: unknown section or key '{name}': {did_you_mean(name, known)}expected one of "
                f"{', '.join(known)}" for name in data if name not in known]
    config = Config(**{name: _section(data, name, cls, path, problems) for name, cls in known.items()})
    if config.distributed.nodes > 1 and config.distributed.rdzv_endpoint == "off":
        problems.append(f"{path}: distributed.nodes = {config.distributed.nodes} needs distributed.rdzv_endpoint: "
                        "the 'HOST:PORT' where the other machines reach this one")
    ranks = config.training.processes * config.distributed.nodes
    if config.distributed.sharding == "fsdp" and not sharding_optimizer(config.training.optim):
        problems.append(f"{path}: training.optim = {config.training.optim!r} cannot step sharded parameters "
                        "(distributed.sharding = 'fsdp'): bitsandbytes', the layer-wise and the low-rank optimizers "
                        "keep their state per whole tensor; use 'adamw_torch' or 'adamw_torch_fused'")
    if config.distributed.sharding == "fsdp" and ranks == 1 and not config.distributed.cpu_offload:
        problems.append(f"{path}: distributed.sharding = 'fsdp' on one rank in all (training.processes = 1, "
                        "distributed.nodes = 1) shards nothing: set training.processes to the GPUs to shard across, "
                        "or distributed.cpu_offload = true to keep the model's state on the host")
    if check_gpu and config.adapter.method == "qlora" and not cuda_gpu():
        problems.append(f"{path}: adapter.method = 'qlora': {QLORA_NEEDS_CUDA}")
    if problems:
        raise ConfigError(*problems)
    return config


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (is this a traind workspace? create one with 'traind init')") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_section(path: str | Path, name: str) -> Any:
    """One section of traind.toml, checked on its own: a command that needs only [validation] or [disk] works
    while a mistake elsewhere in the file (which a running daemon refuses and reports) waits to be fixed."""
    path = Path(path)
    cls = {f.name: cls for f, cls in _sections()}[name]
    problems: list[str] = []
    section = _section(_read(path), name, cls, path, problems)
    if problems:
        raise ConfigError(*problems)
    return section


def load(path: str | Path) -> Config:
    path = Path(path)
    return from_dict(_read(path), path, check_gpu=True)


def cuda_gpu() -> bool:
    """Whether NVML sees a usable NVIDIA GPU (never torch: the daemon reads this file too)."""
    from engine.core.gpu import GpuMonitor

    with GpuMonitor() as monitor:
        return monitor.mode == "gpu"


def _toml_value(f: dataclasses.Field, value: Any) -> str:
    if f.metadata.get("size"):
        return f'"{format_size(value)}"' if format_size(value) != str(value) else str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(f, v) for v in value) + "]"
    return repr(value)


def render_template(config: Config | None = None) -> str:
    """traind.toml text: every key present, documented, with its default beside it."""
    config = config or Config()
    lines = ["# traind workspace configuration. Every key is shown with its default.",
             "# A running daemon reloads this file when it is saved: disk.reserve applies at once,",
             "# everything else from the next attempt. An invalid edit is reported and ignored.", ""]
    for sf, cls in _sections():
        section = getattr(config, sf.name)
        lines.append(f"# {sf.metadata['doc']}")
        lines.append(f"[{sf.name}]")
        for f in _fields(cls):
            default = _toml_value(f, f.default)
            lines.append(f"# {f.metadata['doc']} Expected: {_describe(f)}. Default: {default}")
            lines.append(f"{f.name} = {_toml_value(f, getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)
