"""llm's model ↔ transformers' GPT-2 and Llama: which recipes map, their configs, tensor names.

Two transformers classes cover the recipes that have an exact equivalent:

    recipe (model.*)                                     transformers class
    norm layernorm, activation gelu or relu,             GPT2LMHeadModel
      positions learned or sinusoidal (as a wpe table)
    norm rmsnorm, activation swiglu, positions rope      LlamaForCausalLM

and neither has an output-layer bias (`model.output_bias` must be false). Biases GPT-2 always has
but a recipe left out are written as zeros (the same function); Llama's `attention_bias` and
`mlp_bias` follow `qkv_bias` and `bias`. The other way, `bias` covers both the attention output
and the feed-forward layers, so a Llama with only one of attention_bias and mlp_bias gets the
other's biases as zeros, which the import counts in a note (`zero_biases`).

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

Importing reads config.json through `ConfigFields`: every key either maps exactly (biases,
tying, n_inner, reorder_and_upcast_attn, which only changes the precision of the scores) or is
refused in one line (scaled RoPE in rope_parameters or the legacy rope_scaling, partial rotary,
a sliding window, grouped-query attention, unscaled or layer-scaled GPT-2 attention, other
activations); a null, mistyped or out-of-range value is a one-line error naming the key.

RoPE: ours rotates interleaved pairs (x[2i], x[2i+1]); transformers' Llama rotates halves
(x[i], x[i + head_dim/2]). The same frequency i applies to both members of a pair, so the
rows of q and k are permuted within each head on the way out (and back on the way in).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NoReturn

import torch

from llmcli.checkpoint import check_float_tensor
from llmcli.console import clip, fail
from llmcli.recipe import LIMITS, Bound, ModelConfig

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
    """The supported class a transformers config.json describes, or a one-line error naming it.

    The class name alone is not enough: a config with `auto_map` (custom modelling code) or
    another model_type runs other code under that name in transformers, and llm never runs
    remote code, so it would silently compute something else."""
    fields = ConfigFields(config, where)
    archs = fields.names("architectures")
    model_type = fields.text("model_type", None)
    if "auto_map" in config:
        fail(f"{where}: auto_map names custom modelling code, which is not transformers' "
             f"{GPT2} or {LLAMA} (llm never runs a checkpoint's own code); it cannot be "
             "imported")
    for cls, kind in MODEL_TYPES.items():
        if cls in archs or (not archs and model_type == kind):
            if model_type not in (None, kind):
                fail(f"{where}: model_type {clip(model_type, 40)!r} is not {kind!r}, the type "
                     f"of transformers' {cls}: it names other modelling code, which llm never "
                     "runs and may compute something else; it cannot be imported")
            return cls
    if model_type in MODEL_TYPES.values() and archs:
        named = f"{', '.join(archs)} (model_type {model_type})"
    else:
        named = ", ".join(archs) or f"model_type {model_type!r}"
    fail(f"{where}: architecture {named} is not supported; llm imports {GPT2} and {LLAMA} "
         "checkpoints")


def _shown(value: Any) -> str:
    """A config value as JSON spells it, with its kind when that is the problem ("32" is a
    string, not a number)."""
    if value is None:
        return "null"
    text = clip(json.dumps(value, ensure_ascii=False), 60)
    kinds = ((bool, "a boolean"), (str, "a string"), (list, "a list"), (dict, "a mapping"))
    kind = next((name for tp, name in kinds if isinstance(value, tp)), None)
    return f"{text} ({kind})" if kind else text


class ConfigFields:
    """Checked reads of a transformers config.json. A missing key takes transformers' default;
    null, a wrong type or a value out of range is a one-line error naming the key and the file,
    because int("32"), bool("false") or float(None) would silently read something else (or
    fail deep inside). Sizes get the recipe's own LIMITS, so what passes here builds."""

    def __init__(self, config: Mapping[str, Any], where: str, prefix: str = "") -> None:
        self.config = config
        self.where = where
        self.prefix = prefix  # "rope_parameters." for a nested mapping

    def bad(self, key: str, value: Any, expected: str) -> NoReturn:
        fail(f"{self.where}: {self.prefix}{key} is {_shown(value)}; expected {expected}")

    def _get(self, key: str, default: Any, nullable: bool, expected: str) -> tuple[bool, Any]:
        """(whether to check the value, the value): absent keys and allowed nulls are not."""
        if key not in self.config:
            return False, default
        value = self.config[key]
        if value is None:
            if not nullable:
                self.bad(key, value, expected)
            return False, default
        return True, value

    def integer(self, key: str, default: int | None, limit: str | Bound, *,
                nullable: bool = False) -> Any:
        """An integer within `limit`: a Bound, or the LIMITS of a recipe key (model.d_model)."""
        bound = LIMITS[limit] if isinstance(limit, str) else limit
        expected = f"an integer in {bound}" + (" or null" if nullable else "")
        check, value = self._get(key, default, nullable, expected)
        if check and (isinstance(value, bool) or not isinstance(value, int)
                      or value not in bound):
            self.bad(key, value, expected)
        return value

    def number(self, key: str, default: float | None, limit: str | Bound, *,
               nullable: bool = False) -> Any:
        """A finite number within `limit` (a LIMITS key or a Bound)."""
        bound = LIMITS[limit] if isinstance(limit, str) else limit
        expected = f"a number in {bound}" + (" or null" if nullable else "")
        check, value = self._get(key, default, nullable, expected)
        if check and (isinstance(value, bool) or not isinstance(value, (int, float))
                      or not math.isfinite(value) or value not in bound):
            self.bad(key, value, expected)
        return float(value) if value is not None else None

    def flag(self, key: str, default: bool) -> bool:
        check, value = self._get(key, default, False, "true or false")
        if check and not isinstance(value, bool):
            self.bad(key, value, "true or false")
        return value

    def text(self, key: str, default: str | None) -> Any:
        """A string; null or absent gives `default`."""
        check, value = self._get(key, default, True, "a string")
        if check and not isinstance(value, str):
            self.bad(key, value, "a string")
        return value

    def names(self, key: str) -> list[str]:
        """A list of strings (architectures); null or absent is empty."""
        check, value = self._get(key, [], True, "a list of strings")
        if check and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            self.bad(key, value, "a list of strings")
        return value

    def mapping(self, key: str) -> ConfigFields:
        """A nested mapping (rope_parameters) read the same way; null or absent is empty."""
        check, value = self._get(key, {}, True, "a mapping or null")
        if check and not isinstance(value, dict):
            self.bad(key, value, "a mapping or null")
        return ConfigFields(value, self.where, f"{self.prefix}{key}.")


