"""LoRA and QLoRA with peft: the model an adapter job trains, and what its saved version records.

A job with `spec.adapter` loads the frozen base from `spec.adapter["base"]["path"]`
and either goes on training the current adapter (`adapter_in`, a version
directory: `PeftModel.from_pretrained(..., is_trainable=True)`) or, for the
chain's first job, creates one from the config (`get_peft_model`). The
Trainer then saves only the adapter (and its optimizer state) in checkpoints,
resumes them with `load_adapter`, and `save_model` writes `adapter_config.json`
and `adapter_model.safetensors` for the version.

The base's weights are loaded in the compute dtype on a GPU (bf16 or fp16:
frozen, so no fp32 master copy is needed) and in fp32 on a CPU; the adapter's
weights are fp32 either way (peft's autocast_adapter_dtype). QLoRA loads the
base in 4-bit NF4 with double quantisation and bf16 compute (bitsandbytes,
CUDA only: config load refuses it elsewhere).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from engine.core import atomic

ADAPTER_CONFIG = "adapter_config.json"
CHAIN_KEYS = ("method", "r", "alpha", "target_modules", "modules_to_save")


def base_dtype(precision: str) -> torch.dtype:
    if torch.cuda.is_available() and precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def lora_config(adapter: dict[str, Any]) -> LoraConfig:
    return LoraConfig(r=adapter["r"], lora_alpha=adapter["alpha"], lora_dropout=adapter["dropout"],
                      target_modules=adapter["target_modules"], modules_to_save=adapter["modules_to_save"] or None,
                      task_type="CAUSAL_LM")


def load_base(adapter: dict[str, Any], precision: str, sharded: bool = False, shape_only: bool = False,
              **kwargs: Any) -> torch.nn.Module:
    """The frozen base. `shape_only`: its shape alone, under sharding.shape_only (a rank that gets its shards from
    rank 0)."""
    path = adapter["base"]["path"]
    if shape_only:
        config = transformers.AutoConfig.from_pretrained(path)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=base_dtype(precision), **kwargs)
    if adapter["method"] == "qlora":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # FSDP shards the packed 4-bit weights as tensors of this dtype and gathers a unit's parameters in the
            # precision's dtype (sharding.mixed_precision): the same one, so the packed bytes are never converted
            # (the FSDP + QLoRA recipe)
            **({"bnb_4bit_quant_storage": torch.float16 if precision == "fp16" else torch.bfloat16} if sharded else {}))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization, dtype=torch.bfloat16,
            device_map={"": int(os.environ.get("LOCAL_RANK", "0"))}, **kwargs)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype(precision), **kwargs)


def with_adapter(base: torch.nn.Module, adapter: dict[str, Any], seed: int) -> PeftModel:
    """The base with the adapter to train: the current one (adapter_in), or a new one for the chain's first job."""
    if adapter.get("adapter_in"):
        config = LoraConfig.from_pretrained(adapter["adapter_in"])
        config.lora_dropout = adapter["dropout"]  # the one key that may change mid-chain: it is not in the weights
        model = PeftModel.from_pretrained(base, adapter["adapter_in"], is_trainable=True, config=config)
    else:
        transformers.set_seed(seed)  # the new adapter's initial weights are the same on every attempt
        model = get_peft_model(base, lora_config(adapter))
    for param in model.parameters():  # modules_to_save copies keep the base's dtype: train every one in fp32
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters())}


def trainable_bytes(model: torch.nn.Module) -> int:
    """What a checkpoint's weights and the version hold: the trained parameters only."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def version_record(out: Path, adapter: dict[str, Any]) -> dict[str, Any]:
    """The marker's "adapter" entry, after checking the saved adapter names its base by the pinned path."""
    config_path = out / ADAPTER_CONFIG
    saved = json.loads(config_path.read_text())
    if saved.get("base_model_name_or_path") != adapter["base"]["path"]:
        saved["base_model_name_or_path"] = adapter["base"]["path"]  # so peft alone finds the base
        atomic.write_bytes_atomic(config_path, (json.dumps(saved, indent=2, sort_keys=True) + "\n").encode())
    return {**{key: adapter[key] for key in CHAIN_KEYS}, "base": adapter["base"]}
