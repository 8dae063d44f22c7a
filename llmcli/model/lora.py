"""LoRA: low-rank adapters beside the frozen projections of a GPT (Hu et al., 2021).

An adapted layer computes `W x + b + (alpha / rank) · B A dropout(x)` with A (rank × in) and
B (out × rank); B starts at zero, so at step 0 the model is exactly the base model. Only A and B
train, and an adapter file holds only them.

Why not PEFT (installed): its `inject_adapter_in_model` does fit our nn.Linear layers, but it
renames every adapted base weight (`attn.qkv.weight` → `attn.qkv.base_layer.weight`), so the
model no longer loads plain checkpoints; it imports transformers (about 2.7 s more per command);
and it saves adapters as a directory with a JSON config instead of one safetensors file with our
metadata. `LoRALinear` below subclasses nn.Linear and keeps `weight`/`bias` where they were, so
base checkpoints load unchanged and the adapter tensors are simply the `lora_A`/`lora_B` keys.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmcli.recipe import LoraConfig

# recipe target -> the Linear layers it adapts (inside each block, or the output layer)
TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.qkv",),
    "proj": ("attn.proj",),
    "ffn_in": ("ffn.fc_in", "ffn.fc_gate"),  # fc_gate exists only with swiglu
    "ffn_out": ("ffn.fc_out",),
    "head": ("lm_head",),  # lets the output distribution move (new tokens, new frequencies)
}


class LoRALinear(nn.Linear):
    """A Linear layer with a trainable low-rank update; `weight` and `bias` are the base's own."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # take over base's tensors instead of allocating new ones
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        # Scale the rank-sized middle, not the wide output, and let one addmm add the update:
        # for the output layer (out = vocabulary) that saves two passes over the logits.
        low = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling
        flat = torch.addmm(out.reshape(-1, self.out_features), low.reshape(-1, self.rank),
                           self.lora_B.t())
        return flat.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear whose weight includes the update (exact up to rounding)."""
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           **factory)
        with torch.no_grad():
            linear.weight.copy_(self.weight.float() + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def target_layers(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the Linear layers that `targets` (recipe names) select, in model order."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {', '.join(TARGETS)}")
    suffixes = tuple(s for t in targets if t != "head" for s in TARGETS[t])
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.startswith("blocks.") and suffixes
             and name.endswith(suffixes)]
    if "head" in targets:
        emb = getattr(model, "tok_emb", None)
        if emb is not None and model.get_submodule("lm_head").weight is emb.weight:
            raise ValueError("LoRA target 'head' cannot adapt an output layer tied to the "
                             "token embedding; drop 'head' from lora.targets")
        names.append("lm_head")
    return names


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze every base parameter and put adapters on the target layers; returns their names."""
    if cfg.rank <= 0:
        raise ValueError("lora.rank is 0: that means full fine-tuning, not LoRA")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge them first")
    names = target_layers(model, list(cfg.targets))
    if not names:
        raise ValueError(f"lora.targets {cfg.targets} match no layer of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        adapted = LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout)
        setattr(parent, child, adapted.train(base.training))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving plain Linear layers (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, child = _parent(model, name)
            setattr(parent, child, module.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (what an adapter file holds)."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.endswith((".lora_A", ".lora_B"))}


def load_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an adapted model; every key must match, shapes and float
    dtypes included."""
    own = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ValueError(f"adapter tensors do not match the model's LoRA layers ({problem})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():  # copy_ would cast the bits silently
                raise ValueError(f"adapter tensor {name} is {tensor.dtype}, not floating-point")
            if own[name].shape != tensor.shape:
                raise ValueError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(own[name].shape)}")
            own[name].copy_(tensor)


def lora_meta(cfg: LoraConfig) -> dict[str, Any]:
    """The adapter's configuration as stored in its file's metadata ("lora")."""
    return {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "targets": list(cfg.targets)}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return model.get_submodule(path), child