UNIT = Bound(0, 1, "(]")  # partial_rotary_factor
WINDOW = Bound(1, 2**31 - 1)  # sliding_window


def model_keys(config: Mapping[str, Any], cls: str, where: str) -> dict[str, Any]:
    """The recipe's `model` section that rebuilds the checkpoint `config` (read from `where`)
    describes. Every key transformers' class reads is checked: each either maps exactly onto
    llm's model or the config is refused in one line, so an import never silently computes
    something other than transformers does."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            fail(f"{where}: {what}, which llm's model does not have; it cannot be imported")

    f = ConfigFields(config, where)
    if cls == GPT2:
        act = f.text("activation_function", "gelu_new")
        need(act in GPT2_FROM_HF, f"activation_function is {act!r}")
        need(f.flag("scale_attn_weights", True), "attention scores are not scaled "
             "(scale_attn_weights false)")
        need(not f.flag("scale_attn_by_inverse_layer_idx", False), "attention scores are scaled "
             "by layer (scale_attn_by_inverse_layer_idx)")
        need(not f.flag("add_cross_attention", False), "it has cross-attention")
        f.flag("reorder_and_upcast_attn", False)  # the precision of the scores only: the same
        d_model = f.integer("n_embd", 768, "model.d_model")
        heads = f.integer("n_head", 12, "model.num_heads")
        divisible(d_model, heads, ("n_embd", "n_head"), where)
        return {
            "vocab_size": f.integer("vocab_size", 50257, "model.vocab_size"),
            "context_length": f.integer("n_positions", 1024, "model.context_length"),
            "d_model": d_model, "num_blocks": f.integer("n_layer", 12, "model.num_blocks"),
            "num_heads": heads,
            "dropout": f.number("resid_pdrop", 0.1, "model.dropout"),
            "positions": "learned", "norm": "layernorm", "activation": GPT2_FROM_HF[act],
            "ffn_hidden": f.integer("n_inner", 4 * d_model, "model.ffn_hidden", nullable=True),
            "bias": True, "qkv_bias": True, "output_bias": False,
            "tie_embeddings": f.flag("tie_word_embeddings", True),
            "norm_eps": f.number("layer_norm_epsilon", 1e-5, "model.norm_eps"),
            "init_std": f.number("initializer_range", 0.02, "model.init_std"),
        }
    heads = f.integer("num_attention_heads", 32, "model.num_heads")
    hidden = f.integer("hidden_size", 4096, "model.d_model")
    context = f.integer("max_position_embeddings", 2048, "model.context_length")
    divisible(hidden, heads, ("hidden_size", "num_attention_heads"), where)
    kv = f.integer("num_key_value_heads", heads, "model.num_heads", nullable=True)
    need(kv >= heads, f"it shares keys and values between heads (grouped-query attention: "
         f"num_key_value_heads {kv} < num_attention_heads {heads})")
    if kv > heads:
        f.bad("num_key_value_heads", kv, f"at most num_attention_heads ({heads})")
    head_dim = f.integer("head_dim", hidden // heads, "model.d_model", nullable=True)
    need(head_dim == hidden // heads, f"head_dim is {head_dim}, not hidden_size / "
         f"num_attention_heads = {hidden // heads} (attention wider or narrower than the model)")
    if head_dim % 2:
        fail(f"{where}: the head size hidden_size / num_attention_heads = {head_dim} is odd, and "
             "RoPE rotates pairs of dimensions; the config is inconsistent (transformers cannot "
             "run it either)")
    act = f.text("hidden_act", "silu")
    need(act in ("silu", "swish"), f"hidden_act is {act!r} (a SwiGLU model needs silu)")
    rope = rope_fields(f)
    theta = rope.number("rope_theta", f.number("rope_theta", 10000.0, "model.rope_theta",
                                               nullable=True), "model.rope_theta")
    partial = rope.number("partial_rotary_factor",
                          f.number("partial_rotary_factor", 1.0, UNIT, nullable=True), UNIT,
                          nullable=True)
    need(partial == 1.0, f"RoPE turns only part of each head (partial_rotary_factor {partial})")
    window = f.integer("sliding_window", None, WINDOW, nullable=True)
    need(window is None or window >= context, f"attention only sees the last {window} tokens "
         f"(sliding_window {window} < max_position_embeddings {context})")
    attention_bias, mlp_bias = llama_biases(config, where)
    return {
        "vocab_size": f.integer("vocab_size", 32000, "model.vocab_size"),
        "context_length": context,
        "d_model": hidden, "num_blocks": f.integer("num_hidden_layers", 32, "model.num_blocks"),
        "num_heads": heads,
        "dropout": f.number("attention_dropout", 0.0, "model.dropout", nullable=True),
        "positions": "rope", "norm": "rmsnorm", "activation": "swiglu",
        "ffn_hidden": f.integer("intermediate_size", 11008, "model.ffn_hidden"),
        "bias": attention_bias or mlp_bias, "qkv_bias": attention_bias, "output_bias": False,
        "tie_embeddings": f.flag("tie_word_embeddings", False),
        "norm_eps": f.number("rms_norm_eps", 1e-6, "model.norm_eps"), "rope_theta": theta,
        "init_std": f.number("initializer_range", 0.02, "model.init_std"),
    }


def llama_biases(config: Mapping[str, Any], where: str) -> tuple[bool, bool]:
    """(attention_bias, mlp_bias) of a Llama config.json: which biases its checkpoint holds."""
    f = ConfigFields(config, where)
    return f.flag("attention_bias", False), f.flag("mlp_bias", False)


def zero_biases(config: Mapping[str, Any], cfg: ModelConfig, where: str) -> tuple[str, int]:
    """(which, how many) zero biases llm's Llama adds to the source's: `model.bias` covers both
    the attention output and the feed-forward layers, which Llama's attention_bias and mlp_bias
    set apart, so a config with only one of them gets the other's biases as zeros."""
    attention_bias, mlp_bias = llama_biases(config, where)
    if attention_bias == mlp_bias:
        return "", 0
    if attention_bias:
        return "feed-forward", cfg.num_blocks * (2 * cfg.ffn_width + cfg.d_model)
    return "attention output (o_proj)", cfg.num_blocks * cfg.d_model


