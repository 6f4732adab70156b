"""Verifying a snapshot: does its folder still hold exactly what its manifest says?

`verify` re-hashes every file, parses the JSON files and the safetensors
headers, and checks that every floating-point tensor is finite, reading the
tensors itself with numpy over an mmap. Its result goes to `verify.json` beside
the manifest (the only file of a snapshot ever rewritten). A snapshot whose
last verification failed is corrupt and is never restored. `pickle_trusted` is
the rule for pickled files: loaded only when a manifest traind wrote holds
their hash.

This module runs in the daemon: it must never import torch, transformers or
safetensors (whose loaders are what we refuse to trust), and it never
unpickles anything. numpy is imported only when a tensor is checked.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import time
from pathlib import Path
from typing import Any

from engine.core import atomic
from engine.store import bases, snapshots
from engine.store.workspace import Workspace

_CHUNK_BYTES = 64 * 2**20  # finite checks read tensors this much at a time (bounds temporary memory)
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header

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
            if rel in (snapshots.MANIFEST, snapshots.VERIFY) or (root == str(folder) and name.startswith(atomic.TEMP_PREFIX)):
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
    snap = snapshots.get(ws, name)
    algorithm = snap.manifest["hash_algorithm"]
    if algorithm == "blake3" and snapshots.hash_algorithm() != "blake3":
        raise snapshots.SnapshotError(f"{name}: hashed with BLAKE3 and the blake3 package is not installed: cannot verify")
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
        elif snapshots.hash_file(path, algorithm) != expected["hash"]:
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
    if isinstance(snap.manifest.get("base"), dict):  # an adapter's snapshot: the base it pins, re-hashed
        problems += bases.problems(ws, snap.manifest["base"])
    result = {
        "schema": snapshots.SCHEMA, "name": name, "ok": not problems, "checked_at": time.time() if now is None else now,
        "seconds": round(time.perf_counter() - t0, 4), "bytes": checked, "hash_algorithm": algorithm,
        "problems": problems, "notes": notes,
    }
    atomic.write_json_atomic(snap.path / snapshots.VERIFY, result)
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
    for snap in snapshots.list_snapshots(ws):
        algorithm = snap.manifest["hash_algorithm"]
        for info in snap.manifest["files"].values():
            if info["size"] != size:
                continue
            if algorithm not in digests:
                try:
                    digests[algorithm] = snapshots.hash_file(path, algorithm)
                except snapshots.SnapshotError:
                    continue
            if digests[algorithm] == info["hash"]:
                return True
    return False

