"""oneDNN matrix-vector products for decoding on CPU: an opt-in speed-up, not the model's maths.

Decoding one token is a matrix-vector product per layer, bound by memory bandwidth. On CPU,
`nn.Linear` in fp32 goes to MKL, whose matrix-vector kernel reads memory at about half the speed
oneDNN's does (on AMD CPUs especially); the seed's model decodes about 2x faster through oneDNN
(see benchmarks/bench_generate.py). In bf16 both read plain row-major weights slowly (~14 GB/s
for the output layer here); oneDNN's own blocked layout of the weight reads at ~32 GB/s, so bf16
layers keep a copy in that layout (made on first use, remade when the weight changes). Same
weights, same parameter names, same results to float rounding; training (autograd) still uses
`nn.Linear`. The kernels are private torch ops, so they are used only after a start-up check
shows they match `nn.Linear` on this build.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class OneDNNLinear(torch.nn.Linear):
    """`nn.Linear` computed by oneDNN when no gradient is needed."""

    _packed: tuple[int, int, torch.Tensor] | None = None  # (data_ptr, version, blocked weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.kernel_weight(),
                                               self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])

    def kernel_weight(self) -> torch.Tensor:
        weight = self.weight
        if weight.dtype != torch.bfloat16:
            return weight
        # (inference tensors keep no version counter; they are made and kept as they are)
        key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if self._packed is None or self._packed[:2] != key:
            with torch.no_grad():
                self._packed = (*key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        return self._packed[2]


def use_onednn_linears(model: torch.nn.Module) -> bool:
    """Switch a CPU fp32 or bf16 model's plain Linears to oneDNN where that works; whether it
    did."""
    param = next(model.parameters())
    if param.device.type != "cpu" or not onednn_works(param.dtype):
        return False
    for module in model.modules():
        if type(module) is torch.nn.Linear:  # subclasses (adapters) keep their own forward
            module.__class__ = OneDNNLinear
    return True


@functools.cache
def onednn_works(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has oneDNN's linear kernel (and, for bf16, its blocked weight
    layout) and it agrees with nn.Linear at `dtype`."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            layer = torch.nn.Linear(16, 24).to(dtype)
            x = torch.randn(3, 16, dtype=dtype)
            expected = layer(x).float()
            layer.__class__ = OneDNNLinear
            tolerance = 1e-5 if dtype == torch.float32 else 0.05
            return bool(torch.allclose(layer(x).float(), expected, atol=tolerance))
    except (RuntimeError, AttributeError):
        return False
