"""The decoder: seed-exact defaults, every option's parameter count, causality, the KV cache."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from llmcli.constants import IGNORE_INDEX
from llmcli.model.count import count_parameters, formula_parameters
from llmcli.model.gpt import GPT, build_model, sinusoidal_table
from llmcli.recipe import ModelConfig


def test_seed_scifi_model_has_exactly_140_573_600_parameters():
    model = build_model(ModelConfig(), "meta")
    assert count_parameters(model) == (140_573_600, 140_573_600)


def test_seed_architecture_details():
    model = build_model(ModelConfig(), "meta")
    block = model.blocks[0]
    assert block.attn.qkv.bias is None  # Q/K/V without bias
    assert block.attn.proj.bias is not None  # output projection with bias
    assert block.ffn.fc_in.out_features == 4 * 512 and block.ffn.fc_in.bias is not None
    assert isinstance(block.ffn.act, torch.nn.ReLU)
    assert isinstance(model.norm, torch.nn.LayerNorm)
    assert model.lm_head.bias is not None
    assert model.lm_head.weight is not model.tok_emb.weight  # untied
    assert not hasattr(model, "pos_emb")  # sinusoidal: no learned table


@pytest.mark.parametrize(("change", "expected"), [
    # Each figure is worked out by hand from the seed's 140,573,600.
    ({}, 140_573_600),
    ({"positions": "learned"}, 140_573_600 + 128 * 512),
    ({"positions": "rope"}, 140_573_600),
    ({"norm": "rmsnorm"}, 140_573_600 - 25 * 512),  # 25 norms lose their bias
    ({"tie_embeddings": True}, 140_573_600 - 100256 * 512),
    ({"qkv_bias": True}, 140_573_600 + 12 * 3 * 512),
    ({"activation": "gelu"}, 140_573_600),
    # SwiGLU: hidden 1408 (8/3·512 rounded up to 64), three matrices, biases on two + out.
    ({"activation": "swiglu"}, 140_573_600 + 12 * ((3 * 512 * 1408 + 2 * 1408 + 512)
                                                   - (2 * 512 * 2048 + 2048 + 512))),
    # bias off: attention output, FFN, 25 LayerNorms and the output layer lose theirs.
    ({"bias": False}, 140_573_600 - 12 * (512 + 2048 + 512) - 25 * 512 - 100256),
])
def test_parameter_count_of_each_option(change, expected):
    cfg = dataclasses.replace(ModelConfig(), **change)
    assert count_parameters(build_model(cfg, "meta"))[0] == expected
    assert formula_parameters(cfg) == expected


def test_formula_matches_the_built_model_for_every_combination():
    base = ModelConfig(vocab_size=500, context_length=24, d_model=48, num_blocks=2, num_heads=4)
    options = itertools.product(["sinusoidal", "learned", "rope"], ["layernorm", "rmsnorm"],
                                ["relu", "gelu", "swiglu"], [True, False], [True, False],
                                [True, False])
    for pos, norm, act, bias, qkv_bias, tie in options:
        cfg = dataclasses.replace(base, positions=pos, norm=norm, activation=act, bias=bias,
                                  qkv_bias=qkv_bias, tie_embeddings=tie)
        assert formula_parameters(cfg) == count_parameters(build_model(cfg, "meta"))[0], cfg


def test_sinusoidal_table_is_the_seeds_formula():
    table = sinusoidal_table(16, 64)
    for pos, i in [(0, 0), (3, 5), (15, 31), (7, 0)]:
        angle = pos / 10000 ** (2 * i / 64)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_initial_loss_is_near_uniform_and_residual_init_is_scaled(tiny_model_cfg):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(tiny_model_cfg, vocab_size=1000, num_blocks=8))
    x = torch.randint(0, 1000, (8, 16))
    _, loss = model(x, targets=x)
    assert loss.item() == pytest.approx(math.log(1000), rel=0.05)
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert proj_std == pytest.approx(0.02 / math.sqrt(16), rel=0.2)
    assert qkv_std == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope"])
def test_causal_future_tokens_do_not_change_past_logits(tiny_model_cfg, positions):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(tiny_model_cfg, positions=positions)).eval()
    x = torch.randint(0, 64, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 64, (2, 4))
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope"])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_kv_cache_matches_full_forward(tiny_model_cfg, positions, activation):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_cfg, positions=positions, activation=activation,
                              norm="rmsnorm" if activation == "swiglu" else "layernorm")
    model = GPT(cfg).eval()
    x = torch.randint(0, 64, (3, 16))
    full, _ = model(x)
    cache = model.new_cache(3)
    pieces = [model(x[:, :5], cache=cache)[0], model(x[:, 5:9], cache=cache)[0]]
    pieces += [model(x[:, t:t + 1], cache=cache)[0] for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == 16
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(x[:, :1], cache=cache)


def test_cache_reorder_follows_beams(tiny_model_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_model_cfg).eval()
    x = torch.randint(0, 64, (2, 6))
    cache = model.new_cache(2)
    model(x, cache=cache)
    cache.reorder(torch.tensor([1, 1]))
    nxt = torch.randint(0, 64, (1, 1))
    logits, _ = model(nxt.expand(2, 1), cache=cache)
    expected, _ = model(torch.cat([x[1:], nxt], 1))
    torch.testing.assert_close(logits[0, -1], expected[0, -1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1, -1], expected[0, -1], atol=1e-5, rtol=1e-4)


def test_last_only_returns_the_last_position(tiny_model_cfg):
    model = GPT(tiny_model_cfg).eval()
    x = torch.randint(0, 64, (2, 10))
    full, _ = model(x)
    last, _ = model(x, last_only=True)
    assert last.shape == (2, 1, 64)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_ignore_index_targets_add_no_loss(tiny_model_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_model_cfg).eval()
    x = torch.randint(0, 64, (2, 10))
    targets = x.clone()
    targets[:, :6] = IGNORE_INDEX
    logits, loss = model(x, targets=targets)
    manual = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, 64),
                                               x[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, manual)


def test_matches_seed_style_explicit_attention(tiny_model_cfg):
    """SDPA over the fused projection equals the tutorial's per-head masked softmax."""
    torch.manual_seed(0)
    model = GPT(tiny_model_cfg).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32)
    B, T, C = x.shape
    H, hd = 4, 8
    wq, wk, wv = attn.qkv.weight.split(C, dim=0)
    heads = []
    for h in range(H):
        rows = slice(h * hd, (h + 1) * hd)
        q, k, v = x @ wq[rows].T, x @ wk[rows].T, x @ wv[rows].T
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1),
                                    float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x, None, None, 0), expected, atol=1e-5, rtol=1e-4)


