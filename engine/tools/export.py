"""`traind export`: a model version or a snapshot as a plain Hugging Face directory.

The source is the current model (the default), a version under `models/`, or a
snapshot. A full model, or an adapter without `--merged`, is a file copy: the
model's files without traind's marker and without the Trainer's pickles
(optimizer, scheduler, scaler and RNG state, training_args.bin); an adapter's
`adapter_config.json` is rewritten to name its base by absolute path, so peft
loads it with no traind code. An adapter with `--merged` is merged into its base
by `python -m engine.worker.export`: torch and peft live there, never here.
`traind-export.json` beside the files says what was exported (a file Hugging
Face ignores).

Never half-written: everything is made in `.OUT.tmp-PID` beside OUT, fsynced,
checked and renamed into place; SIGTERM and SIGINT remove it on the way out,
and the temp folder of an export that was killed is removed by the next export
to the same OUT. An OUT that exists and is not empty is refused.

What is exported is what traind recorded. Every source file is opened before
the first byte is copied, so retention pruning a version meanwhile cannot take
its content away (open files keep their data); a file already gone refuses the
export. Every copy is then checked as `traind verify` checks a snapshot: the
hash the version's marker or the snapshot's manifest recorded, JSON that
parses, safetensors headers that agree with their files, finite tensors. A
pruned, changed or corrupt source is refused, never exported. A snapshot whose
last verification failed is refused before anything is copied.

This module reads the workspace and never writes into it (no lock is taken; a
running daemon need not be asked). It never imports torch, transformers or
peft, and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import __version__
from engine.core import atomic, crashpoints, hashing, model_check
from engine.store import bases, models, snapshots, statefiles, verification
from engine.core.protocol import MODEL_MARKER
from engine.core.resources import disk_usage, format_bytes, pid_alive
from engine.store.workspace import Workspace

RECORD = "traind-export.json"
ADAPTER_CONFIG = "adapter_config.json"
# Not part of a model: the Trainer's state of a run, pickles a receiver would have to trust.
TRAINER_STATE_PREFIXES = (*snapshots.OPTIMIZER_PREFIXES, "training_args")
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours in what transformers logs
_STAGE = ".adapter"  # inside the temp folder: the checked adapter copy a merge reads


class ExportError(Exception):
    pass


@dataclass(frozen=True)
class Source:
    """What an export reads: a folder, the files to take from it and what traind recorded of them."""

    kind: str  # "version", "snapshot" or "directory" (a model folder outside the workspace)
    name: str  # the version's or snapshot's name; the path for a directory
    path: Path
    files: dict[str, int]  # relative path -> size
    hashes: dict[str, str] = field(default_factory=dict)  # relative path -> recorded hash (may be partial)
    hash_algorithm: str | None = None
    marker: dict[str, Any] = field(default_factory=dict)  # the version's traind-model.json, {} without one

    @property
    def label(self) -> str:
        return {"version": f"models/{self.name}", "snapshot": f"snapshot {self.name}"}.get(self.kind, str(self.path))

    @property
    def is_adapter(self) -> bool:
        return bool(self.marker.get("adapter")) or ADAPTER_CONFIG in self.files


# ---------------------------------------------------------------------------------------------
# The source


def resolve(ws: Workspace, name: str | None) -> Source:
    """The current model (name None), `models/NAME`, `snapshots/NAME`, or a bare NAME that is one of them."""
    if name is None:
        return _current(ws)
    kind, _, rest = name.rstrip("/").partition("/")
    if rest and kind in ("models", "snapshots"):
        return _version(ws, rest) if kind == "models" else _snapshot(ws, rest)
    if "/" in name:
        raise ExportError(f"{name!r}: not a model version or a snapshot name (give NAME, models/NAME or snapshots/NAME)")
    is_version = not name.startswith(".") and (ws.models / name).is_dir()
    is_snapshot = not name.startswith(".") and (ws.snapshots / name / snapshots.MANIFEST).is_file()
    if is_version and is_snapshot:
        raise ExportError(f"{name!r} is both a model version and a snapshot: say models/{name} or snapshots/{name}")
    if is_version:
        return _version(ws, name)
    if is_snapshot:
        return _snapshot(ws, name)
    versions = ", ".join(snapshots.model_versions(ws)) or "none"
    snaps = ", ".join(s.name for s in snapshots.list_snapshots(ws)) or "none"
    raise ExportError(f"{name!r}: no model version or snapshot of that name (versions: {versions}; snapshots: {snaps})")


def current_pointer(ws: Workspace) -> dict[str, Any]:
    """models/current.json; ExportError when there is none or it is damaged."""
    try:
        return models.current(ws)
    except FileNotFoundError:
        raise ExportError(f"{ws.current_model_pointer}: no current model; name a version or a snapshot") from None
    except statefiles.Damaged as e:
        raise ExportError(f"{e}; name a version or a snapshot") from None


def _current(ws: Workspace) -> Source:
    pointer = current_pointer(ws)
    if pointer["kind"] == "hub":
        raise ExportError(f"the current model is the hub model {pointer['path']!r}: it has no local files to "
                          "export (it is already a Hugging Face model); export a trained version once there is one")
    path = Path(models.current_source(ws))
    if path.parent.resolve() == ws.models.resolve():
        return _version(ws, path.name)
    if not path.is_dir():
        raise ExportError(f"{path}: the current model's folder is missing")
    files = _walk(path)
    if not files:
        raise ExportError(f"{path}: no model files to export")
    return Source("directory", str(path), path, files)


def _version(ws: Workspace, name: str) -> Source:
    try:
        snapshots.check_name(name)
    except snapshots.SnapshotError:
        raise ExportError(f"{name!r}: not a model version name") from None
    path = ws.models / name
    if not path.is_dir() or path.is_symlink():
        raise ExportError(f"models/{name}: no such model version")
    marker = statefiles.read_or_none(path / MODEL_MARKER, statefiles.MODEL_MARKER) or {}
    recorded = marker.get("files")
    if isinstance(recorded, dict) and recorded:
        files = {rel: size for rel, size in recorded.items()
                 if _safe_rel(rel) and isinstance(size, int) and _exported(rel)}
        hashes = marker.get("hashes") if isinstance(marker.get("hashes"), dict) else {}
        algorithm = marker.get("hash_algorithm") if hashes else None
    else:  # a version traind did not train (the tiny base): nothing recorded to compare against
        files, hashes, algorithm = _walk(path), {}, None
    if not files:
        raise ExportError(f"models/{name}: no model files to export")
    return Source("version", name, path, files, {k: v for k, v in hashes.items() if k in files}, algorithm, marker)


def _snapshot(ws: Workspace, name: str) -> Source:
    try:
        snap = snapshots.get(ws, name)
    except snapshots.SnapshotError as e:
        raise ExportError(str(e)) from None
    if snap.state == "corrupt":
        raise ExportError(f"snapshot {name} is corrupt ({verification.describe_problems(snap.verification)}); "
                          "a corrupt snapshot is never exported")
    listed = snap.manifest["files"]
    files = {rel: info["size"] for rel, info in listed.items() if _exported(rel)}
    marker = {}
    if MODEL_MARKER in listed:
        marker = statefiles.read_or_none(snap.path / MODEL_MARKER, statefiles.MODEL_MARKER) or {}
    return Source("snapshot", name, snap.path, files, {rel: listed[rel]["hash"] for rel in files},
                  snap.manifest["hash_algorithm"], marker)


def _exported(rel: str) -> bool:
    """Whether a file of a model folder belongs in an export."""
    top = rel.split("/", 1)[0]
    if rel == MODEL_MARKER or top.startswith(".") or rel in (snapshots.MANIFEST, snapshots.VERIFY, RECORD):
        return False
    return "/" in rel or not rel.startswith(TRAINER_STATE_PREFIXES)


def _safe_rel(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _walk(folder: Path) -> dict[str, int]:
    """Every exported regular file under a folder (file links followed, as a hub cache needs)."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            rel = (Path(root) / name).relative_to(folder).as_posix()
            try:
                st = os.stat(Path(root) / name)
            except FileNotFoundError:
                continue
            if _exported(rel) and not name.startswith(".") and os.path.isfile(Path(root) / name):
                files[rel] = st.st_size
    return files


