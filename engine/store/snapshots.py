"""Snapshots: immutable, hash-verified copies of the current model under `snapshots/NAME/`.

This is the store: names, listing, create, remove, pruning a model version, and
clearing what an interrupted operation left. A snapshot holds every file of the
current model version (weights, config, tokenizer, generation config, the
version's marker; optimizer state only when asked) and `manifest.json`, written
last: each file's size and hash (BLAKE3, or SHA-256 where blake3 is not
installed) and where the model came from. It is built in
`snapshots/.tmp-NAME-PID/`, fsynced, and renamed into place, so a folder without
a valid manifest is never listed. Files of a version under `models/` are
hard-linked; files that cannot be linked, and files of a model directory
outside the workspace (which its owner may still change in place), are
reflinked or copied (engine/store/placing.py). Checking a snapshot against its
manifest is engine/store/verification.py's; making one a model version again is
engine/store/restore.py's.

This module runs in the daemon: it must never import torch, transformers or
safetensors, and it never unpickles anything. blake3 is imported only when needed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from engine import __version__
from engine.core import atomic, crashpoints, hashing
from engine.store import bases, models, placing, statefiles
from engine.core.protocol import MODEL_MARKER
from engine.core.resources import format_bytes, pid_alive
from engine.store.workspace import Workspace

SCHEMA = 1
MANIFEST = "manifest.json"
VERIFY = "verify.json"
KINDS = ("scheduled", "manual", "pre-rollback")
NAME_PREFIX = {"scheduled": "daily", "manual": "manual", "pre-rollback": "pre-rollback"}
TEMP_PREFIX = ".tmp-"  # snapshots/.tmp-NAME-PID (being built) and .tmp-removing-NAME-PID (being deleted)
RESTORED_PREFIX = "restored-"
# A version's optimizer state (config `snapshots.include_optimizer`): the Trainer's names for it.
OPTIMIZER_PREFIXES = ("optimizer", "scheduler", "scaler", "rng_state")
PICKLE_SUFFIXES = hashing.PICKLE_SUFFIXES

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class SnapshotError(Exception):
    pass


@dataclass(frozen=True)
class Snapshot:
    """One listed snapshot, read from its folder (an immutable view: re-list to see changes)."""

    name: str
    kind: str
    created_at: float
    path: Path
    manifest: dict[str, Any]
    verification: dict[str, Any] | None  # the last verify.json; None: never verified (pending)
    size: int  # bytes of its files (the manifest's sizes)
    unique_bytes: int  # bytes only this snapshot holds: what removing it would free
    age: float  # seconds since created_at, at listing time

    @property
    def state(self) -> str:
        """"pending" (never verified), "ok", or "corrupt" (the last verification failed)."""
        if self.verification is None:
            return "pending"
        return "ok" if self.verification.get("ok") else "corrupt"

    @property
    def source(self) -> dict[str, Any]:
        return self.manifest.get("source") or {}

    def to_json(self) -> dict[str, Any]:
        """The stable `traind snapshots --json` entry."""
        v = self.verification or {}
        src = self.source
        return {
            "name": self.name, "kind": self.kind, "path": str(self.path), "created_at": self.created_at, "age_seconds": round(self.age, 3),
            "size": self.size, "unique_bytes": self.unique_bytes, "files": len(self.manifest["files"]),
            "hash_algorithm": self.manifest["hash_algorithm"],
            "source": {k: src.get(k) for k in ("model_version", "job_id", "file", "step", "loss", "restored_from",
                                                 "eval")},
            "verification": {"state": self.state, "checked_at": v.get("checked_at"), "seconds": v.get("seconds"),
                             "problems": v.get("problems", [])},
        }


# ---------------------------------------------------------------------------------------------
# Hashing


def hash_algorithm() -> str:
    """"blake3" where the blake3 package imports, else "sha256"."""
    return hashing.algorithm()


def hash_file(path: str | os.PathLike, algorithm: str) -> str:
    try:
        return hashing.hash_file(path, algorithm)
    except hashing.HashError as e:
        raise SnapshotError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Names, the source, listing


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise SnapshotError(f"{name!r}: a snapshot name is 1-128 of A-Z a-z 0-9 . _ - and does not start with a dot")
    return name


def default_name(ws: Workspace, kind: str, now: float, prefix: str | None = None) -> str:
    """`daily-2026-11-28T0300` (UTC, sortable); `-2`, `-3`... when that name is taken."""
    base = f"{prefix or NAME_PREFIX[kind]}-{time.strftime('%Y-%m-%dT%H%M', time.gmtime(now))}"
    name, n = base, 1
    while (ws.snapshots / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def current_version(ws: Workspace) -> str | None:
    """The current model's version name when it is a folder under models/, else None."""
    try:
        pointer = models.current(ws)
    except FileNotFoundError:
        return None
    if pointer.get("kind") != "local":
        return None
    path = Path(models.current_source(ws))
    if path.parent.resolve() != ws.models.resolve():
        return None
    return path.name


