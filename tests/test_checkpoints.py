"""Checkpoint completeness and trust: only what traind wrote, whole, is ever resumed from."""

from __future__ import annotations

from engine.store import checkpoints


def make_checkpoint(run_dir, step: int, optimizer: bytes = b"optimizer state") -> None:
    ckpt = checkpoints.checkpoint_path(run_dir, step)
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "optimizer.pt").write_bytes(optimizer)
    (ckpt / "rng_state.pth").write_bytes(b"rng")
    checkpoints.write_marker(ckpt, {"step": step, "loss": 1.0})


def test_a_pickle_changed_after_it_was_written_is_never_resumed_from(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    assert checkpoints.newest_trusted(tmp_path, log=lambda m: None)[0] == 20
    tampered = checkpoints.checkpoint_path(tmp_path, 20) / "optimizer.pt"
    tampered.write_bytes(b"evil payload ..")  # same size: only the hash can tell
    assert checkpoints.newest_complete(tmp_path)[0] == 20  # still looks complete
    said = []
    assert checkpoints.newest_trusted(tmp_path, log=said.append)[0] == 10
    assert "optimizer.pt changed since traind wrote it" in said[0]
    assert checkpoints.rollback_base(tmp_path, 25, log=lambda m: None)[0] == 10


def test_a_marker_without_hashes_trusts_no_pickle(tmp_path):
    make_checkpoint(tmp_path, 10)
    marker = checkpoints.read_marker(checkpoints.checkpoint_path(tmp_path, 10))
    assert set(marker["hashes"]) == {"optimizer.pt", "rng_state.pth"}
    assert checkpoints.untrusted_pickles(checkpoints.checkpoint_path(tmp_path, 10)) == []
    from engine.core import atomic
    del marker["hashes"]
    atomic.write_json_atomic(checkpoints.checkpoint_path(tmp_path, 10) / "traind-complete.json", marker)
    assert checkpoints.newest_trusted(tmp_path, log=lambda m: None) is None