def base_of(source: Source) -> str | None:
    """An adapter's base: the path (or hub id) its marker names, else its adapter_config.json's."""
    base = (source.marker.get("adapter") or {}).get("base") or {}
    if isinstance(base.get("path"), str) and base["path"]:
        return base["path"]
    try:
        named = atomic.read_json(source.path / ADAPTER_CONFIG).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return named if isinstance(named, str) and named else None


# ---------------------------------------------------------------------------------------------
# The export


def run(ws: Workspace, out: str | os.PathLike, source_name: str | None = None, *, merged: bool = False,
        reserve: int = 0) -> dict[str, Any]:
    """Export into `out` (created: it must not exist, or be an empty folder); returns the export record.

    ExportError, with the reason, for anything refused or failed; nothing is left at `out` then.
    `reserve` (config disk.reserve) must stay free when `out` is on the workspace's filesystem.
    """
    with signals_interrupt():
        try:
            return _run(ws, Path(out).absolute(), source_name, merged, reserve)
        except atomic.WriteFailed as e:
            raise ExportError(f"{e.problem}; nothing was exported") from None
        except OSError as e:
            raise ExportError(f"{e.filename or ''}: {e.strerror or e}; nothing was exported".lstrip(": ")) from None


def _run(ws: Workspace, out: Path, source_name: str | None, merged: bool, reserve: int) -> dict[str, Any]:
    source = resolve(ws, source_name)
    _check_out(ws, out, source)
    merge = merged and source.is_adapter
    base = base_of(source) if source.is_adapter else None
    if source.is_adapter:
        check_base(ws, source, base, merge)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    need = sum(source.files.values()) + (_weights_size(Path(base)) if merge and os.path.isabs(base) else 0)
    _check_space(ws, out.parent, need, reserve)

    tmp = temp_dir(out)
    with atomic.writing(tmp):
        tmp.mkdir()
    try:
        target = tmp / _STAGE if merge else tmp
        _copy_checked(source, target)
        if merge:
            merge_info = _merge(ws, target, base, tmp)
            shutil.rmtree(target)
            problems = _content_problems(tmp, _walk(tmp))
            if problems:
                raise ExportError(f"the merged model failed its checks ({'; '.join(problems[:3])}); nothing was exported")
        else:
            merge_info = None
            if source.is_adapter:
                _name_base(tmp / ADAPTER_CONFIG, base)
        _usual_modes(tmp)
        record = _record(ws, source, tmp, base, merge_info)
        atomic.write_bytes_atomic(tmp / RECORD, (atomic.dumps(record, indent=2) + "\n").encode())
        _fsync_dirs(tmp)
        crashpoints.reached("export")
        try:
            atomic.durable_rename(tmp, out)  # replaces an empty folder; a non-empty one refuses
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise ExportError(f"{out}: appeared meanwhile and is not empty; nothing was exported") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def temp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def remove_stale_temps(out: Path) -> list[Path]:
    """Temp folders of earlier exports to the same OUT whose process is gone (killed mid-export)."""
    pattern = re.compile(re.escape(f".{out.name}.tmp-") + r"(\d+)")
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and not _alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    # ours from before would be a reused pid: this process has made none yet
    return pid != os.getpid() and pid_alive(pid)


