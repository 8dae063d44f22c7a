"""The decoder-only transformer, in the recipe's terms.

The defaults are the seed's architecture exactly (pre-norm blocks, Q/K/V without bias, output
projection and FFN with bias, ReLU FFN 4x, final LayerNorm, untied output layer with bias,
sinusoidal positions, dropout on attention weights, attention output and FFN output); the recipe
switches on the modern variants (RoPE, learned positions, RMSNorm, GELU/SwiGLU, tying, no bias).

Q, K and V live in one fused Linear(d, 3d): the same parameters as the seed's three bias-free
projections, one matmul instead of three (or of the seed's per-head loops). Attention goes through
`scaled_dot_product_attention`, so GPUs get fused kernels; `reference_attention` spells out the
seed's steps (scores, -inf mask, softmax, weights @ V), gives the same result (tests check it),
and is what `GPT.attention_mode("reference")` switches to when the weights are to be looked at.

Speed-ups that are not the model's maths live elsewhere and are opted into: the fused output
layer + loss for training (`llmcli.model.loss.FusedLoss`) and oneDNN matrix-vector products for
decoding on CPU (`llmcli.model.fast_decode`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.model.loss import mean_cross_entropy
from llmcli.recipe import ModelConfig


def check_resolved(cfg: ModelConfig) -> ModelConfig:
    if cfg.vocab_size == "auto":
        raise ValueError("model.vocab_size is 'auto': resolve it from the corpus before building")
    return cfg


class KVCache:
    """Keys and values of every block for the tokens seen so far, preallocated to max_len.

    `length` counts cached positions; the model advances it after each forward. Beam search
    calls `reorder` to follow the surviving beams.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        max_len = max_len or cfg.context_length
        head_dim = cfg.d_model // cfg.num_heads
        shape = (cfg.num_blocks, batch_size, cfg.num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def crop(self, length: int) -> None:
        """Forget positions from `length` on (they will be overwritten)."""
        self.length = min(self.length, length)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = Dropout(cfg.dropout)
        self.reference = False  # the seed's explicit steps instead of SDPA
        self.weights: torch.Tensor | None = None  # (B, heads, T, S) after a reference forward

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            cache.k[layer, :, :, past:past + T] = k
            cache.v[layer, :, :, past:past + T] = v
            k = cache.k[layer, :, :, :past + T]
            v = cache.v[layer, :, :, :past + T]
        dropout = self.dropout if self.training else 0.0
        if self.reference:
            y, self.weights = reference_attention(q, k, v, past, dropout, self.training)
        elif (past == 0 and T > 1 and x.device.type == "cpu"
              and (dropout > 0 or q.dtype == torch.bfloat16)):
            # CPU training with dropout or in bf16: SDPA falls back to its unfused maths there,
            # and these same steps with the faster dropout mask are 1.2-1.6x quicker.
            y, _ = reference_attention(q, k, v, 0, dropout, self.training)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # several new tokens after a cached prefix: causal within the new block
            rows = torch.arange(T, device=x.device).unsqueeze(1) + past
            mask = torch.arange(past + T, device=x.device).unsqueeze(0) <= rows
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int = 0,
                        dropout: float = 0.0, training: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's attention, step by step: (output, attention weights).

    q: (B, heads, T, head_dim) for the new positions past..past+T-1; k, v: (B, heads, S, ...)
    for positions 0..S-1. Query i may look at keys up to position past + i.
    """
    T, S = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(diagonal=past + 1)
    scores = scores.masked_fill(future, float("-inf"))
    weights = F.softmax(scores, dim=-1)  # bf16 scores: accumulated in fp32 all the same
    return fast_dropout(weights, dropout, training) @ v, weights


MASK_LEVELS = 32768  # the fast CPU mask compares 15-bit random integers with a threshold
MASK_TOLERANCE = 0.01  # the largest relative error in the drop or keep rate it may make


def mask_threshold(p: float) -> int | None:
    """The 15-bit threshold `fast_dropout` draws its mask with for rate `p`, or None when the
    nearest multiple of 2^-15 is more than 1% off the drop or the keep rate (p below ~0.0015
    or above ~0.9985): rounding 0.99999 to 1 kept nothing and divided by zero, rounding 1e-5
    to 0 dropped nothing. Every rate in between keeps its threshold, and so its masks."""
    drop = round(p * MASK_LEVELS)
    error = abs(drop - p * MASK_LEVELS)
    return drop if error <= MASK_TOLERANCE * min(p, 1.0 - p) * MASK_LEVELS else None


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout. On CPU the mask comes from 15-bit random integers (p rounded to a
    multiple of 2^-15), four drawn per 64-bit random number, instead of `bernoulli_`: the same
    statistics, about 2x faster forward and backward, a noticeable share of a training step
    at dropout 0.1. Rates 15 bits cannot represent (`mask_threshold`) and torch.compile take
    F.dropout, which is exact, and which inductor fuses with its neighbours (these steps
    would break the graph: dynamo cannot trace the dtype view)."""
    if not training or p == 0.0:
        return x
    drop = mask_threshold(p) if p < 1.0 else None
    if x.device.type != "cpu" or drop is None or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n]
    keep = bits.bitwise_and_(0x7FFF).view(x.shape) >= drop
    return x * (keep.to(x.dtype) * (MASK_LEVELS / (MASK_LEVELS - drop)))