def test_tied_embeddings_share_one_tensor(tiny_model_cfg):
    model = GPT(dataclasses.replace(tiny_model_cfg, tie_embeddings=True))
    assert model.lm_head.weight is model.tok_emb.weight


def test_auto_vocab_must_be_resolved_first(tiny_model_cfg):
    with pytest.raises(ValueError, match="vocab_size is 'auto'"):
        GPT(dataclasses.replace(tiny_model_cfg, vocab_size="auto"))


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope"])
def test_reference_attention_equals_sdpa_with_and_without_cache(tiny_model_cfg, positions):
    """The seed's explicit steps (scores, -inf mask, softmax, @ V) are the same maths as SDPA."""
    cfg = dataclasses.replace(tiny_model_cfg, positions=positions)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    fused, _ = model(idx)
    model.attention_mode("reference")
    explicit, _ = model(idx)
    assert torch.allclose(fused, explicit, atol=1e-5)
    weights = model.blocks[0].attn.weights
    assert weights.shape == (2, cfg.num_heads, 12, 12)
    assert torch.allclose(weights.sum(-1), torch.ones(2, cfg.num_heads, 12), atol=1e-6)
    assert bool((weights.triu(diagonal=1) == 0).all())
    cache = model.new_cache(2)
    first, _ = model(idx[:, :7], cache=cache)
    rest, _ = model(idx[:, 7:], cache=cache)
    assert torch.allclose(torch.cat([first, rest], 1), fused, atol=1e-5)
    model.attention_mode("sdpa")
    assert model.blocks[0].attn.weights is None


