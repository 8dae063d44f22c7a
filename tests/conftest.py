"""Shared fixtures: tiny recipes and the path of the shared public data."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _signal_handlers_kept():
    """A test that runs a command's signal set-up in this process (torchrun_main answers
    SIGTERM itself) must not leave its handlers to the tests after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public test corpora not found at {SHARED_DATA} (see shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture
def tiny_model_cfg():
    """A model small enough to train and decode in milliseconds."""
    from llmcli.recipe import ModelConfig

    return ModelConfig(vocab_size=64, context_length=16, d_model=32, num_blocks=2, num_heads=4,
                       dropout=0.0)