def _marker(model_dir: Path) -> dict[str, Any]:
    return statefiles.read_or_none(model_dir / MODEL_MARKER, statefiles.MODEL_MARKER) or {}


def current_source_snapshot(ws: Workspace) -> str | None:
    """The snapshot the current model was restored from, if it was."""
    version = current_version(ws)
    if version and (name := _marker(ws.models / version).get("restored_from")):
        return name
    try:
        return models.current(ws).get("restored_from")  # where the daemon recorded it in the pointer
    except (OSError, ValueError):
        return None


def _current_source(ws: Workspace, eval_summary: Callable[[Any], dict[str, Any] | None] | None
                    ) -> tuple[Path, dict[str, Any], bool]:
    """(model folder, provenance for the manifest, whether it is a traind-owned version under models/)."""
    try:
        pointer = models.current(ws)
    except FileNotFoundError:
        raise SnapshotError(f"{ws.current_model_pointer}: no current model to snapshot") from None
    if pointer.get("kind") == "hub":
        raise SnapshotError(f"the current model is the hub model {pointer.get('path')!r}: there are no local files "
                            "to snapshot (a snapshot is possible once a job has trained it)")
    path = Path(models.current_source(ws))
    if not path.is_dir():
        raise SnapshotError(f"{path}: the current model's folder is missing")
    owned = path.parent.resolve() == ws.models.resolve()
    marker = _marker(path)
    source = {
        "model_version": path.name if owned else pointer.get("version"),
        "path": pointer.get("path"),
        "job_id": marker.get("job_id", pointer.get("job_id")),
        "file": pointer.get("file"),
        "step": marker.get("step"),
        "loss": marker.get("loss", pointer.get("loss")),
        "switched_at": pointer.get("switched_at"),
    }
    if marker.get("restored_from"):
        source["restored_from"] = marker["restored_from"]
    if eval_summary is not None and (evaluated := eval_summary(marker.get("eval"))) is not None:
        source["eval"] = evaluated  # how good it was, for whoever restores it
    return path, source, owned


def _valid_manifest(manifest: Any, name: str) -> bool:
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or manifest.get("name") != name:
        return False
    if manifest.get("kind") not in KINDS or manifest.get("hash_algorithm") not in ("blake3", "sha256"):
        return False
    if not isinstance(manifest.get("created_at"), (int, float)):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all(isinstance(i, dict) and isinstance(i.get("size"), int) and isinstance(i.get("hash"), str)
               and _safe_rel(rel) for rel, i in files.items())


