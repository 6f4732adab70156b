"""Can a model source be loaded? Cheap checks by looking at files, shared by init, the daemon and the worker.

A source is a local directory (an absolute path; see models.current_source) or
a hub id. An adapter directory (adapter_config.json: a LoRA version) must hold
its adapter weights and a tokenizer, and its base (`base_model_name_or_path`)
must pass as a model directory. A model directory must hold config.json (a JSON object), weights
(model.safetensors or pytorch_model.bin, or a sharded index with every shard it
names) whose safetensors headers parse and cover their files, and a tokenizer
(tokenizer.json or a vocabulary file). A hub id cannot be checked without the
network: `hub_cached` only says whether its config is in the local HF cache.

`traind init` refuses a directory that fails (and warns about an uncached hub
id); the worker checks before loading, so a missing or damaged model is
reported as "model unavailable" (EXIT_MODEL_UNAVAILABLE) rather than as a
failed attempt; while blocked on that, the daemon checks again before it
retries. This module reads file names and safetensors headers only: it never
imports torch, transformers or safetensors, and never reads tensor data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

UNAVAILABLE = "model unavailable"  # the prefix of every reason, in the worker's error and the daemon's status
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on its JSON header


def is_local(source: str) -> bool:
    """A directory (the daemon hands the worker absolute paths), not a hub id."""
    return os.path.isabs(source)


def looks_like_path(source: str) -> bool:
    """What a user typed is meant as a path, not a hub id ("org/name" or "name")."""
    return source.startswith((".", "/", "~")) or "//" in source or source.count("/") > 1


def _json_object(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        return None, f"{path.name} unreadable: {e}"
    return (doc, None) if isinstance(doc, dict) else (None, f"{path.name} is not a JSON object")


def dir_problems(path: Path) -> list[str]:
    """What loading this model directory would miss, one phrase each; empty when it looks loadable."""
    if not path.is_dir():
        return ["no such directory" if not path.exists() else "not a directory"]
    if (path / ADAPTER_CONFIG).exists():
        return adapter_problems(path)
    problems = []
    _, problem = _json_object(path / "config.json")
    if problem:
        problems.append(problem)
    problems += weight_problems(path)
    return problems + _tokenizer_problems(path)


def adapter_problems(path: Path) -> list[str]:
    """An adapter version: its config, its weights, a tokenizer, and a base that is itself loadable."""
    config, problem = _json_object(path / ADAPTER_CONFIG)
    problems = [problem] if problem else []
    weights = [path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()]
    if not weights:
        problems.append(f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    else:
        problems += _file_problems(weights[0])
    problems += _tokenizer_problems(path)
    base = (config or {}).get("base_model_name_or_path")
    if isinstance(base, str) and is_local(base):
        problems += [f"its base {base}: {p}" for p in dir_problems(Path(base))]
    return problems


def _tokenizer_problems(path: Path) -> list[str]:
    problems = []
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        problems.append("no tokenizer (tokenizer.json, or a vocabulary file such as vocab.json or tokenizer.model)")
    return problems


def weight_problems(path: Path) -> list[str]:
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            return _index_problems(path, index)
    for name in SINGLE_WEIGHTS:
        if (path / name).is_file():
            return _file_problems(path / name)
    return [f"no weights ({' or '.join(SINGLE_WEIGHTS)}, or a sharded {' or '.join(WEIGHT_INDEXES)})"]


def _index_problems(path: Path, index: str) -> list[str]:
    try:
        weight_map = json.loads((path / index).read_bytes())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        return [f"{index} unreadable: {type(e).__name__}: {e}"]
    problems = []
    for shard in shards:
        shard_path = path / shard
        if not shard_path.is_file():
            problems.append(f"{shard} missing (named in {index})")
        else:
            problems += _file_problems(shard_path)
    return problems


def _file_problems(weights: Path) -> list[str]:
    if weights.suffix != ".safetensors":
        return []  # a pickle: nothing cheap to check without loading it
    problem = safetensors_header_problem(weights)
    return [f"{weights.name}: {problem}"] if problem else []


def safetensors_header_problem(path: Path) -> str | None:
    """None when the header parses and its tensors cover the data exactly (a truncated file does not)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8 or n > _MAX_HEADER:
                return f"corrupt safetensors header (header length {n:,}, file {size:,} bytes)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    except ValueError as e:
        return f"corrupt safetensors header (not JSON: {e})"
    if not isinstance(header, dict):
        return "corrupt safetensors header (not a JSON object)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "corrupt safetensors header (malformed tensor entry)"
    if end != size - 8 - n:
        return f"truncated or corrupt: the header describes {end:,} bytes of data, the file holds {size - 8 - n:,}"
    return None


def dir_problem(path: Path) -> str | None:
    """One line naming the directory and everything it misses, or None."""
    problems = dir_problems(path)
    return f"{path}: {'; '.join(problems)}" if problems else None


def source_problem(source: str) -> str | None:
    """"model unavailable: ..." for a local directory that cannot be loaded; None for a loadable one or a
    hub id (only an attempt to download it can tell)."""
    if not is_local(source):
        return None
    problem = dir_problem(Path(source))
    return f"{UNAVAILABLE}: {problem}" if problem else None


def hub_cached(repo_id: str) -> bool:
    """Whether the hub id's config.json is in the local Hugging Face cache (no network, no torch)."""
    from huggingface_hub import try_to_load_from_cache  # light, but only `traind init` with a hub id needs it

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False
