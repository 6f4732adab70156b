"""Base models that adapters are trained on, and the adapter chain the current model belongs to.

An adapter version (models/JOB/ holding adapter_model.safetensors) is worth
nothing without the exact base it was trained on. So its marker pins the base
by path and content hash (`pin`), and that hash is computed once per base: the
record in `state/bases/KEY.json` (KEY from the base's absolute path) keeps each
file's size, mtime and hash, and is recomputed only when a file's size or mtime
changed. A base is never modified by traind; `problems` re-hashes it for
`traind verify`, so a flipped byte in a base that a snapshot pins is found.

A chain is what the adapters of one base were made with (method, rank, alpha,
target and saved modules). `chain_problem` refuses to go on when traind.toml's
`[adapter]` no longer matches the current model (a full fine-tune continued as
LoRA, a rank changed): that needs `traind rebase`, which starts a new base.

Only the daemon and CLI use this module: no torch, hashing through engine/core/hashing.py.
"""

from __future__ import annotations

import hashlib
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.core import hashing, model_check
from engine.store import models, statefiles
from engine.core.atomic import write_json_atomic
from engine.core.config import AdapterConfig
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import Workspace

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
REBASE_HINT = "put [adapter] back as it was, or run 'traind rebase' to start a new base from the current model"


def record_path(ws: Workspace, base: Path) -> Path:
    key = hashlib.sha256(str(base.absolute()).encode()).hexdigest()[:16]
    return ws.state / "bases" / f"{key}.json"


def model_files(base: Path) -> list[str]:
    """The files a base is loaded from: its top-level regular files (not dot files, not traind's marker)."""
    return sorted(e.name for e in os.scandir(base)
                  if e.is_file(follow_symlinks=True) and not e.name.startswith(".") and e.name != MODEL_MARKER)


def content_hash(hashes: dict[str, str]) -> str:
    """One hash for a whole directory: over each file's name and hash, in name order."""
    h = hashlib.sha256()
    for rel in sorted(hashes):
        h.update(f"{rel}\0{hashes[rel]}\n".encode())
    return h.hexdigest()


def _signature(base: Path, files: list[str]) -> dict[str, list[int]]:
    out = {}
    for rel in files:
        st = os.stat(base / rel)
        out[rel] = [st.st_size, st.st_mtime_ns]
    return out