def _safe_rel(rel: Any) -> bool:
    """A manifest path that stays inside the snapshot and is not one of its own files."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and rel not in (MANIFEST, VERIFY)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    manifest = statefiles.read_or_none(folder / MANIFEST, statefiles.MANIFEST)
    return manifest if manifest is not None and _valid_manifest(manifest, folder.name) else None


def _read_verification(folder: Path) -> dict[str, Any] | None:
    return statefiles.read_or_none(folder / VERIFY, statefiles.VERIFICATION)


def _load(folder: Path, manifest: dict[str, Any], now: float) -> Snapshot:
    size = sum(i["size"] for i in manifest["files"].values())
    # Unique bytes: a file is this snapshot's alone when every link to its inode is inside this
    # snapshot. st_nlink counts links anywhere (versions, other snapshots, checkpoints), so this is
    # exactly what removing the snapshot frees, and needs no walk of anything else.
    inodes: dict[tuple[int, int], list] = {}
    for rel in manifest["files"]:
        try:
            st = os.lstat(folder / rel)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            entry = inodes.setdefault((st.st_dev, st.st_ino), [st.st_nlink, st.st_size, 0])
            entry[2] += 1
    unique = sum(file_size for nlink, file_size, here in inodes.values() if nlink <= here)
    created = float(manifest["created_at"])
    return Snapshot(name=folder.name, kind=manifest["kind"], created_at=created, path=folder, manifest=manifest,
                    verification=_read_verification(folder), size=size, unique_bytes=unique,
                    age=max(0.0, now - created))


def list_snapshots(ws: Workspace, now: float | None = None) -> list[Snapshot]:
    """Every snapshot with a valid manifest, oldest first. Temp folders and folders without a valid
    manifest (a create cut short, something a user put there) are never listed."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(ws.snapshots))
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        manifest = _read_manifest(Path(entry.path))
        if manifest is not None:
            out.append(_load(Path(entry.path), manifest, now))
    out.sort(key=lambda s: (s.created_at, s.name))
    return out


def get(ws: Workspace, name: str, now: float | None = None) -> Snapshot:
    check_name(name)
    folder = ws.snapshots / name
    if not folder.is_dir() or folder.is_symlink():
        raise SnapshotError(f"{name}: no such snapshot")
    manifest = _read_manifest(folder)
    if manifest is None:
        raise SnapshotError(f"{name}: not a snapshot (no valid {MANIFEST})")
    return _load(folder, manifest, time.time() if now is None else now)


def newest_verified(snapshots: list[Snapshot]) -> str | None:
    """The newest snapshot whose last verification passed: the last known-good copy of the model."""
    good = [s for s in snapshots if s.state == "ok"]
    return max(good, key=lambda s: (s.created_at, s.name)).name if good else None


def summary(ws: Workspace) -> dict[str, Any]:
    """The status document's `snapshots`: counts and names, from the store as it is now."""
    snaps = list_snapshots(ws)
    return {"count": len(snaps), "newest": snaps[-1].name if snaps else None,
            "newest_at": snaps[-1].created_at if snaps else None, "newest_verified": newest_verified(snaps),
            "corrupt": [s.name for s in snaps if s.state == "corrupt"],
            "pending": [s.name for s in snaps if s.state == "pending"],
            "current_from": current_source_snapshot(ws), "verifying": None}


def model_versions(ws: Workspace) -> list[str]:
    """Model version folders under models/ (not partial or temp ones), by name."""
    try:
        entries = list(os.scandir(ws.models))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))


def versions_in_snapshots(ws: Workspace) -> set[str]:
    """The model versions some snapshot was taken of."""
    return {s.source["model_version"] for s in list_snapshots(ws) if s.source.get("model_version")}


# ---------------------------------------------------------------------------------------------
# Create


def _model_files(src_dir: Path, include_optimizer: bool) -> list[tuple[str, Path, os.stat_result]]:
    """(relative path, real path, stat) of every regular file of a model folder. Hidden entries
    (dot-files: VCS and download caches, temp files) are left out; file symlinks are followed
    (a hub cache links its files to blobs), directory symlinks are not."""
    files = []
    for root, dirs, names in os.walk(src_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(root) / name
            rel = path.relative_to(src_dir).as_posix()
            if not include_optimizer and "/" not in rel and name.startswith(OPTIMIZER_PREFIXES):
                continue
            real = path.resolve()
            try:
                st = os.stat(real)
            except FileNotFoundError:
                continue  # a dangling link
            if not stat.S_ISREG(st.st_mode):
                continue
            if rel in (MANIFEST, VERIFY):
                raise SnapshotError(f"{src_dir}: holds a file named {rel}, which a snapshot needs for itself")
            files.append((rel, real, st))
    return files


def _known_hashes(ws: Workspace, algorithm: str, marker: dict[str, Any]) -> tuple[dict, dict]:
    """Hashes that need not be computed again: by inode (dev, ino, size, mtime) from existing
    snapshots, whose files are immutable links of the same inodes; and by path from the version's
    marker where the worker (or a restore) recorded them with the same algorithm."""
    by_inode: dict[tuple, str] = {}
    for snap in list_snapshots(ws):
        if snap.manifest["hash_algorithm"] != algorithm or snap.state == "corrupt":
            continue
        for rel, info in snap.manifest["files"].items():
            try:
                st = os.lstat(snap.path / rel)
            except OSError:
                continue
            if st.st_size == info["size"]:
                by_inode[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = info["hash"]
    by_path = {}
    if marker.get("hash_algorithm") == algorithm and isinstance(marker.get("hashes"), dict):
        by_path = {k: v for k, v in marker["hashes"].items() if isinstance(v, str)}
    return by_inode, by_path


def create(ws: Workspace, kind: str, name: str | None = None, now: float | None = None, *,
           reserve: int = 0, include_optimizer: bool = False, prefix: str | None = None,
           eval_summary: Callable[[Any], dict[str, Any] | None] | None = None) -> Snapshot:
    """Snapshot the current model as `snapshots/NAME/`; returns it (not yet verified).

    `reserve` is the free space (bytes) that must remain after any copying (config `disk.reserve`);
    `prefix` replaces the kind's default name prefix ("daily", "manual", "pre-rollback");
    `eval_summary` (engine/quality/gate.py's `summary`) puts how good the model was in its manifest.
    Raises SnapshotError for a hub model, a taken or unsafe name, or too little disk for copies;
    nothing is left behind on any error.
    """
    if kind not in KINDS:
        raise SnapshotError(f"{kind!r}: a snapshot kind is one of {', '.join(KINDS)}")
    now = time.time() if now is None else now
    t0 = time.perf_counter()
    src_dir, source, owned = _current_source(ws, eval_summary)
    ws.snapshots.mkdir(parents=True, exist_ok=True)
    name = check_name(name or default_name(ws, kind, now, prefix))
    final = ws.snapshots / name
    if final.exists() or final.is_symlink():
        raise SnapshotError(f"{name}: a snapshot of that name exists")
    files = _model_files(src_dir, include_optimizer)
    if not files:
        raise SnapshotError(f"{src_dir}: no files to snapshot")
    dev = os.stat(ws.snapshots).st_dev
    # Hard links only from traind's own versions: a folder outside the workspace belongs to someone
    # who may rewrite a file in place, which would change a linked snapshot with it.
    plan = [(rel, real, st, owned and st.st_dev == dev) for rel, real, st in files]
    algorithm = hash_algorithm()
    by_inode, by_path = _known_hashes(ws, algorithm, _marker(src_dir))

    tmp = ws.snapshots / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():
        placing.remove_tree(tmp)
    with atomic.writing(tmp):
        tmp.mkdir()
    try:
        placer = placing.Placer(tmp, reserve, sum(st.st_size for _, _, st, link in plan if not link), SnapshotError)
        entries, reused = {}, 0
        for rel, real, st, link in plan:
            dst = tmp / rel
            if placer.place(real, dst, st.st_size, link) == "reflinked":
                placing.fsync_file(dst)  # copies are fsynced as they are written; a link's data already was
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            digest = by_inode.get(key) or by_path.get(rel)
            if digest is None:
                digest = hash_file(real, algorithm)  # the source: what the model is
            else:
                reused += 1
            entries[rel] = {"size": st.st_size, "hash": digest}
        manifest = {
            "schema": SCHEMA, "name": name, "kind": kind, "created_at": now, "hash_algorithm": algorithm,
            "files": entries, "source": source, "traind_version": __version__,
            "placement": {**placer.counts, "hashes_reused": reused, "seconds": round(time.perf_counter() - t0, 4)},
        }
        if (adapter := bases.adapter_of(src_dir)) is not None:
            manifest["base"] = adapter["base"]  # an adapter is restorable only onto this exact base
        # Inside the unlisted temp folder the manifest needs no replace of its own: the folder's
        # rename below is the atomic step. One fsync of the folders then covers every new entry.
        with atomic.writing(tmp / MANIFEST), open(tmp / MANIFEST, "xb") as f:
            f.write((atomic.dumps(manifest, indent=2) + "\n").encode())
            os.fchmod(f.fileno(), placing.READ_ONLY)
            os.fsync(f.fileno())
        placing.fsync_tree(tmp)
        if final.exists():
            raise SnapshotError(f"{name}: a snapshot of that name appeared meanwhile")
        crashpoints.reached("snapshot")
        os.rename(tmp, final)
        atomic.fsync_dir(ws.snapshots)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return get(ws, name, now)


# ---------------------------------------------------------------------------------------------
# Remove, prune, clean up


_AUTO: Any = object()


def remove(ws: Workspace, name: str, current_source: str | None = _AUTO, newest_verified_name: str | None = _AUTO) -> Snapshot:
    """Delete a snapshot (`traind snapshot --remove NAME`). Refused, with the reason, for the snapshot
    the current model was restored from and for the newest verified snapshot (the last known-good
    copy); both are looked up in the workspace unless given. Returns what was removed."""
    snap = get(ws, name)
    if current_source is _AUTO:
        current_source = current_source_snapshot(ws)
    if newest_verified_name is _AUTO:
        newest_verified_name = newest_verified(list_snapshots(ws))
    if name == current_source:
        raise SnapshotError(f"{name}: the current model was restored from this snapshot; it is kept while "
                            "that model is current")
    if name == newest_verified_name:
        raise SnapshotError(f"{name}: the newest verified snapshot (the last known-good copy of the model) "
                            "is never removed")
    # Out of the listing in one rename, then deleted: a crash mid-delete leaves a temp folder.
    doomed = ws.snapshots / f"{TEMP_PREFIX}removing-{name}-{os.getpid()}"
    os.rename(snap.path, doomed)
    atomic.fsync_dir(ws.snapshots)
    placing.remove_tree(doomed)  # unlinking a hard link leaves the model version's file as it was
    return snap


def remove_version(ws: Workspace, version: str) -> None:
    """Delete a model version (retention's pruning); never the current one."""
    check_name(version)
    if version == current_version(ws):
        raise SnapshotError(f"{version}: the current model is never pruned")
    folder = ws.models / version
    if not folder.is_dir() or folder.is_symlink():
        raise SnapshotError(f"{version}: no such model version")
    doomed = ws.models / f"{TEMP_PREFIX}pruning-{version}-{os.getpid()}"
    os.rename(folder, doomed)
    atomic.fsync_dir(ws.models)
    placing.remove_tree(doomed)


def clean_temp(ws: Workspace) -> list[Path]:
    """Remove what an interrupted create, remove, prune or restore left: `snapshots/.tmp-*`,
    `models/.tmp-pruning-*` and `models/.partial-restored-*` of processes no longer alive. Call it
    from the daemon at start-up (it holds the workspace lock)."""
    removed = []
    candidates = []
    for folder, prefixes in ((ws.snapshots, (TEMP_PREFIX,)),
                             (ws.models, (f"{TEMP_PREFIX}pruning-", f"{models.PARTIAL_PREFIX}{RESTORED_PREFIX}"))):
        try:
            candidates += [Path(e.path) for e in os.scandir(folder)
                           if e.name.startswith(prefixes) and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            continue
    for path in candidates:
        pid = path.name.rsplit("-", 1)[-1]
        if path.name.startswith(TEMP_PREFIX) and pid.isdigit() and pid_alive(int(pid)):
            continue  # being built or deleted right now
        placing.remove_tree(path)
        removed.append(path)
    return removed


def format_table(snapshots: list[Snapshot]) -> str:
    """The human `traind snapshots` listing."""
    if not snapshots:
        return "no snapshots"
    rows = [("NAME", "KIND", "CREATED", "SIZE", "UNIQUE", "SOURCE", "STATE", "AGE")]
    for s in snapshots:
        src = s.source
        loss = src.get("loss")
        origin = " ".join(x for x in (src.get("job_id") or src.get("model_version") or "?",
                                      f"step {src['step']}" if src.get("step") is not None else "",
                                      f"loss {loss:.4g}" if isinstance(loss, (int, float)) else "",
                                      _eval_text(src.get("eval"))) if x)
        rows.append((s.name, s.kind, time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created_at)),
                     format_bytes(s.size), format_bytes(s.unique_bytes), origin, s.state, _age(s.age)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _eval_text(evaluated: dict[str, Any] | None) -> str:
    if not evaluated or evaluated.get("worst_change") is None:
        return ""
    return f"worst {evaluated['worst_change']:+.0%} on {evaluated['worst_source']}"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
