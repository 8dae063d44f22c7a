"""The output layer and cross-entropy in one step, for training with a large vocabulary.

With cl100k's 100K ids the logits of a batch are huge (8 x 128 tokens -> 410 MB in fp32), and
the textbook path (`linear` -> `cross_entropy`) writes them, a log-softmax copy, a zero-filled
gradient and a log-softmax gradient: four fresh buffers and as many passes over memory. Here the
gradients of the input, weight and bias are computed during the forward pass from one logits
buffer that is turned into the softmax in place; backward only scales them. Same FLOPs, fewer
memory passes, ~1.2 GB less peak memory at the scifi shapes. Loss and gradients equal the
textbook path up to float rounding (tests check this).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        logits = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        safe = targets.clamp(min=0)
        lse = torch.logsumexp(logits, dim=1)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
        # An all-ignored batch has no loss (0, not the 0/0 NaN of the textbook path).
        denom = count.clamp(min=1).to(logits.dtype)
        loss = torch.where(valid, lse - picked, 0.0).sum() / denom
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grads: list[torch.Tensor | None] = [None, None, None]
        if need_x or need_w or need_b:
            # d loss / d logits = (softmax - onehot(target)) * valid / count, built in place.
            if logits.device.type == "cpu":  # row by row: reading x[i] before writing it
                probs = torch.softmax(logits, dim=1, out=logits)
            else:  # elsewhere in-place softmax is not promised; two in-place passes are
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
            rows = torch.arange(len(safe), device=safe.device)
            probs[rows, safe] -= 1.0
            scale = valid.to(logits.dtype) / denom  # folded into the small operands below
            if need_x:
                grads[0] = (probs @ weight).mul_(scale.unsqueeze(1))
            if need_w:
                grads[1] = probs.t() @ (x * scale.unsqueeze(1))
            if need_b and bias is not None:
                grads[2] = scale @ probs
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.present = [g is not None for g in grads]
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out = []
        for g, present in zip(ctx.saved_tensors, ctx.present, strict=True):
            out.append(g * grad_out if present else None)
        return out[0], out[1], out[2], None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T + bias` against `targets` (IGNORE_INDEX skipped).

    x: (N, d), weight: (V, d), bias: (V,) or None, targets: (N,) int64.
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad)):
        with torch.no_grad():
            return _LinearCrossEntropy.forward(_NoGradCtx(), x, weight, bias, targets)
    return _LinearCrossEntropy.apply(x, weight, bias, targets)


class _NoGradCtx:
    needs_input_grad = (False, False, False, False)

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass
