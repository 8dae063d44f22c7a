"""Random windows from a memory-mapped token file: splits, shifts, resumable state, ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmcli.data.batches import BatchSource, TokenWindows, dense_lookup


def _windows(tokens: np.ndarray, **kw) -> TokenWindows:
    kw.setdefault("seed", 3)
    return TokenWindows(tokens, int(len(tokens) * 0.9), 8, 16, **kw)


def test_windows_are_shifted_by_one_and_stay_in_their_split():
    tokens = np.arange(2000, dtype=np.uint32)  # token value == position
    src = _windows(tokens)
    assert isinstance(src, BatchSource)
    assert src.tokens_per_batch == 8 * 16
    for _ in range(20):
        x, y = src.get_batch("train")
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (8, 16)
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:, 0], x[:, 0] + 1)
        assert int(y.max()) < 1800  # training windows never read validation tokens
        xv, yv = src.get_batch("val")
        assert int(xv.min()) >= 1800 and int(yv.max()) < 2000


def test_state_dict_reproduces_the_stream_exactly():
    tokens = np.arange(5000, dtype=np.uint32)
    a = _windows(tokens)
    a.get_batch("train")
    a.get_batch("val")
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    expected = [a.get_batch(s) for s in ("train", "val", "train")]
    b = _windows(tokens, seed=99)  # a different seed, overwritten by the state
    b.load_state_dict(saved)
    got = [b.get_batch(s) for s in ("train", "val", "train")]
    for (x1, y1), (x2, y2) in zip(expected, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_validation_draws_do_not_change_training_batches():
    tokens = np.arange(5000, dtype=np.uint32)
    a, b = _windows(tokens), _windows(tokens)
    for _ in range(3):
        b.get_batch("val")
    assert torch.equal(a.get_batch("train")[0], b.get_batch("train")[0])


def test_ranks_draw_different_windows_and_seeds_repeat():
    tokens = np.arange(50_000, dtype=np.uint32)
    r0, r1, r0_again = _windows(tokens, rank=0), _windows(tokens, rank=1), _windows(tokens)
    x0, x1, x0b = r0.get_batch("train")[0], r1.get_batch("train")[0], r0_again.get_batch(
        "train")[0]
    assert torch.equal(x0, x0b)
    assert not torch.equal(x0, x1)


MAX_SEED = 2**63 - 1  # train.seed's documented top


def test_every_documented_seed_makes_generators_and_earlier_seeds_keep_their_streams():
    """seed * 1_000_003 overflowed torch's 64 bits for train.seed near 2^63 ("Overflow when
    unpacking long long", blamed on the token file); seeds that fitted draw as before."""
    from llmcli.data.batches import STREAMS, seeded_generators

    tokens = np.arange(50_000, dtype=np.uint32)
    for rank in (0, 3):
        top = _windows(tokens, seed=MAX_SEED, rank=rank)
        assert top.get_batch("train")[0].shape == (8, 16)
    for seed, rank in ((0, 0), (1337, 1), (2**44, 7)):  # 2^44 * 1_000_003 is above 2^63
        for name, gen in seeded_generators(seed, rank).items():
            raw = torch.Generator()
            raw.manual_seed(seed * 1_000_003 + rank * 7919 + STREAMS[name])
            assert torch.equal(gen.get_state(), raw.get_state())


def test_seed_everything_takes_any_derived_seed_and_keeps_the_ones_that_fitted():
    import random

    from llmcli.train.state import seed_everything

    seed_everything(MAX_SEED + 5 + 1_000_003 * 10**7)  # a rank's resume seed at the top
    for seed in (1337, MAX_SEED + 2):  # above 2^63: torch took it, as unsigned
        seed_everything(seed)
        ours = (torch.initial_seed(), torch.rand(3), np.random.rand(), random.random())
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        assert ours[0] == torch.initial_seed() and torch.equal(ours[1], torch.rand(3))
        assert ours[2:] == (np.random.rand(), random.random())


def test_compact_lookup_maps_ids_and_unknowns():
    vocab_ids = np.array([5, 9, 100], dtype=np.int64)
    table = dense_lookup(vocab_ids, unknown_id=3, max_id=120)
    assert table[5] == 0 and table[9] == 1 and table[100] == 2
    assert table[6] == 3 and table[120] == 3
    tokens = np.array([5, 9, 100, 7] * 50, dtype=np.uint32)
    src = TokenWindows(tokens, 150, 2, 4, lookup=table)
    x, y = src.get_batch("train")
    assert set(x.unique().tolist()) <= {0, 1, 2, 3}


def test_a_split_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(ValueError, match="val split has 5 tokens"):
        TokenWindows(np.arange(105, dtype=np.uint32), 100, 2, 16)


def test_memmap_is_not_loaded_into_memory(tmp_path):
    """Memory must not grow with the corpus: 64M tokens (256 MB) sampled without copying them.

    Anonymous RSS is what a loaded corpus would occupy; page-cache pages of the mapped file are
    shared and reclaimable, so they are not counted.
    """
    path = tmp_path / "big.tokens"
    n = 64 * 1024 * 1024
    mm = np.memmap(path, dtype=np.uint32, mode="w+", shape=(n,))  # sparse file, instant
    del mm
    tokens = np.memmap(path, dtype=np.uint32, mode="r")
    src = TokenWindows(tokens, n - n // 10, 16, 128)

    def rss_mb() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    before = rss_mb()
    for _ in range(200):
        src.get_batch("train")
        src.get_batch("val")
    assert rss_mb() - before < 64  # the whole file would be 256 MB