def divisible(width: int, heads: int, keys: tuple[str, str], where: str) -> None:
    if width % heads:
        fail(f"{where}: {keys[0]} {width} is not divisible by {keys[1]} {heads}; the config is "
             "inconsistent (transformers refuses it too)")


def rope_fields(f: ConfigFields) -> ConfigFields:
    """The RoPE settings transformers uses. Either rope_parameters or the legacy rope_scaling
    asking for any scaling is refused (llm's RoPE is unscaled); a non-empty rope_scaling
    replaces rope_parameters, as in transformers, so rope_theta is read from the same place."""
    found = {name: f.mapping(name) for name in ("rope_parameters", "rope_scaling")}
    for name, rope in found.items():
        for key in ("rope_type", "type"):
            kind = rope.text(key, "default")
            if kind != "default":
                fail(f"{f.where}: RoPE is scaled ({name} {key} {kind!r}), which llm's model does "
                     "not have; it cannot be imported")
    return found["rope_scaling"] if found["rope_scaling"].config else found["rope_parameters"]


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
EMBEDDINGS = {GPT2: ("transformer.wte.weight", "wte.weight"),
              LLAMA: ("model.embed_tokens.weight",)}


def head_untied(tensors: Mapping[str, torch.Tensor], cls: str) -> bool:
    """Whether the file stores an output layer that differs from its token embedding.

    transformers then keeps the two apart whatever tie_word_embeddings says (it warns "we will
    NOT tie them"), so the import must too; a stored copy equal to the embedding is only the
    tied weight written twice."""
    head = tensors.get("lm_head.weight")
    embedding = next((tensors[k] for k in EMBEDDINGS[cls] if k in tensors), None)
    return head is not None and embedding is not None and not torch.equal(head, embedding)