def _check_out(ws: Workspace, out: Path, source: Source) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out}: exists and is not a folder; export writes a new folder")
    if out.is_dir() and any(os.scandir(out)):
        raise ExportError(f"{out}: exists and is not empty; export writes a new folder (remove it, or choose another)")
    resolved = out.resolve()
    for owned in (ws.models, ws.snapshots, source.path):
        if resolved == owned.resolve() or owned.resolve() in resolved.parents:
            raise ExportError(f"{out}: inside {owned}, which traind owns; export to a folder of your own")


def check_base(ws: Workspace, source: Source, base: str | None, merge: bool) -> None:
    if base is None:
        raise ExportError(f"{source.label}: an adapter whose base model is not recorded (no adapter.base in its "
                          f"{MODEL_MARKER}, no base_model_name_or_path in {ADAPTER_CONFIG})")
    if os.path.isabs(base):
        if (problem := model_check.dir_problem(Path(base))) is not None:
            raise ExportError(f"{source.label}: its base model {base} cannot be loaded ({problem}); "
                              "an adapter needs its base")
        pinned = (source.marker.get("adapter") or {}).get("base")
        if isinstance(pinned, dict) and pinned.get("content_hash") and (changed := bases.problems(ws, pinned)):
            raise ExportError(f"{source.label}: its base is not the one it was trained on "
                              f"({'; '.join(p['problem'] for p in changed[:3])})")
    elif merge and model_check.looks_like_path(base):
        raise ExportError(f"{source.label}: its base model {base!r} is a relative path; it cannot be found")