def test_seed_init_is_pytorchs_default_and_output_bias_follows_the_key(tiny_model_cfg):
    seed = build_model(dataclasses.replace(tiny_model_cfg, init="seed", d_model=64))
    assert 0.9 < float(seed.tok_emb.weight.std()) < 1.1  # N(0, 1) embeddings, as the tutorial
    bound = 1 / math.sqrt(64)  # Kaiming-uniform(a=sqrt(5)) on a 64-input Linear
    assert float(seed.blocks[0].attn.qkv.weight.abs().max()) <= bound + 1e-6
    gpt2 = build_model(dataclasses.replace(tiny_model_cfg, d_model=64))
    assert float(gpt2.tok_emb.weight.std()) < 0.05
    assert gpt2.lm_head.bias is not None
    no_head_bias = build_model(dataclasses.replace(tiny_model_cfg, output_bias=False))
    assert no_head_bias.lm_head.bias is None and no_head_bias.blocks[0].ffn.fc_in.bias is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_keeps_the_expectation_and_routes_gradients_through_the_mask(dtype):
    from llmcli.model.gpt import fast_dropout

    torch.manual_seed(0)
    x = torch.ones(400_000, dtype=dtype, requires_grad=True)
    y = fast_dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # p = 0.1 within 3 sigma-ish
    assert torch.allclose(y[kept].float(), torch.full((int(kept.sum()),), 1 / 0.9), rtol=1e-2)
    assert abs(y.float().mean().item() - 1.0) < 0.01  # inverted dropout: expectation kept
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # gradient flows only where the mask kept
    assert fast_dropout(x, 0.1, training=False) is x and fast_dropout(x, 0.0, training=True) is x
    torch.manual_seed(5)
    a = fast_dropout(x.detach(), 0.3, training=True)
    torch.manual_seed(5)
    assert torch.equal(a, fast_dropout(x.detach(), 0.3, training=True))  # seeded: exact resumes


@pytest.mark.parametrize("p", [1e-5, 5e-4, 0.9999, 0.99999, 0.999999])
def test_cpu_dropout_is_right_at_rates_15_bits_cannot_represent(p):
    """0.99999 rounded to a threshold of 32768/32768 (keep nothing, then divide by zero) and
    1e-5 to 0 (drop nothing): such rates take the exact path, and drop at their own rate."""
    from llmcli.model.gpt import fast_dropout, mask_threshold

    assert mask_threshold(p) is None
    torch.manual_seed(0)
    x = torch.ones(2_000_000)
    y = fast_dropout(x, p, training=True)
    assert torch.isfinite(y).all()
    dropped = (y == 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(dropped - p) < 5 * sigma + 1e-7
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))


def test_cpu_dropout_masks_of_ordinary_rates_are_the_15_bit_ones_as_before():
    """Runs saved before the exact fallback resume bit-exactly: the same threshold and scale."""
    from llmcli.model.gpt import fast_dropout, mask_threshold

    x = torch.randn(4, 1001)
    for p in (0.0016, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 0.998):
        drop = round(p * 32768)
        assert mask_threshold(p) == drop
        torch.manual_seed(3)
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
        keep = bits.view(torch.int16)[:x.numel()].bitwise_and(0x7FFF).view(x.shape) >= drop
        torch.manual_seed(3)
        assert torch.equal(fast_dropout(x, p, training=True),
                           x * (keep.to(x.dtype) * (32768 / (32768 - drop))))


def test_training_attention_with_dropout_uses_the_explicit_steps_and_matches_without_it(
        tiny_model_cfg):
    """Training on CPU with dropout takes the explicit path; with dropout off it equals SDPA."""
    cfg = dataclasses.replace(tiny_model_cfg, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    sdpa, _ = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = model(idx)  # bf16 also takes the explicit steps
    assert torch.allclose(bf16.float(), sdpa, atol=0.1)
    dropped = build_model(dataclasses.replace(cfg, dropout=0.5)).train()
    dropped.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    a, _ = dropped(idx)
    torch.manual_seed(1)
    b, _ = dropped(idx)
    assert torch.equal(a, b) and not torch.allclose(a, sdpa)
