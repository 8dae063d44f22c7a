"""One table of accelerators and their peaks: the denominator of MFU in training and of the
wall-clock estimates of `llm scaling`, so both always agree.

Peaks are dense (no 2:4 sparsity) tensor-core figures from the vendors' datasheets, in TFLOPS
per precision: `fp32` is TF32 where the card has it (training enables TF32 for fp32 matmuls),
plain FP32 otherwise. Pure Python at import; torch only inside the functions that measure.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from typing import Any

from llmcli.console import fail


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    tflops: float  # dense peak for `dtype`, the card's fastest training precision
    dtype: str
    source: str
    peaks: dict[str, float] = field(default_factory=dict)  # TFLOPS by precision

    def peak(self, precision: str) -> float | None:
        """FLOP/s at `precision` (fp32, bf16, fp16), or None where the card lacks it."""
        value = self.peaks.get(precision)
        return value * 1e12 if value else None


def _gpu(key: str, name: str, dtype: str, source: str, **peaks: float) -> GPU:
    return GPU(key, name, peaks[dtype], dtype, source, peaks)


GPUS: dict[str, GPU] = {g.key: g for g in [
    _gpu("h100", "NVIDIA H100 SXM", "bf16",
         "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 with sparsity, half dense",
         bf16=989.4, fp16=989.4, fp32=494.7),
    _gpu("h100-pcie", "NVIDIA H100 PCIe", "bf16",
         "NVIDIA H100 datasheet: 1,513 TFLOPS bf16 with sparsity, half dense",
         bf16=756.0, fp16=756.0, fp32=378.0),
    _gpu("h200", "NVIDIA H200 SXM", "bf16",
         "NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity (same compute as H100 SXM)",
         bf16=989.4, fp16=989.4, fp32=494.7),
    _gpu("a100", "NVIDIA A100 (SXM or PCIe)", "bf16",
         "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)",
         bf16=312.0, fp16=312.0, fp32=156.0),
    _gpu("l40s", "NVIDIA L40S", "bf16",
         "NVIDIA L40S datasheet: 362.05 TFLOPS bf16 dense (733 with sparsity)",
         bf16=362.05, fp16=362.05, fp32=183.0),
    _gpu("l4", "NVIDIA L4", "bf16",
         "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity, half dense",
         bf16=121.0, fp16=121.0, fp32=60.0),
    _gpu("a10g", "NVIDIA A10 / A10G", "bf16",
         "NVIDIA A10 datasheet: 125 TFLOPS bf16 dense; AWS's A10G has no sheet of its own, "
         "so this is an upper bound for it",
         bf16=125.0, fp16=125.0, fp32=62.5),
    _gpu("v100", "NVIDIA V100 SXM2", "fp16",
         "NVIDIA V100 datasheet: 125 TFLOPS tensor (fp16; no bf16 on Volta; PCIe: 112)",
         fp16=125.0, fp32=15.7),
    _gpu("t4", "NVIDIA T4", "fp16",
         "NVIDIA T4 datasheet: 65 TFLOPS mixed fp16/fp32 (no bf16 on Turing)",
         fp16=65.0, fp32=8.1),
    _gpu("rtx4090", "NVIDIA GeForce RTX 4090", "bf16",
         "NVIDIA Ada Lovelace architecture whitepaper: 165.2 TFLOPS bf16 with fp32 accumulate",
         bf16=165.2, fp16=165.2, fp32=82.6),
    _gpu("rtx3090", "NVIDIA GeForce RTX 3090", "bf16",
         "NVIDIA Ampere GA102 whitepaper: 71 TFLOPS bf16 with fp32 accumulate",
         bf16=71.0, fp16=71.0, fp32=35.6),
    _gpu("mi300x", "AMD Instinct MI300X", "bf16",
         "AMD Instinct MI300X datasheet: 1,307.4 TFLOPS bf16 dense",
         bf16=1307.4, fp16=1307.4, fp32=653.7),
]}
GPU_ALIASES = {"a10": "a10g", "4090": "rtx4090", "3090": "rtx3090", "h100sxm": "h100",
               "h200sxm": "h200", "a100sxm": "a100", "a100pcie": "a100", "v100sxm2": "v100"}


def _gpu_key(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'rtx4090', 'H100-SXM' -> 'h100sxm'."""
    return re.sub(r"[\s_\-]+|nvidia|amd|geforce|instinct", "", name.lower())


def get_gpu(name: str) -> GPU:
    """A card by the name a user types (`--gpu a100`); unknown names are a one-line error."""
    import difflib

    if not name.strip():  # an unset shell variable: never silently the default card
        fail(f"--gpu {name!r}: an empty GPU name; give one of {', '.join(GPUS)} (or leave "
             "--gpu out for the h100 default)")
    by_key = {_gpu_key(k): g for k, g in GPUS.items()}
    key = _gpu_key(name)
    key = _gpu_key(GPU_ALIASES.get(key, key))
    if key not in by_key:
        close = difflib.get_close_matches(name.lower(), list(GPUS), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        fail(f"--gpu {name!r}: unknown GPU{hint}; known: {', '.join(GPUS)} "
             "(or give a measured --tokens-per-second)")
    return by_key[key]


def gpu_from_device_name(device_name: str) -> GPU | None:
    """The table's card for a name torch reports ('NVIDIA H100 80GB HBM3' -> h100)."""
    text = _gpu_key(device_name)
    if "h100" in text and ("pcie" in text or "nvl" in text):
        return GPUS["h100-pcie"]
    # Longest keys first, so 'l40s' wins over 'l4' and 'h100pcie' over 'h100'.
    for key in sorted(GPUS, key=lambda k: -len(_gpu_key(k))):
        if _gpu_key(key) in text:
            return GPUS[key]
    for alias, key in GPU_ALIASES.items():
        if alias in text:
            return GPUS[key]
    return None


def peak_flops(device: Any, precision: str) -> float | None:
    """Peak FLOP/s for MFU: the table for known GPUs, a quick matmul measurement on CPU."""
    if device.type == "cuda":
        import torch

        card = gpu_from_device_name(torch.cuda.get_device_name(device))
        return card.peak(precision) if card else None
    if device.type == "cpu" and precision == "fp32":
        return measured_cpu_peak()
    return None


@functools.lru_cache(maxsize=4)
def measured_cpu_peak(n: int = 1536, seconds: float = 0.3) -> float:
    """fp32 matmul FLOP/s of this CPU with torch's current thread count (best of a short burst)."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
