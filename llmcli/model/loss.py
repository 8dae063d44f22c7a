"""The output layer and cross-entropy in one step, for training with a large vocabulary.

With cl100k's 100K ids the logits of a batch are huge (8 x 128 tokens -> 410 MB in fp32), and
the textbook path (`linear` -> `cross_entropy`) allocates them, a log-softmax copy, a zero-filled
gradient and a log-softmax gradient: four fresh buffers, each paid for again in page faults at
every step (allocations this big go back to the OS when freed), and as many passes over memory.

Here the gradients of the input, weight and bias are computed during the forward pass from one
logits buffer, reused across steps, that is turned into the softmax in place; backward only
scales them. The same FLOPs, a few memory passes instead of ~10, ~1.2 GB less peak memory at the
scifi shapes. Loss and gradients equal the textbook path up to float rounding (tests check it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.constants import IGNORE_INDEX

# One logits buffer per (device, dtype), kept between training steps: a fresh 410 MB tensor
# costs more in page faults than the softmax over it. Only the forward pass writes it, and
# nothing in it is kept for backward.
_workspace: dict[tuple[str, torch.dtype], torch.Tensor] = {}
_SMALLEST = 1e-30  # fp32 probabilities below this lose precision (subnormals start ~1e-38)


def _logits_buffer(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    compiling = getattr(torch, "compiler", None) and torch.compiler.is_compiling()
    if compiling:
        return torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    key = (str(like.device), like.dtype)
    buffer = _workspace.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        _workspace.pop(key, None)
        buffer = torch.empty(rows * cols, dtype=like.dtype, device=like.device)
        _workspace[key] = buffer
    return buffer[:rows * cols].view(rows, cols)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        xc, wc = x.to(dtype), weight.to(dtype)
        buffer = _logits_buffer(x.shape[0], weight.shape[0], xc)
        if bias is None:
            logits = torch.mm(xc, wc.t(), out=buffer)
        else:
            logits = torch.addmm(bias.to(dtype), xc, wc.t(), out=buffer)
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        safe = targets.clamp(min=0)
        picked = logits[rows, safe].float()
        # softmax in place (row by row: each x[i] is read before it is overwritten), and the
        # log-sum-exp from it without another pass over the logits, from a probability whose
        # log is exact enough: p = exp(logit - lse), so lse = logit - log p.
        # fp32: the target's p. A target more than ~87 below its row's largest logit underflows
        # to p = 0; those rows (rare: a loss above 87) get their log-sum-exp from their logits
        # again. bf16 rounds p, badly for small ones, so there the row's largest logit is used
        # (its p never underflows; the loss is then within 0.002 of fp32 arithmetic).
        top = logits.amax(dim=1) if dtype != torch.float32 else None
        probs = torch.softmax(logits, dim=1, out=logits)
        if top is not None:  # p at the largest logit is the row's largest p
            lse = top.float() - probs.amax(dim=1).float().log()
        else:
            p_target = probs[rows, safe]
            lse = picked - p_target.log()
            lost = (p_target < _SMALLEST).nonzero().flatten()
            if lost.numel():
                again = xc[lost] @ wc.t()
                if bias is not None:
                    again += bias
                lse[lost] = torch.logsumexp(again, dim=1)
        denom = count.clamp(min=1).float()  # all ignored: loss 0, not the textbook 0/0
        loss = torch.where(valid, lse - picked, 0.0).sum() / denom
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grads: list[torch.Tensor | None] = [None, None, None]
        if need_x or need_w or (need_b and bias is not None):
            # d loss / d logits = (softmax - onehot(target)) * valid / count; the row scale is
            # folded into the small operands instead of a pass over the logits.
            probs[rows, safe] -= 1.0
            scale = (valid.float() / denom).to(dtype)
            if need_x:
                grads[0] = (probs @ wc).mul_(scale.unsqueeze(1)).to(x.dtype)
            if need_w:
                grads[1] = (probs.t() @ (xc * scale.unsqueeze(1))).to(weight.dtype)
            if need_b and bias is not None:
                grads[2] = (scale @ probs).to(bias.dtype)
        # Results, not inputs: kept on ctx and released in backward, so autograd can adopt
        # them as .grad without a copy.
        ctx.grads = grads
        return loss

    # Out of torch.compile's reach: dynamo, tracing the backward to put the whole function in a
    # graph, would break at float(grad_out) with a warning on every run; this way it runs the
    # function as written (it is fused by hand already). Disabling the whole function instead
    # crashed compiled bf16 training in torch 2.13 (a corrupt view replayed after the break).
    @staticmethod
    @torch.compiler.disable
    def backward(ctx, grad_out: torch.Tensor):
        grads, ctx.grads = ctx.grads, None
        # An upstream gradient of exactly 1 (no accumulation scaling) needs no 205 MB multiply.
        if not (grad_out.device.type == "cpu" and float(grad_out) == 1.0):
            grads = [g * grad_out if g is not None else None for g in grads]
        gx, gw, gb = grads
        del grads
        return gx, gw, gb, None, None


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The textbook loss: mean cross-entropy over the targets that are not IGNORE_INDEX, in fp32;
    0 rather than NaN when there are none (a batch of prompts only), still a function of the
    logits, so that every parameter gets its (zero) gradient and DDP stays in step."""
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat != IGNORE_INDEX).sum().clamp(min=1)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T + bias` against `targets` (IGNORE_INDEX skipped).

    x: (N, d), weight: (V, d), bias: (V,) or None, targets: (N,) int64. CPU only: elsewhere
    in-place softmax is not promised, and `GPT` keeps the textbook path. Under bf16 autocast the
    logits and their gradient are bf16 and the loss fp32, as autocast's own path computes them.
    """
    dtype = x.dtype
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    with torch.autocast("cpu", enabled=False):
        if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or (
                bias is not None and bias.requires_grad)):
            with torch.no_grad():
                return _LinearCrossEntropy.forward(_NoGradCtx(), x, weight, bias, targets, dtype)
        return _LinearCrossEntropy.apply(x, weight, bias, targets, dtype)


class _NoGradCtx:
    needs_input_grad = (False, False, False, False)

    grads: list | None = None


class FusedLoss(nn.Module):
    """A GPT whose training forward fuses the output layer with the loss where it can.

    The trainer opts in by wrapping its model (DDP and torch.compile wrap this in turn);
    `forward(x, y)` returns `(None, loss)`: fused on the CPU in fp32 or bf16 autocast, the
    model's own output layer and `mean_cross_entropy` elsewhere (off the CPU, under fp16
    autocast, or when the output layer is adapted by LoRA). The logits are never returned:
    under torch.compile an output that backward does not use still gets a gradient, a
    zero-filled tensor the size of the logits (2.5 GB a step at batch 96 x 128 in bf16).
    The attribute is called `module` so `llmcli.checkpoint.unwrap` finds the GPT inside.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def fusable(self, x: torch.Tensor) -> bool:
        head = self.module.lm_head
        if type(head) is not nn.Linear or x.device.type != "cpu":
            return False
        if torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu") == torch.bfloat16
        return x.dtype == torch.float32

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        h = self.module.hidden(idx)
        if not self.fusable(h):
            return None, self.module.head(h, targets)[1]
        head = self.module.lm_head
        return None, linear_cross_entropy(h.reshape(-1, h.size(-1)), head.weight, head.bias,
                                          targets.reshape(-1))
