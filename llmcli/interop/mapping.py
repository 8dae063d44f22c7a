"""llm's model ↔ transformers' GPT-2 and Llama: which recipes map, their configs, tensor names.

Two transformers classes cover the recipes that have an exact equivalent:

    recipe (model.*)                                     transformers class
    norm layernorm, activation gelu or relu,             GPT2LMHeadModel
      positions learned or sinusoidal (as a wpe table)
    norm rmsnorm, activation swiglu, positions rope      LlamaForCausalLM

and neither has an output-layer bias (`model.output_bias` must be false). Biases GPT-2 always has
but a recipe left out are written as zeros (the same function); Llama's `attention_bias` and
`mlp_bias` follow `qkv_bias` and `bias`.

Tensor names, ours → transformers (i = block; GPT-2's Conv1D weights are stored transposed):

    ours                      GPT2LMHeadModel                 LlamaForCausalLM
    tok_emb                   transformer.wte                 model.embed_tokens
    pos_emb (or pos_table)    transformer.wpe                 -
    blocks.i.norm1            transformer.h.i.ln_1            model.layers.i.input_layernorm
    blocks.i.attn.qkv         transformer.h.i.attn.c_attn     self_attn.q_proj, k_proj, v_proj
    blocks.i.attn.proj        transformer.h.i.attn.c_proj     self_attn.o_proj
    blocks.i.norm2            transformer.h.i.ln_2            post_attention_layernorm
    blocks.i.ffn.fc_in        transformer.h.i.mlp.c_fc        mlp.up_proj
    blocks.i.ffn.fc_gate      -                               mlp.gate_proj
    blocks.i.ffn.fc_out       transformer.h.i.mlp.c_proj      mlp.down_proj
    norm                      transformer.ln_f                model.norm
    lm_head                   lm_head (absent when tied)      lm_head (absent when tied)

RoPE: ours rotates interleaved pairs (x[2i], x[2i+1]); transformers' Llama rotates halves
(x[i], x[i + head_dim/2]). The same frequency i applies to both members of a pair, so the
rows of q and k are permuted within each head on the way out (and back on the way in).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from llmcli.console import fail
from llmcli.recipe import ModelConfig

GPT2 = "GPT2LMHeadModel"
LLAMA = "LlamaForCausalLM"
MODEL_TYPES = {GPT2: "gpt2", LLAMA: "llama"}
GPT2_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu"}  # gelu_new is tanh-approximate, as ours
GPT2_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
EXPORTABLE = ("GPT2LMHeadModel (model.norm=layernorm, model.activation=gelu or relu, "
              "model.positions=learned or sinusoidal) or LlamaForCausalLM (model.positions=rope, "
              "model.norm=rmsnorm, model.activation=swiglu)")


# ---------------------------------------------------------------------------------------------
# Which class


def export_class(cfg: ModelConfig, where: str = "checkpoint") -> str:
    """GPT2LMHeadModel or LlamaForCausalLM for this model, or a one-line error naming the keys
    that would make the recipe exportable."""
    if cfg.head_bias:
        key = "model.output_bias" if cfg.output_bias is True else "model.bias (output_bias: auto)"
        fail(f"{where}: no transformers class has an output-layer bias, and this model has one "
             f"({key} is true); to export, train with model.output_bias=false and the keys of "
             f"{EXPORTABLE}")
    llama = {"positions": "rope", "norm": "rmsnorm", "activation": "swiglu"}
    if cfg.norm == "layernorm" and cfg.activation in GPT2_ACTIVATIONS and cfg.positions != "rope":
        return GPT2
    if all(getattr(cfg, key) == value for key, value in llama.items()):
        return LLAMA
    have = f"positions={cfg.positions}, norm={cfg.norm}, activation={cfg.activation}"
    fail(f"{where}: no transformers class computes this model ({have}); exportable recipes are "
         f"{EXPORTABLE}, with model.output_bias=false")


def head_dim(cfg: ModelConfig) -> int:
    return cfg.d_model // cfg.num_heads


# ---------------------------------------------------------------------------------------------
# Configs


def hf_config(cfg: ModelConfig, cls: str, *, bos_id: int | None, eos_id: int | None,
              dtype: str = "float32") -> Any:
    """The transformers config object for `cls` that rebuilds this model."""
    common = {"vocab_size": int(cfg.vocab_size), "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "pad_token_id": None, "architectures": [cls], "dtype": dtype}
    if cls == GPT2:
        from transformers import GPT2Config

        return GPT2Config(
            n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.num_blocks,
            n_head=cfg.num_heads, n_inner=cfg.ffn_width,
            activation_function=GPT2_ACTIVATIONS[cfg.activation], resid_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, embd_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps, **common)
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=cfg.d_model, intermediate_size=cfg.ffn_width,
        num_hidden_layers=cfg.num_blocks, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, head_dim=head_dim(cfg), hidden_act="silu",
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias or cfg.qkv_bias, mlp_bias=cfg.bias,
        attention_dropout=cfg.dropout, **common)


def import_class(config: Mapping[str, Any], where: str) -> str:
    """The supported class a transformers config.json describes, or a one-line error naming it."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for cls, kind in MODEL_TYPES.items():
        if cls in archs or (not archs and model_type == kind):
            return cls
    if model_type in MODEL_TYPES.values() and archs:
        named = f"{', '.join(map(str, archs))} (model_type {model_type})"
    else:
        named = ", ".join(map(str, archs)) or f"model_type {model_type!r}"
    fail(f"{where}: architecture {named} is not supported; llm imports {GPT2} and {LLAMA} "
         "checkpoints")


def model_keys(config: Mapping[str, Any], cls: str, where: str) -> dict[str, Any]:
    """The recipe's `model` section that rebuilds the checkpoint `config` describes."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            fail(f"{where}: {what}, which llm's model does not have; it cannot be imported")

    get = config.get
    if cls == GPT2:
        act = get("activation_function", "gelu_new")
        need(act in GPT2_FROM_HF, f"activation_function is {act!r}")
        need(get("scale_attn_weights", True), "attention scores are not scaled (scale_attn_weights "
             "false)")
        need(not get("scale_attn_by_inverse_layer_idx", False), "attention scores are scaled by "
             "layer (scale_attn_by_inverse_layer_idx)")
        need(not get("add_cross_attention", False), "it has cross-attention")
        d_model = int(get("n_embd", 768))
        return {
            "vocab_size": int(get("vocab_size", 50257)),
            "context_length": int(get("n_positions", 1024)),
            "d_model": d_model, "num_blocks": int(get("n_layer", 12)),
            "num_heads": int(get("n_head", 12)),
            "dropout": float(get("resid_pdrop", 0.1)),
            "positions": "learned", "norm": "layernorm", "activation": GPT2_FROM_HF[act],
            "ffn_hidden": int(get("n_inner") or 4 * d_model),
            "bias": True, "qkv_bias": True, "output_bias": False,
            "tie_embeddings": bool(get("tie_word_embeddings", True)),
            "norm_eps": float(get("layer_norm_epsilon", 1e-5)),
            "init_std": float(get("initializer_range", 0.02)),
        }
    heads = int(get("num_attention_heads", 32))
    hidden = int(get("hidden_size", 4096))
    kv = get("num_key_value_heads") or heads
    need(kv == heads, f"it shares keys and values between heads (grouped-query attention: "
         f"num_key_value_heads {kv} < num_attention_heads {heads})")
    act = get("hidden_act", "silu")
    need(act in ("silu", "swish"), f"hidden_act is {act!r} (a SwiGLU model needs silu)")
    need(hidden % heads == 0 and (get("head_dim") or hidden // heads) == hidden // heads,
         f"head_dim {get('head_dim')} is not hidden_size / num_attention_heads")
    rope = dict(get("rope_parameters") or {})
    scaling = get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    need(kind == "default", f"RoPE is scaled (rope_type {kind!r})")
    theta = rope.get("rope_theta", get("rope_theta", 10000.0))
    attention_bias, mlp_bias = bool(get("attention_bias", False)), bool(get("mlp_bias", False))
    return {
        "vocab_size": int(get("vocab_size", 32000)),
        "context_length": int(get("max_position_embeddings", 2048)),
        "d_model": hidden, "num_blocks": int(get("num_hidden_layers", 32)), "num_heads": heads,
        "dropout": float(get("attention_dropout", 0.0)),
        "positions": "rope", "norm": "rmsnorm", "activation": "swiglu",
        "ffn_hidden": int(get("intermediate_size", 11008)),
        "bias": attention_bias or mlp_bias, "qkv_bias": attention_bias, "output_bias": False,
        "tie_embeddings": bool(get("tie_word_embeddings", False)),
        "norm_eps": float(get("rms_norm_eps", 1e-6)), "rope_theta": float(theta),
        "init_std": float(get("initializer_range", 0.02)),
    }


# ---------------------------------------------------------------------------------------------
# Tensors


def rope_order(cfg: ModelConfig) -> torch.Tensor:
    """Row order within a head: transformers' row j is our row rope_order[j]."""
    hd = head_dim(cfg)
    return torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))


