"""Small corpora, token files and recipes for the training tests (no tokenizer needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def markov_tokens(n: int, vocab: int = 48, seed: int = 0) -> np.ndarray:
    """A learnable sequence: each token strongly predicts the next (loss falls fast)."""
    rng = np.random.default_rng(seed)
    nxt = rng.permutation(vocab)
    out = np.empty(n, dtype=np.uint32)
    tok = 0
    noise = rng.random(n) < 0.1
    jumps = rng.integers(0, vocab, n)
    for i in range(n):
        out[i] = tok
        tok = int(jumps[i]) if noise[i] else int(nxt[tok])
    return out


def write_tokens(path: Path, tokens: np.ndarray, *, tokenizer: str = "bytes",
                 val_fraction: float = 0.1, vocab_size: int = 257) -> Path:
    """A `.tokens` file plus the sidecar `llm tokenize` writes (format llmcli-tokens/1)."""
    tokens = np.asarray(tokens, dtype="<u4")
    path.write_bytes(tokens.tobytes())
    val_start = int(len(tokens) * (1 - val_fraction))
    sidecar: dict[str, Any] = {
        "format": "llmcli-tokens/1", "tokenizer": tokenizer, "vocab_size": vocab_size,
        "dtype": "uint32", "num_tokens": int(len(tokens)), "max_id": int(tokens.max()),
        "distinct_ids": int(len(np.unique(tokens))), "val_fraction": val_fraction,
        "val_start": val_start, "documents": 1,
        "sources": [{"path": "synthetic", "sha256": "0" * 64, "bytes": int(tokens.nbytes)}],
    }
    Path(str(path) + ".json").write_text(json.dumps(sidecar), encoding="utf-8")
    return path


def tiny_recipe(**train: Any) -> dict[str, Any]:
    """A recipe dict for a model that trains in milliseconds per step."""
    base = {"batch_size": 4, "max_iters": 12, "eval_interval": 4, "eval_iters": 2,
            "log_interval": 2, "checkpoint_interval": 4, "lr": 3e-3, "seed": 7}
    base.update(train)
    return {
        "name": "tiny-test",
        "data": {"tokenizer": "bytes"},
        "model": {"vocab_size": 64, "context_length": 16, "d_model": 32, "num_blocks": 2,
                  "num_heads": 4, "dropout": 0.1},
        "train": base,
    }


def one_thread():
    """Fixture body: tiny models train fastest on one thread (and do not stall on a busy CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A project folder with a token file (ids 0-47) and the recipe mini.yaml: the CLI tests' workspace.
MINI_RECIPE = {
    "data": {"tokenizer": "bytes"},
    "model": {"vocab_size": "auto", "context_length": 16, "d_model": 32, "num_blocks": 2,
              "num_heads": 4, "dropout": 0.0},
    "train": {"batch_size": 4, "max_iters": 6, "eval_interval": 3, "eval_iters": 2,
              "log_interval": 3, "checkpoint_interval": 3, "lr": 3e-3},
}


def make_project(tmp_path: Path, monkeypatch: Any) -> Path:
    """Fixture body: chdir into tmp_path with corpus.tokens and mini.yaml beside each other."""
    import yaml

    monkeypatch.chdir(tmp_path)
    write_tokens(tmp_path / "corpus.tokens", markov_tokens(4000))
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(MINI_RECIPE), encoding="utf-8")
    return tmp_path
