"""Generation past the context: the seed's crop rule and the default sliding window."""

from __future__ import annotations

import dataclasses

import torch

from llmcli.generate.decode import sample
from llmcli.model.gpt import build_model
from llmcli.recipe import GenerateConfig


def test_crop_rule_sees_the_last_context_length_tokens_at_every_step(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, context_length=8)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompt = [1, 2, 3, 4, 5]
    g = GenerateConfig(strategy="greedy", max_new_tokens=12, window="crop")
    tokens = sample(model, prompt, g, use_cache=True)[0].tokens
    seq = list(prompt)  # the seed's loop: crop, forward, argmax
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(torch.tensor([seq[-8:]]))
            seq.append(int(logits[0, -1].argmax()))
    assert tokens == seq[len(prompt):]
    no_cache = sample(model, prompt, g, use_cache=False)[0].tokens
    assert no_cache == tokens


def test_slide_and_crop_agree_within_the_context(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, context_length=8)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    short = [GenerateConfig(strategy="greedy", max_new_tokens=3, window=w) for w in
             ("slide", "crop")]
    assert sample(model, [1, 2], short[0])[0].tokens == sample(model, [1, 2], short[1])[0].tokens
    slide = sample(model, [1, 2, 3], GenerateConfig(strategy="greedy", max_new_tokens=12))
    assert len(slide[0].tokens) == 12
