"""Decoding speed on CPU, as ratios against baselines measured in the same run.

1. Greedy, batch 1, the seed's scifi dimensions (d_model 512, 12 blocks, 8 heads, vocabulary
   100,256, context 128), random weights: our KV cache vs Hugging Face transformers'
   `GPT2LMHeadModel.generate(use_cache=True)` with the same dimensions (target >= 1.5x); ours
   without the fp32 weight re-layout; ours in bf16; ours without a cache.
2. Beam search, 4 beams, a small model: ours vs transformers' beam search (target >= 1x).

Each variant runs once to warm up, then `--rounds` times interleaved with the others (the
machine is shared, so figures are medians). Run: python benchmarks/bench_generate.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from llmcli.generate.decode import beam_search, prepare_model, sample
from llmcli.model.gpt import build_model
from llmcli.recipe import GenerateConfig, ModelConfig


def hf_gpt2(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
        n_layer=cfg.num_blocks, n_head=cfg.num_heads, bos_token_id=None, eos_token_id=None,
        pad_token_id=0)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, prompt: torch.Tensor, new: int, beams: int = 1) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 num_beams=beams, use_cache=True, length_penalty=1.0)
        assert out.shape[1] == prompt.shape[1] + new
        return out
    return run


def ours_greedy(model, prompt: list[int], new: int, use_cache: bool = True):
    g = dataclasses.replace(GenerateConfig(), strategy="greedy", max_new_tokens=new)

    def run():
        result = sample(model, prompt, g, use_cache=use_cache)[0]
        assert len(result.tokens) == new
        return result
    return run


def ours_beam(model, prompt: list[int], new: int, beams: int):
    g = dataclasses.replace(GenerateConfig(), strategy="beam", num_beams=beams,
                            max_new_tokens=new)

    def run():
        best = beam_search(model, prompt, g)[0]
        assert len(best.tokens) == new
        return best
    return run


def measure(variants: dict[str, tuple[Callable[[], object], int]],
            rounds: int) -> dict[str, tuple[float, float]]:
    """(median, best) tokens/s of each variant; rounds interleave the variants, and the best
    round is the one least disturbed by other work on the machine."""
    for run, _ in variants.values():
        run()  # warm-up: allocator, oneDNN/MKL kernels
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (run, tokens) in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append(tokens / (time.perf_counter() - start))
    return {name: (statistics.median(v), max(v)) for name, v in samples.items()}


def report(speeds: dict[str, tuple[float, float]]) -> None:
    print(f"  {'tokens/s':<46} {'median':>7} {'best':>7}")
    for name, (median, best) in speeds.items():
        print(f"  {name:<46} {median:7.1f} {best:7.1f}")


def ratio(label: str, ours: tuple[float, float], baseline: tuple[float, float],
          target: str = "") -> None:
    print(f"  ratio {label:<40} {ours[0] / baseline[0]:7.2f} {ours[1] / baseline[1]:7.2f}  "
          f"{target}".rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    new = args.new_tokens

    # 1. Greedy on the scifi dimensions ----------------------------------------------------
    cfg = ModelConfig(dropout=0.0)  # the seed's defaults: 512 x 12 x 8, vocab 100,256, ctx 128
    plain = build_model(cfg).eval()
    ours = prepare_model(copy.deepcopy(plain))
    bf16 = prepare_model(copy.deepcopy(plain), torch.bfloat16)
    hf = hf_gpt2(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 8))
    ids = prompt[0].tolist()
    nocache_tokens = min(new, 48)
    print(f"greedy, batch 1, scifi dimensions, {args.threads} threads, prompt 8, "
          f"{new} new tokens ({nocache_tokens} for the no-cache pair), "
          f"{args.rounds} rounds")
    speed = measure({
        "transformers GPT2 generate (fp32, cache)": (hf_generate(hf, prompt, new), new),
        "llm, fp32, KV cache": (ours_greedy(ours, ids, new), new),
        "llm, fp32, KV cache, row-major weights": (ours_greedy(plain, ids, new), new),
        "llm, bf16, KV cache": (ours_greedy(bf16, ids, new), new),
    }, args.rounds)
    cache_pair = measure({
        "llm, fp32, KV cache (short)": (ours_greedy(ours, ids, nocache_tokens), nocache_tokens),
        "llm, fp32, no cache (short)": (ours_greedy(ours, ids, nocache_tokens, use_cache=False),
                                        nocache_tokens),
    }, max(1, args.rounds // 2))
    report({**speed, **cache_pair})
    hf_rate, fp32 = speed["transformers GPT2 generate (fp32, cache)"], speed["llm, fp32, KV cache"]
    ratio("fp32 cache / transformers", fp32, hf_rate, "(target >= 1.5x)")
    ratio("bf16 cache / transformers", speed["llm, bf16, KV cache"], hf_rate)
    ratio("fp32 column-major / row-major weights", fp32,
          speed["llm, fp32, KV cache, row-major weights"])
    ratio(f"cache / no cache ({nocache_tokens} tokens)", *cache_pair.values())
    del plain, ours, bf16, hf

    # 2. Beam search on a small model ------------------------------------------------------
    small = ModelConfig(vocab_size=8192, context_length=128, d_model=128, num_blocks=4,
                        num_heads=4, dropout=0.0)
    model = prepare_model(build_model(small))
    hf_small = hf_gpt2(small)
    prompt = torch.randint(0, small.vocab_size, (1, 8))
    beams = 4
    print(f"\nbeam search, {beams} beams, small model (d_model 128, 4 blocks, vocabulary 8,192), "
          f"{new} new tokens")
    beam_speed = measure({
        "transformers GPT2 beam search": (hf_generate(hf_small, prompt, new, beams), new),
        "llm beam search": (ours_beam(model, prompt[0].tolist(), new, beams), new),
    }, args.rounds)
    report(beam_speed)
    ratio("llm / transformers", beam_speed["llm beam search"],
          beam_speed["transformers GPT2 beam search"], "(target >= 1x)")

if __name__ == "__main__":
    main()