def from_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, cls: str,
            config: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Our state dict (tied names both present) from a transformers checkpoint's tensors and
    its `config` (config.json).

    Weights the checkpoint lacks, biases its config says it has included, and every tensor
    whose shape is not the one its config implies (checked before any is reshaped, transposed
    or concatenated) are named in a one-line error; biases that our recipe carries but the
    checkpoint's class left out (its config's attention_bias or mlp_bias false) are zeros.
    Tensors nothing reads are an error too (a different architecture under the same name).
    """
    d, ffn, vocab = cfg.d_model, cfg.ffn_width, int(cfg.vocab_size)
    attention_bias, mlp_bias = llama_biases(config, where) if cls == LLAMA else (True, True)
    if cls == GPT2:  # GPT2Model files (the hub's gpt2) have no "transformer." prefix
        tensors = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
                   for k, v in tensors.items() if not k.endswith(GPT2_BUFFERS)}
    used: set[str] = set()

    def take(name: str, *shape: int) -> torch.Tensor:
        """The tensor `name`, checked to be floats of the `shape` its config implies."""
        if name not in tensors:
            fail(f"{where}: weight {name} is missing; the checkpoint is incomplete or is not a "
                 f"{cls}")
        used.add(name)
        tensor = tensors[name]
        check_float_tensor(name, tensor, where)  # before a cat promotes it unseen
        if tuple(tensor.shape) != shape:
            fail(f"{where}: weights do not match its config.json: {name} "
                 f"{tuple(tensor.shape)} vs config {shape}; the folder's config and weights "
                 "are from different models")
        return tensor

    def bias(name: str, held: bool, n: int, like: torch.Tensor) -> torch.Tensor:
        """The source's bias where its class has one (`held`), else zeros."""
        return take(name, n) if held else torch.zeros(n, dtype=like.dtype)

    sd: dict[str, torch.Tensor] = {}
    if cls == GPT2:
        sd["tok_emb.weight"] = take("transformer.wte.weight", vocab, d)
        sd["pos_emb.weight"] = take("transformer.wpe.weight", cfg.context_length, d)
        for i in range(cfg.num_blocks):
            ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                sd[f"{ours}{a}.weight"] = take(f"{hf}{b}.weight", d)
                sd[f"{ours}{a}.bias"] = take(f"{hf}{b}.bias", d)
            for a, b, n_in, n_out in (("attn.qkv", "attn.c_attn", d, 3 * d),
                                      ("attn.proj", "attn.c_proj", d, d),
                                      ("ffn.fc_in", "mlp.c_fc", d, ffn),
                                      ("ffn.fc_out", "mlp.c_proj", ffn, d)):
                sd[f"{ours}{a}.weight"] = take(f"{hf}{b}.weight", n_in, n_out).t()  # Conv1D
                sd[f"{ours}{a}.bias"] = take(f"{hf}{b}.bias", n_out)
        sd["norm.weight"] = take("transformer.ln_f.weight", d)
        sd["norm.bias"] = take("transformer.ln_f.bias", d)
    else:
        inverse = torch.argsort(rope_order(cfg))
        sd["tok_emb.weight"] = take("model.embed_tokens.weight", vocab, d)
        for i in range(cfg.num_blocks):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            sd[f"{ours}norm1.weight"] = take(f"{hf}input_layernorm.weight", d)
            sd[f"{ours}norm2.weight"] = take(f"{hf}post_attention_layernorm.weight", d)
            weights, biases = [], []
            for name in ("q_proj", "k_proj", "v_proj"):
                w = take(f"{hf}self_attn.{name}.weight", d, d)
                b = bias(f"{hf}self_attn.{name}.bias", attention_bias, d, w)
                if name != "v_proj":
                    w, b = _per_head(w, cfg, inverse), _per_head(b, cfg, inverse)
                weights.append(w)
                biases.append(b)
            sd[f"{ours}attn.qkv.weight"] = torch.cat(weights)
            if cfg.qkv_bias:
                sd[f"{ours}attn.qkv.bias"] = torch.cat(biases)
            o_proj = take(f"{hf}self_attn.o_proj.weight", d, d)
            sd[f"{ours}attn.proj.weight"] = o_proj
            if cfg.bias:
                sd[f"{ours}attn.proj.bias"] = bias(f"{hf}self_attn.o_proj.bias", attention_bias,
                                                   d, o_proj)
            for a, b, n_out, n_in in (("fc_gate", "gate_proj", ffn, d),
                                      ("fc_in", "up_proj", ffn, d),
                                      ("fc_out", "down_proj", d, ffn)):
                w = take(f"{hf}mlp.{b}.weight", n_out, n_in)
                sd[f"{ours}ffn.{a}.weight"] = w
                if cfg.bias:
                    sd[f"{ours}ffn.{a}.bias"] = bias(f"{hf}mlp.{b}.bias", mlp_bias, w.shape[0], w)
        sd["norm.weight"] = take("model.norm.weight", d)
    if cfg.tie_embeddings:
        if head_untied(tensors, cls):  # import_hf unties the recipe first
            fail(f"{where}: lm_head.weight differs from the token embedding, so the model is "
                 "not tied as its config says")
        sd["lm_head.weight"] = sd["tok_emb.weight"]
        used.add("lm_head.weight")  # some files store the tied copy as well
    else:
        sd["lm_head.weight"] = take("lm_head.weight", vocab, d)
    unused = sorted(set(tensors) - used)
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        fail(f"{where}: tensors {shown} have no place in a {cls} as llm reads it; the checkpoint "
             "holds layers llm's model does not have")
    return {k: v.contiguous() for k, v in sd.items()}
