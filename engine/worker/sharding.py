"""FSDP2 across the job's ranks, and its sharded checkpoints: [distributed] sharding = "fsdp".

traind shards the model itself (`fully_shard` on each block, then on the
whole, as torchtitan does) and the Trainer trains the sharded model: the same
path on a CPU over gloo as on GPUs over NCCL (with gloo beside it for what
cpu_offload keeps on the host). The Trainer is told the model
owns its placement and gradient reduction (`mark_for_trainer`), so accelerate
never wraps it in DDP.

Checkpoints are torch.distributed.checkpoint (DCP) folders: each rank writes its
own shard of the model and optimizer state to `checkpoint-N/sharded/`, nothing
is gathered, and `.metadata` (written by rank 0 once every rank's shard is
written) says where each piece is. DCP reshards on load, so a checkpoint
written by N ranks resumes on M, and a replica (sharding = "none") can resume
from it too. An adapter's frozen base is not in a checkpoint: it is the base.

The finished model is gathered once, to rank 0's host memory, and saved as a
plain Hugging Face folder (`full_state_dict`).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from engine.core import crashpoints, hashing

SHARDED_DIR = "sharded"  # checkpoint-N/sharded/: one .distcp file a rank, and DCP's .metadata
METADATA = ".metadata"


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside an adapter (PeftModel), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def units(model: torch.nn.Module, wrap_modules: list[str]) -> list[torch.nn.Module]:
    """The blocks sharded one by one: modules of the named classes, by default the model's own `_no_split_modules`
    (the decoder layers). ValueError when none is found: sharding the whole model as one unit would gather all of
    it at once, which defeats the point."""
    names = set(wrap_modules or getattr(_unwrapped(model), "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise ValueError(f"distributed.wrap_modules: no module of the model is a {' or '.join(sorted(names)) or '?'}; "
                         f"its classes include {', '.join(sorted({type(m).__name__ for m in model.modules()})[:12])}")
    return found


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """Compute in the job's precision, reduce gradients in fp32. Under bf16 or fp16 the param_dtype also makes every
    parameter of a unit one dtype for its all-gather (an adapter's fp32 weights beside a bf16 or fp16 base)."""
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()


def init_process_group(timeout_seconds: int) -> None:
    """The job's process group, made before accelerate would make its own: on a GPU, NCCL for CUDA tensors and gloo
    beside it for host ones (with cpu_offload the gradient norm, its clipping and a gathered state dict reduce
    tensors on the host, which NCCL cannot). One rank in all (no launcher) gets a group of its own."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    timeout = timedelta(seconds=timeout_seconds)
    if "RANK" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)  # env://, from the launcher


def shard(model: torch.nn.Module, plan: dict[str, Any], precision: str) -> int:
    """fully_shard each unit, then the whole model (what is left: embeddings, final norm, head); returns the units."""
    options: dict[str, Any] = {"mp_policy": mixed_precision(precision)}
    if plan.get("cpu_offload"):
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    blocks = units(model, list(plan.get("wrap_modules") or ()))
    for block in reversed(blocks):  # modules() lists a parent before its children: a nested unit is sharded first
        fully_shard(block, reshard_after_forward=bool(plan.get("reshard_after_forward", True)), **options)
    fully_shard(model, **options)
    mark_for_trainer(model)
    return len(blocks)


@contextmanager
def shape_only(enabled: bool):
    """Models made inside take no memory (the meta device): a rank whose shards will come from rank 0. Loading an
    adapter into them says each weight was not copied; it is not yet, by design."""
    if not enabled:
        yield
        return
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        yield


def load_from_rank0(model: torch.nn.Module, whole: dict[str, torch.Tensor] | None, cpu_offload: bool) -> None:
    """Every rank's shards from rank 0's whole state dict (`whole`, taken before sharding; None on the others,
    whose model has only its shape), and the buffers not in a state dict (rotary frequencies). Collective."""
    if any(p.is_meta for p in model.parameters()):
        cuda = torch.cuda.is_available() and not cpu_offload
        model.to_empty(device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    set_model_state_dict(model, whole or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def mark_for_trainer(model: torch.nn.Module) -> None:
    """The Trainer's flag for a model that owns its placement and gradient reduction (transformers' own
    load-time sharding sets it): accelerate then neither moves it nor wraps it in DDP."""
    _unwrapped(model)._is_distributed_loading_by_transformers = True


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor); a plain tensor is all of itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Elements this rank holds (its shards, measured) and the model's whole."""
    params = list(model.parameters())
    return {"params_per_rank": sum(local(p).numel() for p in params), "params_total": sum(p.numel() for p in params)}


# --- checkpoints ------------------------------------------------------------------------------------


def is_sharded_checkpoint(checkpoint: str | os.PathLike) -> bool:
    return (Path(checkpoint) / SHARDED_DIR / METADATA).is_file()


def _options(**kw: Any) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=True, **kw)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


def _training_state(model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """What a checkpoint holds: the trained parameters and the optimizer's state. Frozen ones (an adapter's base)
    never change: they are the base's, not the checkpoint's (a tied head slips past ignore_frozen_params)."""
    model_state, optim_state = get_state_dict(model, _inner(optimizer), options=_options())
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    return {"model": {k: v for k, v in model_state.items() if k in trained}, "optimizer": optim_state}


def save_checkpoint(checkpoint: str | os.PathLike, model: torch.nn.Module, optimizer) -> None:
    """Every rank writes its shard of the model and optimizer state (fsynced), then rank 0 DCP's .metadata.
    Collective: every rank calls it."""
    writer = dcp.FileSystemWriter(Path(checkpoint) / SHARDED_DIR, sync_files=True)
    dcp.save(_training_state(model, optimizer), storage_writer=writer)
    crashpoints.reached("shard")


def own_shard_hashes(checkpoint: str | os.PathLike, rank0: bool, rank: int) -> dict[str, str]:
    """{relative path: hash} of the shard files this rank wrote to a sharded checkpoint (DCP names them
    __RANK_N.distcp), and rank 0's of .metadata; {} for a replica's checkpoint."""
    folder = Path(checkpoint) / SHARDED_DIR
    if not (folder / METADATA).is_file():
        return {}
    algo = hashing.algorithm()
    own = sorted(path.name for path in folder.glob(f"__{rank}_*.distcp")) + ([METADATA] if rank0 else [])
    return {f"{SHARDED_DIR}/{name}": hashing.hash_file(folder / name, algo) for name in own}


def load_checkpoint(checkpoint: str | os.PathLike, model: torch.nn.Module, optimizer) -> None:
    """Each rank reads what its shards need, whatever number of ranks wrote the checkpoint (DCP reshards).
    Collective. Works for a model with no sharding too: its tensors are then read whole."""
    state = _training_state(model, optimizer)
    dcp.load(state, storage_reader=dcp.FileSystemReader(Path(checkpoint) / SHARDED_DIR))
    set_state_dict(model, _inner(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options(strict=False))


def full_state_dict(model: torch.nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model (`trained_only`: its trained parameters, an adapter) gathered once to rank 0's host memory;
    the other ranks get {}. Collective.

    A tied weight (the head sharing the embeddings) is one parameter under two names; gathered, it would be two
    copies, and saved twice: only the name the model lists it under is kept, as save_pretrained does."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    state = get_model_state_dict(model, options=options)
    listed = {name for name, param in model.named_parameters() if param.requires_grad or not trained_only}
    if not trained_only:
        listed |= {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in listed}
