"""Device and precision choices shared by training, generation and images."""

from __future__ import annotations

from llmcli.console import fail

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str = "auto"):
    """'auto' picks CUDA, then MPS, then CPU; a named device must exist (one-line error if not)."""
    import torch

    device = check_device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_device(spec: str = "auto"):
    """The device `spec` names, checked (one-line errors) without starting CUDA: the `llm` that
    launches `--nproc N` workers checks what they will use ("cuda" without an index)."""
    import torch

    if spec is not None and not spec.strip():  # `--device "$DEV"` with DEV unset: not "auto"
        fail(f"--device {spec!r}: empty; use {DEVICE_HELP}")
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        fail(f"--device {spec}: not a device; use {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {spec}: CUDA is not available on this machine (this torch build: "
                 f"{torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            fail(f"--device {spec}: this machine has {count} CUDA device(s), "
                 f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            fail(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        fail(f"--device {spec}: unsupported device type; use {DEVICE_HELP}")
    elif device.index not in (None, 0):
        fail(f"--device {spec}: there is one CPU device; use --device cpu")
    else:
        device = torch.device("cpu")  # cpu:0 is the CPU; tensors moved there say just "cpu"
    return device


def dtype_from_name(name: str):
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        fail(f"dtype '{name}': use fp32, bf16 or fp16")
    return table[name]