def _per_head(t: torch.Tensor, cfg: ModelConfig, order: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of a q or k weight (d, d) or bias (d,) within each head."""
    shaped = t.reshape(cfg.num_heads, head_dim(cfg), *t.shape[1:])
    return shaped[:, order].reshape(t.shape)


def to_hf(model: Any, cls: str) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names (tied output weight left out)."""
    cfg = model.cfg
    d = cfg.d_model
    sd = {k: v.detach() for k, v in model.state_dict().items()}

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=sd["tok_emb.weight"].dtype)

    def bias(name: str, n: int) -> torch.Tensor:
        return sd[name] if name in sd else zeros(n)

    out: dict[str, torch.Tensor] = {}
    if cls == GPT2:
        pos = sd.get("pos_emb.weight")
        if pos is None:  # sinusoidal: the fixed table becomes GPT-2's position embedding
            pos = model.pos_table.detach().to(sd["tok_emb.weight"].dtype)
        out["transformer.wte.weight"] = sd["tok_emb.weight"]
        out["transformer.wpe.weight"] = pos
        for i in range(cfg.num_blocks):
            ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{hf}{b}.weight"] = sd[f"{ours}{a}.weight"]
                out[f"{hf}{b}.bias"] = bias(f"{ours}{a}.bias", d)
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                         ("ffn.fc_in", "mlp.c_fc"), ("ffn.fc_out", "mlp.c_proj")):
                weight = sd[f"{ours}{a}.weight"]
                out[f"{hf}{b}.weight"] = weight.t()  # Conv1D: (in, out)
                out[f"{hf}{b}.bias"] = bias(f"{ours}{a}.bias", weight.shape[0])
        out["transformer.ln_f.weight"] = sd["norm.weight"]
        out["transformer.ln_f.bias"] = bias("norm.bias", d)
    else:
        order = rope_order(cfg)
        attention_bias = cfg.bias or cfg.qkv_bias
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(cfg.num_blocks):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            out[f"{hf}input_layernorm.weight"] = sd[f"{ours}norm1.weight"]
            out[f"{hf}post_attention_layernorm.weight"] = sd[f"{ours}norm2.weight"]
            qkv = sd[f"{ours}attn.qkv.weight"]
            qkv_b = bias(f"{ours}attn.qkv.bias", 3 * d)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                w, b = qkv[j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d]
                if name != "v_proj":
                    w, b = _per_head(w, cfg, order), _per_head(b, cfg, order)
                out[f"{hf}self_attn.{name}.weight"] = w
                if attention_bias:
                    out[f"{hf}self_attn.{name}.bias"] = b
            out[f"{hf}self_attn.o_proj.weight"] = sd[f"{ours}attn.proj.weight"]
            if attention_bias:
                out[f"{hf}self_attn.o_proj.bias"] = bias(f"{ours}attn.proj.bias", d)
            for a, b in (("fc_gate", "gate_proj"), ("fc_in", "up_proj"), ("fc_out", "down_proj")):
                out[f"{hf}mlp.{b}.weight"] = sd[f"{ours}ffn.{a}.weight"]
                if cfg.bias:
                    out[f"{hf}mlp.{b}.bias"] = sd[f"{ours}ffn.{a}.bias"]
        out["model.norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks older GPT-2 files hold


def from_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, cls: str,
            where: str) -> dict[str, torch.Tensor]:
    """Our state dict (tied names both present) from a transformers checkpoint's tensors.

    Weights the checkpoint lacks are named in a one-line error; biases that our recipe carries
    but the checkpoint's class left out are zeros. Tensors nothing reads are an error too (a
    different architecture under the same name).
    """
    d = cfg.d_model
    if cls == GPT2:  # GPT2Model files (the hub's gpt2) have no "transformer." prefix
        tensors = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
                   for k, v in tensors.items() if not k.endswith(GPT2_BUFFERS)}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            fail(f"{where}: weight {name} is missing; the checkpoint is incomplete or is not a "
                 f"{cls}")
        used.add(name)
        return tensors[name]

    def maybe(name: str, n: int, like: torch.Tensor) -> torch.Tensor:
        if name in tensors:
            return take(name)
        return torch.zeros(n, dtype=like.dtype)

    sd: dict[str, torch.Tensor] = {}
    if cls == GPT2:
        sd["tok_emb.weight"] = take("transformer.wte.weight")
        sd["pos_emb.weight"] = take("transformer.wpe.weight")
        for i in range(cfg.num_blocks):
            ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                sd[f"{ours}{a}.weight"] = take(f"{hf}{b}.weight")
                sd[f"{ours}{a}.bias"] = take(f"{hf}{b}.bias")
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                         ("ffn.fc_in", "mlp.c_fc"), ("ffn.fc_out", "mlp.c_proj")):
                sd[f"{ours}{a}.weight"] = take(f"{hf}{b}.weight").t()
                sd[f"{ours}{a}.bias"] = take(f"{hf}{b}.bias")
        sd["norm.weight"] = take("transformer.ln_f.weight")
        sd["norm.bias"] = take("transformer.ln_f.bias")
    else:
        inverse = torch.argsort(rope_order(cfg))
        sd["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(cfg.num_blocks):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            sd[f"{ours}norm1.weight"] = take(f"{hf}input_layernorm.weight")
            sd[f"{ours}norm2.weight"] = take(f"{hf}post_attention_layernorm.weight")
            weights, biases = [], []
            for name in ("q_proj", "k_proj", "v_proj"):
                w = take(f"{hf}self_attn.{name}.weight")
                b = maybe(f"{hf}self_attn.{name}.bias", d, w)
                if name != "v_proj":
                    w, b = _per_head(w, cfg, inverse), _per_head(b, cfg, inverse)
                weights.append(w)
                biases.append(b)
            sd[f"{ours}attn.qkv.weight"] = torch.cat(weights)
            if cfg.qkv_bias:
                sd[f"{ours}attn.qkv.bias"] = torch.cat(biases)
            o_proj = take(f"{hf}self_attn.o_proj.weight")
            sd[f"{ours}attn.proj.weight"] = o_proj
            if cfg.bias:
                sd[f"{ours}attn.proj.bias"] = maybe(f"{hf}self_attn.o_proj.bias", d, o_proj)
            for a, b in (("fc_gate", "gate_proj"), ("fc_in", "up_proj"), ("fc_out", "down_proj")):
                w = take(f"{hf}mlp.{b}.weight")
                sd[f"{ours}ffn.{a}.weight"] = w
                if cfg.bias:
                    sd[f"{ours}ffn.{a}.bias"] = maybe(f"{hf}mlp.{b}.bias", w.shape[0], w)
        sd["norm.weight"] = take("model.norm.weight")
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
        used.add("lm_head.weight")  # some files store the tied copy as well
    else:
        sd["lm_head.weight"] = take("lm_head.weight")
    unused = sorted(set(tensors) - used)
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        fail(f"{where}: tensors {shown} have no place in a {cls} as llm reads it; the checkpoint "
             "holds layers llm's model does not have")
    return {k: v.contiguous() for k, v in sd.items()}
