"""Counting a model: parameters by part, memory for training, FLOPs per token.

Everything here works on a model built on the `meta` device, so counting a billion-parameter
recipe takes no memory and no time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmcli.recipe import ModelConfig


@dataclass
class Part:
    name: str
    params: int
    repeat: int = 1  # shown once with "x repeat" (the blocks)
    children: list[Part] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.params * self.repeat


def unique_parameters(named: Any) -> dict[str, Any]:
    """name -> tensor with shared (tied) tensors counted once."""
    seen: set[int] = set()
    out = {}
    for name, tensor in named:
        key = id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def named_counts(model: Any) -> dict[str, int]:
    """Parameter name -> element count, tied tensors once (works on the meta device)."""
    return {n: p.numel() for n, p in unique_parameters(model.named_parameters()).items()}


def breakdown(cfg: ModelConfig, counts: dict[str, int]) -> list[Part]:
    """Parameters by part, in the order data flows through them.

    `counts` maps tensor names to sizes: from a model (`named_counts`) or from the tensors
    stored in a checkpoint, which is how `llm params CHECKPOINT` counts what is really there.
    """

    def total(prefix: str) -> int:
        return sum(n for name, n in counts.items() if name.startswith(prefix))

    blocks = [Part(f"block {i}", total(f"blocks.{i}.")) for i in range(cfg.num_blocks)]
    per_block = blocks[0].params if blocks else 0
    uniform = all(b.params == per_block for b in blocks)
    block = Part("transformer block", per_block, repeat=cfg.num_blocks, children=[
        Part("attention (qkv + output)", total("blocks.0.attn.")),
        Part("feed-forward", total("blocks.0.ffn.")),
        Part("norms", total("blocks.0.norm1.") + total("blocks.0.norm2.")),
    ]) if uniform else Part("transformer blocks", total("blocks."), children=blocks)
    head = "output layer" + (" (tied to the embedding)" if cfg.tie_embeddings else "")
    parts = [
        Part("token embedding", total("tok_emb.")),
        Part(f"positions ({cfg.positions})", total("pos_emb.")),
        block,
        Part("final norm", total("norm.")),
        Part(head, total("lm_head.")),
    ]
    known = sum(p.total for p in parts)
    other = sum(counts.values()) - known
    if other:  # adapters or tensors this version does not know about: shown, never hidden
        parts.append(Part("other tensors", other))
    return parts


def count_parameters(model: Any) -> tuple[int, int]:
    """(total, trainable), each shared tensor counted once."""
    params = unique_parameters(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return total, trainable


def flops_per_token(model: Any, context_length: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls plus the attention term 12·L·d·T.

    N excludes the embedding lookup (no multiply) but includes the output layer; this is the
    PaLM/nanoGPT convention used for model FLOPs utilisation.
    """
    cfg: ModelConfig = model.cfg
    n = matmul_parameters(model)
    T = context_length or cfg.context_length
    return 6.0 * n + 12.0 * cfg.num_blocks * cfg.d_model * T


def matmul_parameters(model: Any) -> int:
    """Parameters that take part in a matrix multiply (weights of Linear layers)."""
    import torch

    params = unique_parameters(
        (f"{mod_name}.{n}", p)
        for mod_name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
        for n, p in module.named_parameters(recurse=False) if n == "weight"
    )
    return sum(p.numel() for p in params.values())


def formula_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """The parameter count from the recipe alone, in pure Python (no torch: `llm scaling`).

    Mirrors `GPT`'s layers one for one; tests check it against the built model for every option.
    """
    V = int(vocab_size if vocab_size is not None else cfg.vocab_size)
    d, L = cfg.d_model, cfg.num_blocks
    b = 1 if cfg.bias else 0
    norm = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attn = 3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + b * d
    mats = 3 if cfg.activation == "swiglu" else 2
    hidden = cfg.ffn_width
    ffn = mats * d * hidden + b * ((mats - 1) * hidden + d)
    block = attn + ffn + 2 * norm
    emb = V * d
    pos = cfg.context_length * d if cfg.positions == "learned" else 0
    head = (0 if cfg.tie_embeddings else V * d) + (V if cfg.head_bias else 0)
    return emb + pos + L * block + norm + head


AUTOCAST_NOTE = "every train.precision keeps these in fp32: bf16 and fp16 autocast the compute"


def training_memory(total: int, trainable: int) -> dict[str, dict[str, int]]:
    """Bytes for weights, gradients and AdamW's two moments as llm trains (activations aside).

    One entry, "fp32", whatever train.precision says: bf16 and fp16 are autocast over fp32
    weights, so gradients and moments stay fp32 too (16 bytes per trained parameter); a
    trainer holding bf16 weights would need less, but that is not how llm trains.
    """
    return {
        "fp32": {"weights": 4 * total, "gradients": 4 * trainable, "adamw": 8 * trainable},
    }