def _weights_size(base: Path) -> int:
    return sum(p.stat().st_size for p in base.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


def _check_space(ws: Workspace, folder: Path, need: int, reserve: int) -> None:
    free = disk_usage(folder)["free"]
    # The workspace's reserve is for its daemon: an export onto the same filesystem must leave it.
    keep = reserve if os.stat(folder).st_dev == os.stat(ws.root).st_dev else 0
    if free < need + keep:
        extra = f" + {format_bytes(keep)} reserve (disk.reserve)" if keep else ""
        raise ExportError(f"disk: need {format_bytes(need + keep)} free on {folder} ({format_bytes(need)} to write"
                          f"{extra}), have {format_bytes(free)}; nothing was exported")


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end an export as Ctrl-C does: the temp folder is removed on the way out."""
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a caller in a thread owns its own signals
        return
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# Copying and checking


def _copy_checked(source: Source, dest: Path) -> None:
    """Copy the source's files into `dest`, every file opened before any is copied, then check the copies."""
    fds: dict[str, int] = {}
    try:
        for rel in sorted(source.files):
            try:
                fds[rel] = os.open(source.path / rel, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ExportError(f"{source.label}: {rel} is missing (was it removed or pruned meanwhile?); "
                                  "nothing was exported") from None
        dest.mkdir(exist_ok=True)
        for rel, fd in fds.items():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            _copy_file(fd, dest / rel)
    finally:
        for fd in fds.values():
            os.close(fd)
    problems = _content_problems(dest, source.files, source.hashes, source.hash_algorithm)
    if problems:
        what = "corrupt" if source.hashes else "unreadable"
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        advice = f"; 'traind verify {source.name}' records it" if source.kind == "snapshot" else ""
        raise ExportError(f"{source.label} is {what}: {'; '.join(problems[:3])}{more}; nothing was exported{advice}")


def _copy_file(fd_in: int, dst: Path) -> None:
    """A reflink where the filesystem can (no space, no time), else a kernel-side copy; fsynced."""
    size = os.fstat(fd_in).st_size
    with atomic.writing(dst), open(dst, "xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fd_in)
        except OSError:
            copied = 0
            while copied < size:
                try:
                    n = os.copy_file_range(fd_in, fout.fileno(), size - copied, copied, copied)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    n = fout.write(os.pread(fd_in, min(size - copied, 1 << 22), copied))
                if n == 0:
                    break
                copied += n
        os.fsync(fout.fileno())


def _content_problems(folder: Path, files: dict[str, int], hashes: dict[str, str] | None = None,
                      algorithm: str | None = None) -> list[str]:
    """What `traind verify` would say of these files: size, recorded hash, JSON, safetensors."""
    problems = []
    for rel, size in sorted(files.items()):
        path = folder / rel
        actual = path.stat().st_size
        if actual != size:
            problems.append(f"{rel}: size {actual:,} != {size:,} recorded")
        elif hashes and rel in hashes:
            try:
                if hashing.hash_file(path, algorithm) != hashes[rel]:
                    problems.append(f"{rel}: hash mismatch")
            except hashing.HashError as e:
                raise ExportError(f"{rel}: {e}; cannot check it") from None
        if rel.endswith(".json"):
            try:
                atomic.read_json(path)
            except ValueError as e:
                problems.append(f"{rel}: JSON does not parse: {e}")
        elif rel.endswith(".safetensors"):
            problems += [f"{rel}: {p}" for p in verification.check_safetensors(path)[0]]
    return problems


def _name_base(config_path: Path, base: str) -> None:
    """peft finds the base through base_model_name_or_path: the absolute path where it is."""
    config = atomic.read_json(config_path)
    if not isinstance(config, dict):
        raise ExportError(f"{ADAPTER_CONFIG}: not a JSON object")
    config["base_model_name_or_path"] = base
    atomic.write_bytes_atomic(config_path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def _usual_modes(folder: Path) -> None:
    """The export is the user's: files as any new file of theirs (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, names in os.walk(folder):
        for name in names:
            os.chmod(Path(root) / name, 0o666 & ~umask)


def _fsync_dirs(folder: Path) -> None:
    for root, _dirs, _names in os.walk(folder, topdown=False):
        atomic.fsync_dir(root)


# ---------------------------------------------------------------------------------------------
# Merging (in a worker-side process) and the record


def _merge(ws: Workspace, adapter: Path, base: str, out: Path) -> dict[str, Any]:
    from engine.ops import forkserver
    from engine.ops.worker_process import worker_env

    command = ["-m", "engine.worker.export", "--adapter", str(adapter), "--base", base, "--out", str(out)]
    result = forkserver.run_python(command, worker_env(), forkserver.server_for(ws.fork_socket))
    if result.returncode != 0:
        lines = [_ANSI.sub("", line).rstrip() for line in result.stderr.splitlines() if line.strip()]
        errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        details = ""
        if errors:
            why = lines[errors[-1]].removeprefix("error: ")
            # What transformers reported before the error (a load report, say) is the detail the user needs.
            details = "".join(f"\n    {line}" for line in lines[max(0, errors[-1] - 20):errors[-1]])
        elif result.returncode < 0:
            why = f"the merge process was killed by {signal.Signals(-result.returncode).name}"
        else:
            why = f"the merge process exited {result.returncode}" + (f": {lines[-1]}" if lines else "")
        raise ExportError(f"merging the adapter into {base} failed: {why}; nothing was exported{details}")
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ExportError("the merge process did not say what it saved; nothing was exported") from None


def _record(ws: Workspace, source: Source, folder: Path, base: str | None,
            merge_info: dict[str, Any] | None) -> dict[str, Any]:
    """traind-export.json: where the files came from, and their hashes as exported."""
    # The source's algorithm, so its recorded hashes carry over; this machine's where it lacks that one.
    algorithm = source.hash_algorithm if source.hash_algorithm in ("sha256", hashing.algorithm()) else hashing.algorithm()
    files = {}
    for rel, size in sorted(_walk(folder).items()):
        carried = merge_info is None and rel != ADAPTER_CONFIG and algorithm == source.hash_algorithm
        recorded = source.hashes.get(rel) if carried else None
        files[rel] = {"size": size, "hash": recorded or hashing.hash_file(folder / rel, algorithm)}
    marker = source.marker
    adapter = marker.get("adapter") if isinstance(marker.get("adapter"), dict) else None
    record: dict[str, Any] = {
        "schema": 1, "exported_at": time.time(), "traind_version": __version__,
        "type": "merged" if merge_info is not None else "adapter" if source.is_adapter else "model",
        "from": {"kind": source.kind, "name": source.name, "path": str(source.path), "workspace": str(ws.root),
                 **{k: marker[k] for k in ("job_id", "step", "loss", "restored_from") if k in marker}},
        "hash_algorithm": algorithm, "files": files,
    }
    if source.is_adapter:
        recorded_base = (adapter or {}).get("base") or {}
        record["adapter"] = {k: v for k, v in (adapter or {}).items() if k != "base"}
        record["base"] = {"path": base, "content_hash": recorded_base.get("content_hash"),
                          "hash_algorithm": recorded_base.get("hash_algorithm")}
    if merge_info is not None:
        record["merged"] = merge_info
    return record


def describe(record: dict[str, Any], out: Path) -> str:
    """One line for the user."""
    origin = record["from"]
    what = {"version": f"models/{origin['name']}", "snapshot": f"snapshot {origin['name']}"}.get(origin["kind"],
                                                                                             origin["path"])
    kind = {"merged": f"adapter merged into {record.get('base', {}).get('path')}",
            "adapter": f"adapter of {record.get('base', {}).get('path')}", "model": "model"}[record["type"]]
    return f"exported {what} ({kind}) to {out}"