class Dropout(nn.Dropout):
    """nn.Dropout through `fast_dropout` (its faster CPU mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ffn_width
        self.swiglu = cfg.activation == "swiglu"
        self.fc_in = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        if self.swiglu:
            self.fc_gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(approximate="tanh"),
                    "swiglu": nn.SiLU()}[cfg.activation]
        self.fc_out = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc_gate(x)) * self.fc_in(x) if self.swiglu else self.act(self.fc_in(x))
        return self.dropout(self.fc_out(h))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache, layer)
        return x + self.ffn(self.norm2(x))


def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), the seed's table."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    even = torch.arange(0, d_model, 2, dtype=torch.float32)
    div = torch.exp(even * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: d_model // 2])
    return table


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position's angle; cos/sin are (T, head_dim/2)."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = check_resolved(cfg)
        vocab = int(cfg.vocab_size)
        self.tok_emb = nn.Embedding(vocab, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.context_length, cfg.d_model),
                                 persistent=False)
        else:
            cos, sin = rope_tables(cfg.context_length, cfg.d_model // cfg.num_heads,
                                   cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, vocab, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The recipe's init: GPT-2's (N(0, init_std), residual projections scaled by
        1/sqrt(2L), zero biases) or the seed's (each layer's PyTorch default)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if self.cfg.init == "seed":
                if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
                    module.reset_parameters()
            elif isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.num_blocks)
                residual = name.endswith(("attn.proj", "ffn.fc_out"))
                nn.init.normal_(module.weight, 0.0, std * scale if residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for each position (or only the last), and the mean loss when given targets.

        With a cache, `idx` holds only the new tokens; their positions continue from
        `cache.length`, and the cache advances by `idx.shape[1]`.
        """
        x = self.hidden(idx, cache)
        if last_only and targets is None:
            x = x[:, -1:]
        return self.head(x, targets)

    def head(self, x: torch.Tensor,
             targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output layer on the residual stream, and the mean cross-entropy when given targets
        (targets equal to IGNORE_INDEX add nothing; none at all give 0)."""
        logits = self.lm_head(x)
        return logits, None if targets is None else mean_cross_entropy(logits, targets)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None,
               keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The final-normed residual stream (B, T, d_model), the output layer's input.

        `keep`, when given, receives the residual stream after the embeddings and after each
        block (the logit lens reads these).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length "
                             f"{self.cfg.context_length}")
        x = self.tok_emb(idx)
        rope = None
        if self.cfg.positions == "sinusoidal":
            x = x + self.pos_table[start:start + T].to(x.dtype)
        elif self.cfg.positions == "learned":
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        if keep is not None:
            keep.append(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
            if keep is not None:
                keep.append(x)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)

    def attention_mode(self, mode: str) -> None:
        """'sdpa' (fused kernels) or 'reference' (the seed's steps; keeps the weights)."""
        if mode not in ("sdpa", "reference"):
            raise ValueError(f"attention mode {mode!r}: use 'sdpa' or 'reference'")
        for block in self.blocks:
            block.attn.reference = mode == "reference"
            block.attn.weights = None

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(
            p.device.type) else p.dtype
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=dtype)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> GPT:
    """Build on any device, `meta` included (instant and memory-free, for counting)."""
    with torch.device(device):
        return GPT(check_resolved(cfg))


def with_vocab(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    return dataclasses.replace(cfg, vocab_size=vocab_size)
