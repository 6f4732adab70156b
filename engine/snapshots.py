"""Snapshots: immutable, hash-verified copies of the current model under `snapshots/NAME/`.

A snapshot holds every file of the current model version (weights, config,
tokenizer, generation config, the version's marker; optimizer state only when
asked) and `manifest.json`, written last: each file's size and hash (BLAKE3,
or SHA-256 where blake3 is not installed) and where the model came from. It is
built in `snapshots/.tmp-NAME-PID/`, fsynced, and renamed into place, so a
folder without a valid manifest is never listed. Files of a version under
`models/` are hard-linked (they cost no time and no space); files that cannot
be linked, and files of a model directory outside the workspace (which its
owner may still change in place), are reflinked where the filesystem can, else
copied after a free-space check. Snapshot files are made read-only (0444); a
hard link shares its inode, so the version's file becomes read-only too, which
is right: versions are immutable as well.

`verify` re-hashes every file, parses the JSON files and the safetensors
headers, and checks that every floating-point tensor is finite, reading the
tensors itself with numpy over an mmap. Its result goes to `verify.json` beside
the manifest (the only file of a snapshot ever rewritten). A snapshot whose
last verification failed is corrupt and is never restored.

This module runs in the daemon: it must never import torch, transformers or
safetensors (whose loaders are what we refuse to trust), and it never
unpickles anything. numpy and blake3 are imported only when needed.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import __version__, atomic, crashpoints, hashing, models, statefiles
from engine.protocol import MODEL_MARKER
from engine.resources import disk_usage, format_bytes
from engine.workspace import Workspace

SCHEMA = 1
MANIFEST = "manifest.json"
VERIFY = "verify.json"
KINDS = ("scheduled", "manual", "pre-rollback")
NAME_PREFIX = {"scheduled": "daily", "manual": "manual", "pre-rollback": "pre-rollback"}
TEMP_PREFIX = ".tmp-"  # snapshots/.tmp-NAME-PID (being built) and .tmp-removing-NAME-PID (being deleted)
RESTORED_PREFIX = "restored-"
READ_ONLY = 0o444
# A version's optimizer state (config `snapshots.include_optimizer`): the Trainer's names for it.
OPTIMIZER_PREFIXES = ("optimizer", "scheduler", "scaler", "rng_state")
PICKLE_SUFFIXES = hashing.PICKLE_SUFFIXES

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_CHUNK_BYTES = 64 * 2**20  # finite checks read tensors this much at a time (bounds temporary memory)
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


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
            "source": {k: src.get(k) for k in ("model_version", "job_id", "file", "step", "loss", "restored_from")},
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


def _current_source(ws: Workspace) -> tuple[Path, dict[str, Any], bool]:
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
# Placing files: link, reflink, copy


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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Placer:
    """Puts files into a new folder: hard link, else reflink, else copy (after a free-space check)."""

    def __init__(self, dest_root: Path, reserve: int, copy_planned: int) -> None:
        self.dest_root = dest_root
        self.reserve = reserve
        self.copy_left = copy_planned  # bytes of files still to place that were planned as copies
        self.counts = {"linked": 0, "reflinked": 0, "copied": 0, "copied_bytes": 0}

    def place(self, src: Path, dst: Path, size: int, link: bool) -> str:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not link:
            self.copy_left -= size
        if link:
            try:
                os.link(src, dst)
                try:
                    os.chmod(dst, READ_ONLY)
                except PermissionError:
                    os.unlink(dst)  # not ours to make read-only: take a copy instead
                    raise
                self.counts["linked"] += 1
                return "linked"
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
                    raise
        method = self._clone_or_copy(src, dst, size)
        os.chmod(dst, READ_ONLY)
        self.counts[method] += 1
        return method

    def _clone_or_copy(self, src: Path, dst: Path, size: int) -> str:
        import fcntl

        with atomic.writing(dst), open(src, "rb") as fin, open(dst, "xb") as fout:
            try:
                fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
                return "reflinked"
            except OSError:
                pass
            self._check_space(size + self.copy_left)
            _copy_data(fin.fileno(), fout.fileno(), size)
            os.fsync(fout.fileno())
        self.counts["copied_bytes"] += size
        return "copied"

    def _check_space(self, need_copy: int) -> None:
        free = disk_usage(self.dest_root)["free"]
        need = need_copy + self.reserve
        if free < need:
            raise SnapshotError(f"disk: need {format_bytes(need)} free on {self.dest_root.parent}, have "
                                f"{format_bytes(free)} ({format_bytes(need_copy)} to copy + "
                                f"{format_bytes(self.reserve)} reserve)")


def _copy_data(fd_in: int, fd_out: int, size: int) -> None:
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(fd_in, fd_out, min(size - copied, 1 << 30))
            if n == 0:
                break
            copied += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or copied:
            raise
        while block := os.read(fd_in, 1 << 22):  # kernels or filesystems without copy_file_range
            os.write(fd_out, block)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, _names in os.walk(folder, topdown=False):
        atomic.fsync_dir(root)


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


def _remove_tree(folder: Path) -> None:
    """rmtree that gets past read-only folders (files need only their folder to be writable)."""
    def retry(func, path, _exc):
        os.chmod(os.path.dirname(path), 0o755)
        func(path)

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=retry)
    else:
        shutil.rmtree(folder, onerror=retry)


# ---------------------------------------------------------------------------------------------
# Create


def create(ws: Workspace, kind: str, name: str | None = None, now: float | None = None, *,
           reserve: int = 0, include_optimizer: bool = False, prefix: str | None = None) -> Snapshot:
    """Snapshot the current model as `snapshots/NAME/`; returns it (not yet verified).

    `reserve` is the free space (bytes) that must remain after any copying (config `disk.reserve`);
    `prefix` replaces the kind's default name prefix ("daily", "manual", "pre-rollback").
    Raises SnapshotError for a hub model, a taken or unsafe name, or too little disk for copies;
    nothing is left behind on any error.
    """
    if kind not in KINDS:
        raise SnapshotError(f"{kind!r}: a snapshot kind is one of {', '.join(KINDS)}")
    now = time.time() if now is None else now
    t0 = time.perf_counter()
    src_dir, source, owned = _current_source(ws)
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
        _remove_tree(tmp)
    with atomic.writing(tmp):
        tmp.mkdir()
    try:
        placer = _Placer(tmp, reserve, sum(st.st_size for _, _, st, link in plan if not link))
        entries, reused = {}, 0
        for rel, real, st, link in plan:
            dst = tmp / rel
            if placer.place(real, dst, st.st_size, link) == "reflinked":
                _fsync_file(dst)  # copies are fsynced as they are written; a link's data already was
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
        # Inside the unlisted temp folder the manifest needs no replace of its own: the folder's
        # rename below is the atomic step. One fsync of the folders then covers every new entry.
        with atomic.writing(tmp / MANIFEST), open(tmp / MANIFEST, "xb") as f:
            f.write((atomic.dumps(manifest, indent=2) + "\n").encode())
            os.fchmod(f.fileno(), READ_ONLY)
            os.fsync(f.fileno())
        _fsync_tree(tmp)
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
# Verify

# safetensors dtypes: bits per element.
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
               "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# Checked for finite values; the OCP MX small floats (F4, F6_*) have no Inf or NaN encodings, integers none.
_FLOATS = {"F16", "BF16", "F32", "F64", "C64", "F8_E5M2", "F8_E4M3", "F8_E8M0"}


def _count_nonfinite(buf: memoryview, dtype: str) -> int:
    """Non-finite values of one tensor's raw bytes (little-endian), read in bounded chunks."""
    import numpy as np

    if dtype in ("F32", "F64", "C64"):
        np_dtype = {"F32": np.float32, "F64": np.float64, "C64": np.float32}[dtype]
        arr = np.frombuffer(buf, dtype=np.dtype(np_dtype).newbyteorder("<"))
        step = max(1, _CHUNK_BYTES // arr.itemsize)
        bad = 0
        with np.errstate(all="ignore"):
            for i in range(0, arr.size, step):
                chunk = arr[i:i + step]
                # A sum is finite only if every term is (NaN and Inf propagate through IEEE addition);
                # it is much faster than isfinite(). An overflowing sum of finite values is recounted.
                if not math.isfinite(float(np.add.reduce(chunk, dtype=chunk.dtype))):
                    bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
        return bad
    # Integer views: a value is non-finite when its exponent bits are all ones (and, for the
    # float8 formats, per their own encodings).
    spec = {"F16": (np.uint16, 0x7FFF, 0x7C00), "BF16": (np.uint16, 0x7FFF, 0x7F80),
            "F8_E5M2": (np.uint8, 0x7F, 0x7C), "F8_E4M3": (np.uint8, 0x7F, 0x7F),  # e4m3fn: only NaN
            "F8_E8M0": (np.uint8, 0xFF, 0xFF)}[dtype]
    int_type, mask, threshold = spec
    arr = np.frombuffer(buf, dtype=np.dtype(int_type).newbyteorder("<"))
    step = max(1, _CHUNK_BYTES // arr.itemsize)
    bad = 0
    for i in range(0, arr.size, step):
        magnitude = np.bitwise_and(arr[i:i + step], int_type(mask))
        if magnitude.size and magnitude.max() >= threshold:
            bad += int(np.count_nonzero(magnitude >= threshold))
    return bad


def check_safetensors(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(problems, notes) for one safetensors file: the header parses and is consistent with the file
    (dtypes, shapes, offsets, data length), and every floating tensor is finite. Reads the format
    itself; never loads anything through a framework."""
    problems: list[str] = []
    notes: list[str] = []
    size = os.path.getsize(path)
    if size < 8:
        return [f"file is {size} bytes, shorter than the 8-byte header length"], notes
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return [f"header length {n:,} exceeds the file ({size:,} bytes)"], notes
        if n > _MAX_HEADER:
            return [f"header length {n:,} is over the format's limit of {_MAX_HEADER:,}"], notes
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        return [f"header is not valid JSON: {e}"], notes
    if not isinstance(header, dict):
        return ["header is not a JSON object"], notes
    data_len = size - 8 - n
    tensors = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                    and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            problems.append(f"tensor {key}: malformed header entry")
            continue
        bits = _DTYPE_BITS.get(dtype)
        if bits is None:
            notes.append(f"tensor {key}: dtype {dtype} unknown here, size and values not checked")
        else:
            expected = (math.prod(shape) * bits + 7) // 8
            if end - begin != expected:
                problems.append(f"tensor {key}: {end - begin:,} bytes for {dtype} {shape} ({expected:,} expected)")
                continue
        tensors.append((begin, end, key, dtype))
    if problems:
        return problems, notes
    tensors.sort()
    covered = max((end for _, end, _, _ in tensors), default=0)
    if covered != data_len:
        problems.append(f"header says {covered:,} bytes of data, file has {data_len:,}")
    position = 0
    for begin, end, key, _ in tensors:
        if begin != position:
            problems.append(f"tensor {key}: starts at byte {begin:,} of the data, expected {position:,} "
                            f"({'overlap' if begin < position else 'gap'})")
        position = max(position, end)
    floats = [(b, e, k, d) for b, e, k, d in tensors if d in _FLOATS and b < e <= data_len]
    if not floats:
        return problems, notes
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for begin, end, key, dtype in floats:
                bad = _count_nonfinite(view[8 + n + begin:8 + n + end], dtype)
                if bad:
                    problems.append(f"tensor {key} has {bad:,} non-finite value{'s' if bad != 1 else ''}")
        finally:
            view.release()
    return problems, notes


def _extra_files(folder: Path, listed: set[str]) -> list[str]:
    extra = []
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel in (MANIFEST, VERIFY) or (root == str(folder) and name.startswith(atomic.TEMP_PREFIX)):
                continue  # the snapshot's own files, and a torn verify.json write
            if rel not in listed:
                extra.append(rel)
    return sorted(extra)


def verify(ws: Workspace, name: str, now: float | None = None) -> dict[str, Any]:
    """Check a snapshot against its manifest; writes the result to `snapshots/NAME/verify.json` and
    returns it: {"schema", "name", "ok", "checked_at", "seconds", "bytes", "hash_algorithm",
    "problems": [{"file", "problem"}], "notes": [{"file", "note"}]}.

    Raises SnapshotError (and records nothing) when the snapshot cannot be checked at all: no such
    snapshot, or its hash algorithm is not available here.
    """
    snap = get(ws, name)
    algorithm = snap.manifest["hash_algorithm"]
    if algorithm == "blake3" and hash_algorithm() != "blake3":
        raise SnapshotError(f"{name}: hashed with BLAKE3 and the blake3 package is not installed: cannot verify")
    t0 = time.perf_counter()
    problems: list[dict[str, str]] = []
    notes: list[dict[str, str]] = []
    checked = 0
    files = snap.manifest["files"]
    for rel in sorted(files):
        expected = files[rel]
        path = snap.path / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append({"file": rel, "problem": "missing"})
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append({"file": rel, "problem": "not a regular file"})
            continue
        if st.st_size != expected["size"]:
            problems.append({"file": rel, "problem": f"size {st.st_size:,} != {expected['size']:,} in manifest"})
        elif hash_file(path, algorithm) != expected["hash"]:
            problems.append({"file": rel, "problem": "hash mismatch"})
        checked += st.st_size
        # Content checks even after a mismatch: they tell how the file is broken.
        if rel.endswith(".json"):
            try:
                atomic.read_json(path)
            except ValueError as e:
                problems.append({"file": rel, "problem": f"JSON does not parse: {e}"})
        elif rel.endswith(".safetensors"):
            bad, said = check_safetensors(path)
            problems += [{"file": rel, "problem": p} for p in bad]
            notes += [{"file": rel, "note": s} for s in said]
    for rel in _extra_files(snap.path, set(files)):
        problems.append({"file": rel, "problem": "not in manifest"})
    result = {
        "schema": SCHEMA, "name": name, "ok": not problems, "checked_at": time.time() if now is None else now,
        "seconds": round(time.perf_counter() - t0, 4), "bytes": checked, "hash_algorithm": algorithm,
        "problems": problems, "notes": notes,
    }
    atomic.write_json_atomic(snap.path / VERIFY, result)
    return result


def describe_problems(result: dict[str, Any], limit: int = 3) -> str:
    """One line for an alert: "model.safetensors: hash mismatch; config.json: missing (+2 more)"."""
    problems = result.get("problems", [])
    text = "; ".join(f"{p['file']}: {p['problem']}" for p in problems[:limit])
    return text + (f" (+{len(problems) - limit} more)" if len(problems) > limit else "")


def pickle_trusted(ws: Workspace, path: str | os.PathLike) -> bool:
    """Whether a pickled file (optimizer state) may be loaded: its hash is in a manifest traind wrote."""
    size = os.path.getsize(path)
    digests: dict[str, str] = {}
    for snap in list_snapshots(ws):
        algorithm = snap.manifest["hash_algorithm"]
        for info in snap.manifest["files"].values():
            if info["size"] != size:
                continue
            if algorithm not in digests:
                try:
                    digests[algorithm] = hash_file(path, algorithm)
                except SnapshotError:
                    continue
            if digests[algorithm] == info["hash"]:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Remove, restore, clean up


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
    _remove_tree(doomed)  # unlinking a hard link leaves the model version's file as it was
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
    _remove_tree(doomed)


def restore_to_version(ws: Workspace, name: str, now: float | None = None, *, reserve: int = 0,
                       reverify: bool = False) -> Path:
    """Make a snapshot's files a new model version `models/restored-NAME-STAMP/`, for the daemon to
    make current. Verifies first when never verified (or when `reverify`); refuses a snapshot whose
    last verification failed. Hard links (copies across filesystems, after a free-space check);
    built as `models/.partial-...` with its marker last (`restored_from: NAME`), then renamed."""
    now = time.time() if now is None else now
    snap = get(ws, name)
    result = snap.verification
    if result is None or reverify:
        result = verify(ws, name, now)
    if not result.get("ok"):
        raise SnapshotError(f"{name}: corrupt ({describe_problems(result)}); a corrupt snapshot is never restored")
    version = f"{RESTORED_PREFIX}{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}"
    if len(version) > 200:
        version = version[:180] + version[-16:]
    final = ws.models / version
    if final.exists():
        raise SnapshotError(f"{final}: exists")
    partial = models.partial_dir(ws, version)
    if partial.exists():
        _remove_tree(partial)
    partial.mkdir(parents=True)
    files = snap.manifest["files"]
    try:
        dev = os.stat(ws.models).st_dev
        content = [(rel, info) for rel, info in sorted(files.items()) if rel != MODEL_MARKER]
        links = {rel: os.stat(snap.path / rel).st_dev == dev for rel, _ in content}
        placer = _Placer(partial, reserve, sum(info["size"] for rel, info in content if not links[rel]))
        for rel, info in content:
            if placer.place(snap.path / rel, partial / rel, info["size"], links[rel]) == "reflinked":
                _fsync_file(partial / rel)
        _fsync_tree(partial)
        original = {}
        if MODEL_MARKER in files:
            try:
                original = atomic.read_json(snap.path / MODEL_MARKER)
            except (OSError, ValueError):
                original = {}
        marker = {**(original if isinstance(original, dict) else {}),
                  "restored_from": name, "restored_at": now, "snapshot_source": snap.source,
                  "files": {rel: info["size"] for rel, info in content},
                  "hash_algorithm": snap.manifest["hash_algorithm"],
                  "hashes": {rel: info["hash"] for rel, info in content}}
        atomic.write_bytes_atomic(partial / MODEL_MARKER, (atomic.dumps(marker, indent=2) + "\n").encode(),
                                  mode=READ_ONLY)
        atomic.durable_rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        if path.name.startswith(TEMP_PREFIX) and pid.isdigit() and _pid_alive(int(pid)):
            continue  # being built or deleted right now
        _remove_tree(path)
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
                                      f"loss {loss:.4g}" if isinstance(loss, (int, float)) else "") if x)
        rows.append((s.name, s.kind, time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created_at)),
                     format_bytes(s.size), format_bytes(s.unique_bytes), origin, s.state, _age(s.age)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"

