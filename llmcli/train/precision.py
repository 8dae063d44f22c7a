"""Numeric precision for training: autocast dtype, TF32, the fp16 grad scaler.

`train.precision: auto` means bf16 autocast on CUDA (fast, no loss scaling needed) and fp32
elsewhere; bf16 on a CPU is allowed when asked (fast only where the CPU has bf16 instructions);
fp16 needs a grad scaler because its range is small.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from llmcli.console import fail, warn


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


def check_sharded_precision(precision: str, sharded: bool) -> None:
    """FSDP with fp16: refused, by the trainer and before `--nproc N` launches anything."""
    if sharded and precision == "fp16":
        fail("train.parallel=fsdp with train.precision=fp16: fp16 needs loss scaling that "
             "this FSDP path does not do; use train.precision=bf16 (or fp32)")


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
