"""Numeric precision for training: autocast dtype, TF32, the fp16 grad scaler, peak FLOP/s.

`train.precision: auto` means bf16 autocast on CUDA (fast, no loss scaling needed) and fp32
elsewhere; bf16 on a CPU is allowed when asked (fast only where the CPU has bf16 instructions);
fp16 needs a grad scaler because its range is small.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any

import torch

from llmcli.console import fail, warn

# Dense (no sparsity) peak FLOP/s of common accelerators, by a substring of the device name.
_GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 83e12}),
    ("V100", {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"bf16": 0.0, "fp16": 65e12, "fp32": 8.1e12}),
]


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str
    dtype: torch.dtype | None  # autocast dtype; None = plain fp32

    def autocast(self) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The recipe's `train.precision` on this device; impossible choices are one-line errors."""
    kind = device.type
    if name == "auto":
        name = "bf16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp32":
        return Precision("fp32", kind, None)
    if name == "bf16":
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            fail("train.precision=bf16: this GPU has no bf16 support; use train.precision=fp16")
        if kind == "cpu" and not _cpu_has_bf16():
            warn("this CPU has no native bf16 instructions: bf16 will be slower than fp32")
        return Precision("bf16", kind, torch.bfloat16)
    if name == "fp16":
        if kind == "mps":
            fail("train.precision=fp16: not supported on MPS here; use fp32 or bf16")
        return Precision("fp16", kind, torch.float16)
    fail(f"train.precision={name}: use auto, fp32, bf16 or fp16")


def enable_fast_matmul(device: torch.device) -> None:
    """TF32 for fp32 matmuls on CUDA (Ampere and newer): ~8x faster, loss curves unchanged."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            text = fh.read(100_000)
    except OSError:
        return False
    return "avx512_bf16" in text or "amx_bf16" in text


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s for MFU: a table for known GPUs, a quick matmul measurement on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAKS:
            if key in name:
                return peaks.get(precision) or None
        return None
    if device.type == "cpu" and precision == "fp32":
        return measured_cpu_peak()
    return None


@functools.lru_cache(maxsize=4)
def measured_cpu_peak(n: int = 1536, seconds: float = 0.3) -> float:
    """fp32 matmul FLOP/s of this CPU with torch's current thread count (best of a short burst)."""
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
