"""How much GPU memory a job will need, estimated before it starts, from the model's files alone.

The daemon's GPU preflight compares the estimate with the free memory NVML
reports (engine/supervisor/preflight.py); the worker reports the same estimate in its
`job_start` event and the measured peak (`torch.cuda.max_memory_allocated`)
in `job_end`, so the two can be compared on real runs.

The parameter count comes from config.json for Llama-style decoders (llama,
mistral, qwen2, qwen3: embeddings, attention with grouped key/value heads, a
gated MLP, RMSNorms), else from the tensor shapes in the safetensors headers,
else from the weight files' sizes. The bytes follow the usual accounting
(the ZeRO paper, Rajbhandari et al. 2020: fp32 weights, gradients and two
AdamW moments, 16 bytes a trained parameter), with activations as
Korthikanti et al. 2022 count them, per token and layer, here counted again
from the tensors transformers' Llama saves for backward (tests/test_memory.py
holds the estimate to within 10% of them); every constant is named below. It
is an estimate, meant to be right within a few tens of percent, not a
measurement.

With [distributed] sharding = "fsdp" (engine/worker/sharding.py: FSDP2's
`fully_shard` on each decoder layer, then on the whole model) the estimate is a
rank's: the weights, gradients and optimizer state divided by the ranks, plus
the parameters FSDP2 gathers whole for compute (`gathered`); with cpu_offload
the divided state is on the host instead (`host`).

This module reads config.json, adapter_config.json and safetensors headers
only: it never imports torch, transformers or safetensors, and never raises
for a model it cannot read (the answer is then None: nothing is checked).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.core.config import TrainingConfig
from engine.core.resources import format_bytes

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FOREACH_TEMPORARIES = {"adamw_torch": 4}  # bytes per trainable parameter: torch's foreach AdamW sqrt(v) buffer

MASTER_BYTES = 4  # trainable parameters are kept in fp32, and so are their gradients
QLORA_BYTES = 0.5 + 4 / 64  # NF4: 4 bits a weight, plus an fp32 absmax constant per block of 64
# Saved for backward by one decoder layer, bytes per token as (x hidden, x key/value width, x intermediate), by
# how the layer computes (counted with saved-tensor hooks on transformers' Llama, sdpa attention):
# "fp32": every tensor in 4 bytes; "16-bit": a bf16/fp16 model, RMSNorm keeping its fp32 upcast; "mixed": fp32
# weights under autocast: an fp32 residual stream and norms, 16-bit casts of each linear's input, 16-bit MLP.
ACTIVATION_BYTES = {"fp32": (36, 8, 16), "16-bit": (20, 4, 8), "mixed": (30, 4, 8)}
EAGER_SCORE_BYTES = {"fp32": 5, "16-bit": 7, "mixed": 7}  # eager attention also keeps heads x s x s softmax values
# The logits in the loss: the log-softmax kept for backward, then its gradient and the logits' (fp32), and the
# 16-bit logits and their gradient in mixed or 16-bit runs.
LOGIT_BYTES = {"fp32": 12, "16-bit": 14, "mixed": 14}
CUDA_OVERHEAD = 2**30  # the CUDA context, kernels and the allocator's slack: needed free, never counted as allocated


@dataclass(frozen=True)
class ModelShape:
    """The sizes an estimate needs; `parameters` is exact when it came from config.json or safetensors headers."""
    parameters: int
    embedding: int  # input embedding parameters (vocab x hidden); kept in 16-bit under QLoRA
    head: int  # output head parameters, 0 when tied to the embedding
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def linear_sizes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by peft's names: what "all-linear" adapts
        (the output head is left out)."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on each GPU (a rank's) at the peak of a training step, by part.

    The weights and the optimizer state stay all along; the rest comes and goes: the forward pass builds up the
    16-bit weight copies, the activations and the logits (with the gradients of earlier micro-batches when they
    are accumulated), the backward pass trades them for the gradients, and the optimizer step adds its
    temporaries to the gradients. `total` is the larger of the two peaks, what max_memory_allocated measures;
    a job needs `total + CUDA_OVERHEAD` free. Sharded, the first four parts are a rank's share, and the
    parameters gathered whole for compute come with the forward pass (and its backward).
    """
    weights: int  # the model as loaded, plus trainable adapter weights
    optimizer: int  # optimizer state of the trainable parameters
    weight_copies: int  # 16-bit copies autocast makes of fp32 weights (QLoRA: one layer dequantised)
    gathered: int  # sharded: parameters all-gathered whole for compute (the root unit and two layers)
    activations: int  # saved for backward across the layers (checkpointing: layer inputs plus one layer)
    logits: int  # batch x sequence x vocabulary, in the copies the loss makes
    gradients: int  # of the trainable parameters (twice with several processes: DDP's buckets)
    step_temporaries: int  # what the optimizer step allocates while it runs (torch's foreach AdamW: a sqrt per state)
    accumulating: bool  # gradient_accumulation_steps > 1: gradients are held through the next forward pass
    method: str
    parameters: int
    trainable: int
    precision: str
    batch_size: int
    seq_length: int
    sharding: str | None  # None: a replica on each rank; "fsdp"
    ranks: int  # the ranks the state is divided across (1 without sharding)
    cpu_offload: bool  # sharded weights, gradients and optimizer state on the host: not in the GPU parts
    host: int  # host bytes a rank pins for them with cpu_offload, else 0

    PARTS = ("weights", "optimizer", "weight_copies", "gathered", "activations", "logits", "gradients",
             "step_temporaries")

    @property
    def forward_peak(self) -> int:
        return (self.weight_copies + self.gathered + self.activations + self.logits
                + (self.gradients if self.accumulating else 0))

    @property
    def step_peak(self) -> int:
        return self.gradients + self.step_temporaries

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + max(self.forward_peak, self.step_peak)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, **asdict(self)}

    def describe(self) -> str:
        def listed(parts: tuple[str, ...], sep: str = ", ") -> str:
            return sep.join(f"{p.replace('_', ' ')} {format_bytes(getattr(self, p))}" for p in parts if getattr(self, p))

        forward = ("weight_copies", "gathered", "activations", "logits") + (("gradients",) if self.accumulating else ())
        phases = [f"the forward pass's {format_bytes(self.forward_peak)} ({listed(forward)})",
                  f"the optimizer step's {format_bytes(self.step_peak)} ({listed(('gradients', 'step_temporaries'))})"]
        if self.step_peak > self.forward_peak:
            phases.reverse()
        kept = listed(("weights", "optimizer"), " + ")
        peaks = f"the larger of {phases[0]} and {phases[1]}" if self.step_peak else phases[0]  # offloaded: no step here
        sharded = ""
        if self.sharding:
            sharded = f"; {self.sharding} on {self.ranks} rank{'s' if self.ranks != 1 else ''}"
            sharded += (f", cpu_offload: a rank's 1/{self.ranks} of the weights, gradients and optimizer state on the "
                        f"host, {format_bytes(self.host)}" if self.cpu_offload else
                        f" (weights, gradients and optimizer state: a rank's 1/{self.ranks})")
        return (f"about {format_bytes(self.total)}{' a rank' if self.sharding else ''}: "
                f"{kept + ' + ' if kept else ''}{peaks}; {self.method}, {_count(self.parameters)} parameters "
                f"({_count(self.trainable)} trained), {self.precision}, batch {self.batch_size} x {self.seq_length} "
                f"tokens{sharded}")


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# -- the model's shape ---------------------------------------------------------------------------------

