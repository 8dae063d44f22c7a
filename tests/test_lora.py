"""LoRA adapters: exact at step 0, only adapters train, merging is exact, state round-trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmcli.model.gpt import build_model
from llmcli.model.lora import (
    LoRALinear,
    apply_lora,
    load_lora_state,
    lora_state_dict,
    merge_lora,
    target_layers,
)
from llmcli.recipe import LoraConfig

ALL = ["qkv", "proj", "ffn_in", "ffn_out", "head"]


def _model(cfg, seed: int = 0, **changes):
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(cfg, **changes))


def _tokens(cfg, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), generator=g)


def _randomize_adapters(model) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_step_zero_outputs_unchanged(tiny_model_cfg, activation):
    model = _model(tiny_model_cfg, activation=activation).eval()
    x = _tokens(tiny_model_cfg)
    before, _ = model(x)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0, targets=ALL))
    after, _ = model(x)
    assert torch.equal(before, after)


def test_targets_select_layers(tiny_model_cfg):
    model = _model(tiny_model_cfg, activation="swiglu")
    names = target_layers(model, ["qkv", "ffn_in"])
    assert names == ["blocks.0.attn.qkv", "blocks.0.ffn.fc_in", "blocks.0.ffn.fc_gate",
                     "blocks.1.attn.qkv", "blocks.1.ffn.fc_in", "blocks.1.ffn.fc_gate"]
    assert target_layers(model, ["proj", "ffn_out"]) == [
        "blocks.0.attn.proj", "blocks.0.ffn.fc_out", "blocks.1.attn.proj", "blocks.1.ffn.fc_out"]
    assert target_layers(model, ["head"]) == ["lm_head"]
    with pytest.raises(ValueError, match="unknown LoRA target"):
        target_layers(model, ["lm_head"])
    tied = _model(tiny_model_cfg, tie_embeddings=True)
    with pytest.raises(ValueError, match="tied"):
        target_layers(tied, ["qkv", "head"])


def test_only_adapters_get_gradients(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    base_keys = set(model.state_dict())
    names = apply_lora(model, LoraConfig(rank=2, alpha=4, dropout=0.1, targets=["qkv", "proj"]))
    assert len(names) == 2 * tiny_model_cfg.num_blocks
    # the base weights keep their names, so plain checkpoints still load
    assert base_keys <= set(model.state_dict())
    _randomize_adapters(model)  # B = 0 would leave A without gradient
    x = _tokens(tiny_model_cfg)
    _, loss = model.train()(x[:, :-1], x[:, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d = tiny_model_cfg.d_model
    # per block: qkv A (2×d) + B (3d×2), proj A (2×d) + B (d×2)
    assert trainable == tiny_model_cfg.num_blocks * (2 * d + 3 * d * 2 + 2 * d + d * 2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_merge_matches_adapted_model(tiny_model_cfg, activation):
    model = _model(tiny_model_cfg, activation=activation).eval()
    apply_lora(model, LoraConfig(rank=4, alpha=16, dropout=0.2, targets=ALL))
    _randomize_adapters(model)
    x = _tokens(tiny_model_cfg)
    adapted, _ = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("lora_" in k for k in model.state_dict())
    merged, _ = model(x)
    assert torch.allclose(adapted, merged, atol=1e-5, rtol=1e-4)
    # the merge really changed the function (the adapters were not zero)
    base = _model(tiny_model_cfg, activation=activation).eval()
    assert not torch.allclose(base(x)[0], merged, atol=1e-3)
    # and the merged model is a plain GPT state dict
    assert set(base.state_dict()) == set(model.state_dict())


def test_adapter_state_round_trip(tiny_model_cfg):
    cfg = LoraConfig(rank=3, alpha=6, dropout=0.0, targets=["qkv", "ffn_out"])
    a = _model(tiny_model_cfg).eval()
    apply_lora(a, cfg)
    _randomize_adapters(a)
    state = {k: v.clone() for k, v in lora_state_dict(a).items()}
    assert all(".lora_" in k for k in state) and len(state) == 4 * tiny_model_cfg.num_blocks
    b = _model(tiny_model_cfg).eval()
    apply_lora(b, cfg)
    load_lora_state(b, state)
    x = _tokens(tiny_model_cfg)
    assert torch.equal(a(x)[0], b(x)[0])
    with pytest.raises(ValueError, match="missing"):
        load_lora_state(b, dict(list(state.items())[1:]))
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = torch.zeros(7, 7)
    with pytest.raises(ValueError, match="shape"):
        load_lora_state(b, bad)
    bad[key] = state[key].to(torch.int64)  # copy_ cast it silently
    with pytest.raises(ValueError, match="not floating-point"):
        load_lora_state(b, bad)


def test_refuses_rank_zero_and_double_apply(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    with pytest.raises(ValueError, match="full fine-tuning"):
        apply_lora(model, LoraConfig(rank=0))
    apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, LoraConfig(rank=2))


def test_matches_peft_reference(tiny_model_cfg):
    """Same A, B and scaling as PEFT's LoRA on the same layers -> the same logits."""
    peft = pytest.importorskip("peft")
    ours = _model(tiny_model_cfg).eval()
    ref = _model(tiny_model_cfg).eval()
    apply_lora(ours, LoraConfig(rank=4, alpha=8, dropout=0.0, targets=["qkv", "ffn_out"]))
    _randomize_adapters(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["attn.qkv", "ffn.fc_out"])
    ref = peft.inject_adapter_in_model(config, ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                layer, kind = name.split(".lora_")[0], name.split(".lora_")[1][0]
                p.copy_(dict(ours.named_parameters())[f"{layer}.lora_{kind}"])
    x = _tokens(tiny_model_cfg)
    assert torch.allclose(ours(x)[0], ref(x)[0], atol=1e-6)
