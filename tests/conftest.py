"""Shared fixtures. The tiny model is built once per session (a second, offline)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real tiny causal LM + tokenizer directory (engine.worker.tiny_model); treat it as read-only."""
    from engine.worker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