_ALIASES = {"hidden_size": ("hidden_size", "n_embd", "d_model"), "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
            "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"), "num_attention_heads": ("num_attention_heads", "n_head")}


def _get(config: Mapping[str, Any], key: str) -> Any:
    for name in _ALIASES.get(key, (key,)):
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def shape_from_config(config: Mapping[str, Any], parameters: int | None = None) -> ModelShape | None:
    """The shape of a decoder from its config.json; the count is computed for Llama-style ones, else `parameters`
    (from the weights) must be given. None without a hidden size and a layer count."""
    config = config.get("text_config", config) if isinstance(config.get("text_config"), Mapping) else config
    h, layers = _get(config, "hidden_size"), _get(config, "num_hidden_layers")
    if h is None or layers is None:
        return None
    heads = _get(config, "num_attention_heads") or max(1, h // 128)
    kv_heads = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or h // heads
    i = _get(config, "intermediate_size") or 4 * h
    vocab = _get(config, "vocab_size") or 0
    tied = bool(config.get("tie_word_embeddings", False))
    embedding, head = vocab * h, 0 if tied else vocab * h
    if parameters is None:
        if config.get("model_type") not in LLAMA_STYLE:
            return None
        q, kv = heads * head_dim, kv_heads * head_dim
        attention = h * q + 2 * h * kv + q * h
        if config.get("attention_bias") or config.get("model_type") == "qwen2":
            attention += q + 2 * kv
        norms = 2 * h + (2 * head_dim if config.get("model_type") == "qwen3" else 0)
        parameters = embedding + head + h + layers * (attention + 3 * h * i + norms)
    return ModelShape(parameters=parameters, embedding=embedding, head=head, hidden=h, layers=layers,
                      intermediate=i, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab)


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100 * 2**20:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def parameters_from_weights(model_dir: Path, dtype_bytes: int = 4) -> int | None:
    """Parameters in the weight files: shapes from the safetensors headers, else file bytes / dtype_bytes."""
    try:
        files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    except OSError:
        return None
    if not files:
        return None
    total = 0
    for path in files:
        header = _safetensors_header(path) if path.suffix == ".safetensors" else None
        if header is None:
            try:
                total += path.stat().st_size // dtype_bytes
            except OSError:
                return None
            continue
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
                total += math.prod(int(d) for d in entry["shape"])
    return total


def model_dir(source: str) -> Path | None:
    """The directory holding the config.json of what `source` loads: a model directory, the base of an adapter
    directory (its adapter_config.json names it), or a hub id's snapshot in the local cache."""
    if not os.path.isabs(source):
        try:
            from huggingface_hub import try_to_load_from_cache  # light; only a hub id needs it
            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # not a repo id, or a cache it cannot read: no estimate
            return None
        return Path(cached).parent if isinstance(cached, str) else None
    path = Path(source)
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_bytes()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
        return model_dir(base) if isinstance(base, str) and base != source else None
    return path if (path / "config.json").is_file() else None


def shape_of(source: str) -> ModelShape | None:
    """The shape of the model `source` loads, or None when its files do not say."""
    directory = model_dir(source)
    if directory is None:
        return None
    try:
        config = json.loads((directory / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    shape = shape_from_config(config)
    if shape is not None:
        return shape
    dtype = DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 4)
    parameters = parameters_from_weights(directory, dtype)
    return shape_from_config(config, parameters) if parameters else None


# -- bytes ---------------------------------------------------------------------------------------------

def optimizer_bytes_per_parameter(optim: str) -> float:
    """State per trainable parameter: AdamW keeps two fp32 moments (8 bytes), its 8-bit versions two bytes."""
    if optim in ("sgd", "lomo", "adalomo") or optim.startswith(("adafactor", "galore_adafactor")):
        return 0.0  # no state (sgd without momentum), or factored moments: a row and a column per matrix
    moments = 3 if "ademamix" in optim else 1 if any(w in optim for w in ("lion", "rmsprop", "adagrad")) else 2
    width = 1 if "8bit" in optim else 0.5 if "4bit" in optim else 4
    return moments * width


def _lora_targets(shape: ModelShape, target_modules: Any) -> dict[str, tuple[int, int]]:
    sizes = shape.linear_sizes()
    if target_modules == "all-linear":
        return sizes
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules or ())
    return {name: sizes[name] for name in names if name in sizes}


def estimate(shape: ModelShape, *, method: str = "full", lora_r: int = 16, target_modules: Any = "all-linear",
             lora_dropout: float = 0.0, modules_to_save: Any = (), precision: str = "bf16", base_dtype: str | None = None,
             batch_size: int = 8, seq_length: int = 256, gradient_accumulation_steps: int = 1,
             gradient_checkpointing: bool = False, optim: str = "adamw_torch", attn_implementation: str = "sdpa",
             processes: int = 1, sharding: Mapping[str, Any] | None = None, ranks: int = 1) -> MemoryEstimate:
    """Peak bytes per GPU of one training step.

    method "full" trains every parameter from fp32 master weights (autocast for bf16/fp16); "lora" freezes the base
    in `base_dtype` (default: bf16 or fp16 as `precision`, else fp32) and trains r x (in + out) per target linear
    in fp32; "qlora" holds the base's decoder linears in 4 bits. `precision` is the resolved one (not "auto").
    `sharding` is the job's plan (Config.sharding_plan(): None, or {"method": "fsdp", "reshard_after_forward",
    "cpu_offload", ...}) and `ranks` the job's (training.processes x distributed.nodes): with fsdp the estimate
    is one rank's.
    """
    b, s = batch_size, seq_length
    mixed = precision in ("bf16", "fp16")
    adapters = method in ("lora", "qlora")
    plan = sharding or {}
    fsdp = plan.get("method") == "fsdp"
    ranks = max(1, ranks)
    saved: list[str] = []
    adapter_layer = 0  # trainable adapter parameters in one decoder layer
    if adapters:
        targets = _lora_targets(shape, target_modules)
        saved = [m for m in (modules_to_save or ()) if m in ("embed_tokens", "lm_head")]
        adapter_layer = sum(lora_r * (i + o) for i, o in targets.values())
        trainable = shape.layers * adapter_layer + len(saved) * shape.vocab * shape.hidden
        base_bytes = DTYPE_BYTES.get(base_dtype or precision, 4)
        if method == "qlora":
            # embeddings, head and norms stay unquantised, and prepare_model_for_kbit_training casts them to fp32
            kept = shape.embedding + shape.head + shape.layers * 2 * shape.hidden
            base = (shape.parameters - kept) * QLORA_BYTES + kept * 4
            largest = max(i * o for i, o in shape.linear_sizes().values())
            copies = largest * 2  # bitsandbytes dequantises one weight at a time for its matmul
            base_bytes = 2
        else:
            base = shape.parameters * base_bytes
            copies = shape.parameters * 2 if mixed and base_bytes == 4 else 0  # autocast's casts, kept for backward
        weights = int(base) + trainable * MASTER_BYTES
        regime = "fp32" if not mixed else "16-bit" if base_bytes == 2 else "mixed"
        compute_bytes = 2 if mixed else base_bytes
    else:
        targets = {}
        trainable = shape.parameters
        weights = shape.parameters * MASTER_BYTES
        copies = shape.parameters * 2 if mixed else 0  # autocast's cache of 16-bit weights, kept for backward
        regime = "mixed" if mixed else "fp32"
        compute_bytes = 2 if mixed else 4
    if fsdp and mixed:
        # FSDP2's MixedPrecisionPolicy gathers every parameter in the compute dtype and casts the inputs to it:
        # a 16-bit model, and autocast has no weight left to cast (QLoRA still dequantises its 4-bit ones)
        regime = "16-bit"
        copies = copies if method == "qlora" else 0
    # DDP keeps a bucket for each gradient besides it; FSDP2 reduce-scatters into each rank's shard instead
    gradients = trainable * MASTER_BYTES * (2 if (processes > 1 or ranks > 1) and not fsdp else 1)
    optimizer = trainable * optimizer_bytes_per_parameter(optim)
    step_temporaries = trainable * FOREACH_TEMPORARIES.get(optim, 0)

    gathered = host = 0
    if fsdp:
        # Every rank holds 1/ranks of each parameter (a frozen base's too), and of the gradients and optimizer
        # state, which exist for its trainable shards only.
        weights, gradients, optimizer, step_temporaries = (x / ranks for x in (weights, gradients, optimizer,
                                                                                step_temporaries))
        # FSDP2 all-gathers a unit's parameters whole for its compute. The root unit (embeddings, final norm, head)
        # stays gathered from the forward to the end of the backward: FSDP2 never reshards the root after the
        # forward, since the backward needs it at once. Of the decoder layers two are counted, the one computing
        # and the next, which FSDP2 prefetches (all-gathers while the current one computes) in the forward and
        # the backward alike. Without reshard_after_forward each layer stays gathered from its forward to its
        # backward: all of them at the end of the forward.
        root = shape.embedding + shape.head + shape.hidden + len(saved) * shape.vocab * shape.hidden
        layer = (shape.parameters - shape.embedding - shape.head - shape.hidden) / shape.layers
        layer_bytes = layer * (QLORA_BYTES if method == "qlora" else compute_bytes) + adapter_layer * compute_bytes
        held = min(2, shape.layers) if plan.get("reshard_after_forward", True) else shape.layers
        gathered = root * compute_bytes + held * layer_bytes
        if plan.get("cpu_offload"):  # the shards live in pinned host memory, and the optimizer steps there
            host = weights + gradients + optimizer + step_temporaries
            weights = gradients = optimizer = step_temporaries = 0

    per_hidden, per_kv, per_intermediate = ACTIVATION_BYTES[regime]
    layer_activations = b * s * (per_hidden * shape.hidden + per_kv * shape.kv_heads * shape.head_dim
                                 + per_intermediate * shape.intermediate)
    if attn_implementation == "eager":
        layer_activations += b * shape.heads * s * s * EAGER_SCORE_BYTES[regime]
    if adapters and lora_dropout > 0:  # each target keeps its dropped-out input (and a one-byte mask)
        layer_activations += b * s * sum(i for i, _ in targets.values()) * ((2 if mixed else 4) + 1)
    if gradient_checkpointing:  # each layer's input (the residual stream) is kept, one layer is recomputed at a time
        activations = shape.layers * b * s * shape.hidden * (2 if regime == "16-bit" else 4) + layer_activations
    else:
        activations = shape.layers * layer_activations
    logits = b * s * shape.vocab * LOGIT_BYTES[regime]
    return MemoryEstimate(weights=int(weights), optimizer=int(optimizer), weight_copies=int(copies),
                          gathered=int(gathered), activations=int(activations), logits=int(logits),
                          gradients=int(gradients), step_temporaries=int(step_temporaries),
                          accumulating=gradient_accumulation_steps > 1, method=method, parameters=shape.parameters,
                          trainable=int(trainable), precision=precision, batch_size=b, seq_length=s,
                          sharding="fsdp" if fsdp else None, ranks=ranks if fsdp else 1,
                          cpu_offload=fsdp and bool(plan.get("cpu_offload")), host=int(host))


def estimate_job(source: str, training: Mapping[str, Any], adapter: Mapping[str, Any] | None, precision: str,
                 batch_size: int | None = None, *, sharding: Mapping[str, Any] | None = None,
                 ranks: int | None = None) -> MemoryEstimate | None:
    """The estimate for a job on `source` with traind.toml's [training] (and [adapter], when there is one) as dicts;
    None when the model's files do not say its shape. `sharding` is the job spec's plan (Config.sharding_plan()),
    `ranks` the job's ranks (training.processes x distributed.nodes; by default training.processes)."""
    shape = shape_of(source)
    if shape is None:
        return None
    adapter = adapter or {}
    processes = training.get("processes", 1)
    return estimate(shape, method=adapter.get("method", "full"), lora_r=adapter.get("r", 16),
                    target_modules=adapter.get("target_modules", "all-linear"),
                    lora_dropout=adapter.get("dropout", 0.0), modules_to_save=adapter.get("modules_to_save", ()),
                    precision=precision, batch_size=batch_size or training.get("batch_size", 8),
                    seq_length=training.get("max_seq_length", TrainingConfig.max_seq_length),
                    gradient_accumulation_steps=training.get("gradient_accumulation_steps", 1),
                    gradient_checkpointing=training.get("gradient_checkpointing", False),
                    optim=training.get("optim", "adamw_torch"),
                    attn_implementation=training.get("attn_implementation", "auto"),
                    processes=processes, sharding=sharding, ranks=ranks or processes)