def record(ws: Workspace, base: str | os.PathLike) -> dict[str, Any]:
    """The base's record: reused while its files' sizes and mtimes are unchanged, else computed (and written).

    The record covers the files the base had when first seen: a file added later (a README, more of a hub
    download) is not part of it. A version under models/ brings its own hashes in its marker, so a base made
    by traind is never re-hashed.
    """
    base = Path(base).absolute()
    path = record_path(ws, base)
    known = statefiles.read_or_none(path, statefiles.BASE_RECORD)
    if known and known["path"] == str(base):
        try:
            if known["signature"] == _signature(base, sorted(known["hashes"])):
                return known
        except OSError:
            pass  # a recorded file is gone: record what is there now
    files = model_files(base)
    signature = _signature(base, files)
    marker = statefiles.read_or_none(base / MODEL_MARKER, statefiles.MODEL_MARKER) or {}
    recorded = marker.get("hashes") if isinstance(marker.get("hashes"), dict) else {}
    if set(files) <= set(recorded) and marker.get("hash_algorithm"):
        algo, hashes = marker["hash_algorithm"], {rel: recorded[rel] for rel in files}
    else:
        algo = hashing.algorithm()
        hashes = hashing.hash_files(base, files, algo)
    doc = {"path": str(base), "content_hash": content_hash(hashes), "hash_algorithm": algo, "hashes": hashes,
           "signature": signature, "recorded_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, doc)
    return doc


def pin(doc: dict[str, Any]) -> dict[str, Any]:
    """What an adapter's marker and a snapshot's manifest keep of a base record."""
    return {"path": doc["path"], "content_hash": doc["content_hash"], "hash_algorithm": doc["hash_algorithm"],
            "files": sorted(doc["hashes"])}


_checked: dict[tuple, list[dict[str, str]]] = {}  # (path, content hash, files' sizes and mtimes) -> problems


def problems(ws: Workspace, pinned: dict[str, Any]) -> list[dict[str, str]]:
    """Re-hash a pinned base: [] when it is still the content it was pinned with, else verification problems
    ({"file": "base PATH", "problem": ...}, as engine/store/verification.py reports them)."""
    base = Path(pinned["path"])
    where = f"base {base}"
    if not base.is_dir():
        return [{"file": where, "problem": "missing"}]
    known = statefiles.read_or_none(record_path(ws, base), statefiles.BASE_RECORD) or {}
    files = pinned.get("files") or (sorted(known["hashes"]) if known.get("content_hash") == pinned["content_hash"]
                                    else model_files(base))
    try:
        key = (str(base), pinned["content_hash"], repr(_signature(base, files)))
    except OSError as e:
        return [{"file": where, "problem": f"{e.filename and Path(e.filename).name}: {e.strerror or e}"}]
    if key in _checked:  # unchanged since this process last hashed it: N snapshots of one base, one read
        return _checked[key]
    try:
        hashes = hashing.hash_files(base, files, pinned["hash_algorithm"])
    except (OSError, hashing.HashError) as e:
        return [{"file": where, "problem": f"unreadable ({e})"}]
    _checked[key] = found = _compare(where, hashes, pinned, known)
    return found


def _compare(where: str, hashes: dict[str, str], pinned: dict[str, Any], known: dict[str, Any]) -> list[dict]:
    if content_hash(hashes) == pinned["content_hash"]:
        return []
    if known.get("content_hash") == pinned["content_hash"]:
        changed = sorted(rel for rel in set(hashes) | set(known["hashes"])
                         if hashes.get(rel) != known["hashes"].get(rel))
        return [{"file": where, "problem": f"{rel} does not match the hash recorded when the adapter was trained"}
                for rel in changed]
    return [{"file": where, "problem": "its content no longer matches the hash the adapter was trained on"}]


def marker_of(model_dir: str | os.PathLike) -> dict[str, Any]:
    return statefiles.read_or_none(Path(model_dir) / MODEL_MARKER, statefiles.MODEL_MARKER) or {}


def adapter_of(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The adapter a version holds (method, rank, ..., the pinned base), or None for a whole model."""
    adapter = marker_of(model_dir).get("adapter")
    return adapter if isinstance(adapter, dict) else None


def chain_problem(current_dir: str | os.PathLike | None, config: AdapterConfig) -> str | None:
    """Why the next job cannot go on from the current model with this [adapter] config, or None."""
    if current_dir is None or not Path(current_dir).is_dir():
        return None  # a hub model: never trained here, so no chain yet
    marker = marker_of(current_dir)
    adapter = marker.get("adapter") if isinstance(marker.get("adapter"), dict) else None
    name = Path(current_dir).name
    if adapter is None:
        if config.method == "full" or not marker.get("job_id") or marker.get("rebased_from"):
            return None  # a base (never trained here, or made a base by rebase): any method may start on it
        return (f"adapter: adapter.method = {config.method!r} in traind.toml, but the current model {name} is a full "
                f"fine-tune: changing [adapter] mid-stream is refused; {REBASE_HINT}")
    wanted = config.chain()
    if config.method == "full":
        return (f"adapter: adapter.method = 'full' in traind.toml, but the current model {name} is a {adapter['method']} "
                f"adapter: changing [adapter] mid-stream is refused; {REBASE_HINT}")
    changed = [f"{key} {adapter.get(key)!r} -> {wanted[key]!r}" for key in wanted
               if _same(adapter.get(key)) != _same(wanted[key])]
    if changed:
        return (f"adapter: [adapter] in traind.toml differs from the current adapter {name} ({', '.join(changed)}): "
                f"changing [adapter] mid-stream is refused; {REBASE_HINT}")
    return None


def _same(value: Any) -> Any:
    """Module lists compare as sets: ["v_proj", "q_proj"] is the chain ["q_proj", "v_proj"] was made with."""
    return frozenset(value) if isinstance(value, list) else value


def trains(plan: dict[str, Any] | None, model_in: str) -> dict[str, Any]:
    """What a job's checkpoints belong to: the whole model, or an adapter of this shape on this base, trained
    on from `model_in` (the current model when the attempt starts: a promote or a rollback changes it)."""
    if plan is None:
        return {"method": "full", "model_in": model_in}
    return {k: plan[k] for k in ("method", "r", "alpha", "target_modules", "modules_to_save")} | \
        {"base": plan["base"]["content_hash"], "model_in": model_in}


def current_summary(ws: Workspace, pointer: dict[str, Any]) -> dict[str, Any] | None:
    """The current version's adapter for the status document (method, rank, alpha, base), None for a whole
    model; its marker is read once per switch, not at every status write."""
    if pointer.get("kind") != "local":
        return None
    return _summary(models.current_source(ws), pointer.get("switched_at"))


@lru_cache(maxsize=8)
def _summary(model_dir: str, switched_at: Any) -> dict[str, Any] | None:
    adapter = adapter_of(model_dir)
    return adapter and {k: adapter.get(k) for k in ("method", "r", "alpha", "base")}


def needed_versions(ws: Workspace, version_dirs: list[Path]) -> set[str]:
    """Versions under models/ that the given versions (or snapshots' copies of them) need as their base."""
    needed = set()
    models_dir = ws.models.resolve()
    for folder in version_dirs:
        manifest = statefiles.read_or_none(folder / "manifest.json", statefiles.MANIFEST) or {}
        pinned = manifest.get("base") or (adapter_of(folder) or {}).get("base")  # a snapshot's manifest, or a marker
        if isinstance(pinned, dict) and pinned.get("path"):
            base = Path(pinned["path"])
            if base.parent.resolve() == models_dir:
                needed.add(base.name)
    return needed


def _local_dir(ws: Workspace) -> Path | None:
    """The current model as a directory: a local one, or a hub id's copy in the Hugging Face cache."""
    pointer = models.current(ws)
    if pointer["kind"] == "local":
        return Path(models.current_source(ws))
    from huggingface_hub import try_to_load_from_cache  # light; a hub model as the current model needs it

    cached = try_to_load_from_cache(pointer["path"], "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def plan(ws: Workspace, config: AdapterConfig) -> tuple[dict[str, Any] | None, str | None]:
    """(the job spec's `adapter`, None for a full fine-tune; why the job cannot start, or None).

    Hashes a base the first time an adapter is trained on it (seconds for a 7B model): call it from a thread.
    """
    try:
        current_dir = _local_dir(ws)
    except (FileNotFoundError, statefiles.Damaged):
        return None, None  # no current model: recovery rebuilds the pointer before a job starts
    if config.method != "full" and current_dir is None:
        source = models.current(ws)["path"]
        return None, (f"adapter: adapter.method = {config.method!r} needs the base on disk: {source} is not in the local "
                      f"Hugging Face cache (download it, or init with its directory)")
    problem = chain_problem(current_dir, config)
    if problem or config.method == "full":
        return None, problem
    try:
        return _plan(ws, config, current_dir)
    except (OSError, hashing.HashError) as e:  # a base that cannot be read: wait, as for a model that cannot load
        return None, f"adapter: {model_check.UNAVAILABLE}: the base cannot be read: {e}"


def _plan(ws: Workspace, config: AdapterConfig, current_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    adapter = adapter_of(current_dir)
    if adapter is None:
        pinned, adapter_in = pin(record(ws, current_dir)), None
    else:
        pinned, adapter_in = adapter["base"], str(current_dir)
        base = Path(pinned["path"])
        if not base.is_dir():
            return None, f"adapter: the base {base} of the current adapter {current_dir.name} is missing"
        if record(ws, base)["content_hash"] != pinned["content_hash"]:
            return None, (f"adapter: the base {base} changed since the current adapter {current_dir.name} was trained on it "
                          "(its content hash differs): restore the base, or roll back to a snapshot")
    spec = {key: list(value) if isinstance(value, tuple) else value for key, value in vars(config).items()}
    return {**spec, "base": pinned, "adapter_in": adapter_in}, None
