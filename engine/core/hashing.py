"""File hashes for manifests and markers: BLAKE3 on every core, or SHA-256 where blake3 is missing.

One module so snapshots, checkpoint markers and model markers hash the same way.
Also the rule for pickles: a pickled file (optimizer and RNG state) is loaded
only when its hash matches one traind recorded when it wrote the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# torch.distributed.checkpoint's: .metadata is a pickle, each .distcp shard holds torch.save'd objects beside its tensors
PICKLE_SUFFIXES += (".distcp",)
PICKLE_NAMES = (".metadata",)


class HashError(Exception):
    pass


def algorithm() -> str:
    """The best algorithm available here."""
    try:
        import blake3  # noqa: F401
    except ImportError:
        return "sha256"
    return "blake3"


def hash_file(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file: BLAKE3 on every core over an mmap, or SHA-256 (OpenSSL, SHA-NI where present)."""
    if algorithm == "blake3":
        try:
            import blake3
        except ImportError:
            raise HashError("this file was hashed with BLAKE3 and the blake3 package is not installed") from None
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if os.path.getsize(path) and hasattr(h, "update_mmap"):
            h.update_mmap(os.fspath(path))
        else:
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        return h.hexdigest()
    if algorithm == "sha256":
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    raise HashError(f"unknown hash algorithm {algorithm!r}")


def is_pickle(path: str | os.PathLike) -> bool:
    return Path(path).suffix in PICKLE_SUFFIXES or Path(path).name in PICKLE_NAMES


def hash_files(folder: Path, relpaths: list[str], algo: str) -> dict[str, str]:
    return {rel: hash_file(folder / rel, algo) for rel in relpaths}


def mismatched(folder: Path, recorded: dict[str, str], algo: str) -> list[str]:
    """Files whose content no longer hashes to what was recorded (missing ones included)."""
    bad = []
    for rel, digest in recorded.items():
        try:
            if hash_file(folder / rel, algo) != digest:
                bad.append(rel)
        except OSError:
            bad.append(rel)
    return bad
