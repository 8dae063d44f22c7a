"""Weights in 2 MiB pages for decoding on CPU.

Batch-1 decoding streams every weight once per token, and with 4 KiB pages that stream pays a
TLB miss every 64 cache lines. On the 2-core machines this was measured on, the seed's model
decoded 1.04-1.09x faster with its weights in 2 MiB pages (benchmarks/bench_generate.py, both
of the machine's bandwidth levels). Linux gives an anonymous mapping transparent huge pages when
it is advised to (`MADV_HUGEPAGE`, honoured unless THP is "never"); torch's allocator does not
ask, so the weights are moved into one such mapping.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this system can back a mapping with transparent huge pages on advice."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of uint8 starting on a 2 MiB boundary, in a private anonymous mapping advised to
    use huge pages; the pages arrive on first touch. Plain memory where huge pages are not
    available."""
    if not available():
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        region = mmap.mmap(-1, nbytes + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP refuses the advice; plain memory will do
        return torch.empty(nbytes, dtype=torch.uint8)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    start = -whole.data_ptr() % PAGE
    return whole[start:start + nbytes]


def move_weights_to_huge_pages(model: torch.nn.Module) -> bool:
    """Copy a CPU model's parameters, in order, into one huge-page buffer and point them at it
    (same values, same Parameter objects, tied weights stay tied); whether it did."""
    params = list(model.parameters())  # each shared Parameter once
    if not params or not available() or any(p.device.type != "cpu" for p in params):
        return False
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // 64) * 64  # each on a cache line
    buffer = huge_page_buffer(total)
    with torch.no_grad():
        for p, offset in zip(params, offsets, strict=True):
            size = p.numel() * p.element_size()
            home = buffer[offset:offset + size].view(p.dtype).view(p.shape)
            home.copy_(p.data)
            p.data = home
    return True
