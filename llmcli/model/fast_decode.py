"""oneDNN matrix-vector products for decoding on CPU: an opt-in speed-up, not the model's maths.

Decoding one token is a matrix-vector product per layer, bound by memory bandwidth. On CPU,
`nn.Linear` in fp32 goes to MKL, whose matrix-vector kernel reads memory at about half the speed
oneDNN's does (on AMD CPUs especially); the seed's model decodes about 2x faster through oneDNN
(see benchmarks/bench_generate.py). Same weights, same parameter names, same results to float
rounding; training (autograd) still uses `nn.Linear`. The kernel is a private torch op, so it is
used only after a start-up check shows it matches `nn.Linear` on this build.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


class OneDNNLinear(torch.nn.Linear):
    """`nn.Linear` computed by oneDNN when no gradient is needed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight,
                                               self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def use_onednn_linears(model: torch.nn.Module) -> bool:
    """Switch a CPU fp32 model's plain Linears to oneDNN where that works; whether it did."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or not onednn_works():
        return False
    for module in model.modules():
        if type(module) is torch.nn.Linear:  # subclasses (adapters) keep their own forward
            module.__class__ = OneDNNLinear
    return True


@functools.cache
def onednn_works() -> bool:
    """Whether this torch build has oneDNN's linear kernel and it agrees with nn.Linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            layer = torch.nn.Linear(16, 24)
            x = torch.randn(3, 16)
            expected = layer(x)
            layer.__class__ = OneDNNLinear
            return bool(torch.allclose(layer(x), expected, atol=1e-5))
    except (RuntimeError, AttributeError):
        return False
