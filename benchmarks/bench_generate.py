"""Decoding speed on CPU, as ratios against baselines measured in the same run.

1. Greedy, batch 1, the seed's scifi dimensions (d_model 512, 12 blocks, 8 heads, vocabulary
   100,256, context 128), random weights: ours (native decoding steps, `model/native_decode.py`)
   vs Hugging Face transformers' `GPT2LMHeadModel.generate(use_cache=True)` with the same
   dimensions, in fp32 and in bf16 (target >= 1.6x); ours with the weights in ordinary 4 KiB
   pages instead of huge pages, stepping through PyTorch (oneDNN kernels), with plain
   `nn.Linear` (MKL), and without a cache.
   Batch-1 decoding reads every weight once per token, so memory bandwidth bounds it: the
   bound is the bytes of weights one token reads (all but the embedding table, of which it
   reads one row) divided by the read bandwidth: the best of several reductions over a buffer of
   the same size in the same kind of pages (huge pages, as `prepare_model` gives the weights),
   so that the read sees the caches and page walks the step sees; target >= 80 % of it. A shared
   machine's bandwidth changes from minute to minute (these reads gave 35 to 73 GB/s on the
   machines this was written on), so it is read just before and just after every run, and each
   run's median step is set against the higher reading; the figure is the median over runs,
   shown with its range and against the best reading of the whole run.
2. Beam search, 4 beams, a small model: ours vs transformers' beam search (target >= 1x).

Each variant runs once to warm up, then `--rounds` times interleaved with the others. Figures:
whole runs (median tokens/s, prompt included), and single decoding steps, timed one by one
(tokens/s at the median step and at the 10th-percentile step). On a machine shared with other
work the fast steps are the ones nobody disturbed, so the p10 column is the steadiest.
`--by-level SECONDS` then runs our greedy decoding (fp32 and bf16) for that long, each run
between two readings of the bandwidth, and gives the share of the bound at each level apart.
Run: python benchmarks/bench_generate.py [--rounds 5] [--new-tokens 100] [--wait-quiet 600]
     [--by-level 300]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from llmcli.generate.decode import beam_search, prepare_model, sample
from llmcli.model.gpt import build_model
from llmcli.model.huge_pages import huge_page_buffer
from llmcli.model.native_decode import native_decoder
from llmcli.recipe import GenerateConfig, ModelConfig

Runner = Callable[[], list[float]]  # one generation; returns a timestamp per decoding step


def hf_gpt2(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
        n_layer=cfg.num_blocks, n_head=cfg.num_heads, bos_token_id=None, eos_token_id=None,
        pad_token_id=0)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, prompt: torch.Tensor, new: int, beams: int = 1) -> Runner:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per step, before the token is chosen
        def __init__(self, stamps: list[float]) -> None:
            self.stamps = stamps

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def run() -> list[float]:
        stamps: list[float] = []
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 num_beams=beams, use_cache=True, length_penalty=1.0,
                                 logits_processor=LogitsProcessorList([Stamp(stamps)]))
        assert out.shape[1] == prompt.shape[1] + new
        return stamps
    return run


def ours_greedy(model, prompt: list[int], new: int, use_cache: bool = True) -> Runner:
    g = dataclasses.replace(GenerateConfig(), strategy="greedy", max_new_tokens=new)

    def run() -> list[float]:
        stamps: list[float] = []

        def stamp(tokens: list[int]) -> bool:  # the stop check: once per generated token
            stamps.append(time.perf_counter())
            return False

        result = sample(model, prompt, g, use_cache=use_cache, stop=stamp)[0]
        assert len(result.tokens) == new
        return stamps
    return run


def native_alone(model, prompt: list[int], new: int) -> Runner:
    """The native step alone, token after token, without the sampling loop around it."""
    decoder = native_decoder(model)

    def run() -> list[float]:
        cache = model.new_cache(1)
        cache.length = len(prompt)  # positions as after the prompt (its keys: zeros)
        stamps = [time.perf_counter()]
        for token in range(new):
            decoder.step(prompt[token % len(prompt)], cache)
            stamps.append(time.perf_counter())
        return stamps
    return run


def ours_beam(model, prompt: list[int], new: int, beams: int) -> Runner:
    g = dataclasses.replace(GenerateConfig(), strategy="beam", num_beams=beams,
                            max_new_tokens=new)

    def run() -> list[float]:
        stamps: list[float] = []

        def stamp(tokens: list[int]) -> bool:  # asked for every candidate: stamp new lengths
            if len(tokens) > len(stamps):
                stamps.append(time.perf_counter())
            return False

        best = beam_search(model, prompt, g, stop=stamp)[0]
        assert len(best.tokens) == new
        return stamps
    return run


@dataclasses.dataclass
class Speed:
    run: float  # median tokens/s of whole generations
    step: float  # tokens/s at the median step
    quiet: float  # tokens/s at the 10th-percentile step

    def __truediv__(self, other: Speed) -> Speed:
        return Speed(self.run / other.run, self.step / other.step, self.quiet / other.quiet)


def measure(variants: dict[str, tuple[Runner, int]], rounds: int,
            per_run: dict[str, list[float]] | None = None,
            probes: dict[str, BandwidthProbe] | None = None,
            bounds: dict[str, list[float]] | None = None) -> dict[str, Speed]:
    """Speeds over all rounds. `per_run` receives each run's tokens/s at its median step; for
    the variants named in `probes`, `bounds` receives the read bandwidth beside each run: the
    higher of the probe's readings just before and just after it (the machine's bandwidth
    moves while it runs)."""
    for run, _ in variants.values():
        run()  # warm-up: allocator, oneDNN/MKL kernels, the native step's build
    runs: dict[str, list[float]] = {name: [] for name in variants}
    steps: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (run, tokens) in variants.items():
            probe = (probes or {}).get(name)
            before = probe() if probe is not None else 0.0
            start = time.perf_counter()
            stamps = run()
            runs[name].append(tokens / (time.perf_counter() - start))
            durations = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            steps[name] += durations
            if per_run is not None:
                per_run.setdefault(name, []).append(1 / statistics.median(durations))
            if probe is not None and bounds is not None:
                bounds.setdefault(name, []).append(max(before, probe()))
    speeds = {}
    for name in variants:
        durations = sorted(steps[name])
        speeds[name] = Speed(statistics.median(runs[name]), 1 / statistics.median(durations),
                             1 / durations[len(durations) // 10])
    return speeds


def report(speeds: dict[str, Speed]) -> None:
    print(f"  {'tokens/s':<44} {'run':>7} {'step':>7} {'p10':>7}")
    for name, s in speeds.items():
        print(f"  {name:<44} {s.run:7.1f} {s.step:7.1f} {s.quiet:7.1f}")


def ratio(label: str, ours: Speed, baseline: Speed, target: str = "") -> None:
    r = ours / baseline
    print(f"  ratio {label:<38} {r.run:6.2f}x {r.step:6.2f}x {r.quiet:6.2f}x  {target}".rstrip())


class BandwidthProbe:
    """Bytes/s of a streaming read with the current threads: the fastest of a few reductions
    over a buffer as large as one token's weights and laid out like them (in huge pages where
    the decoding weights are, `llmcli.model.huge_pages`), so that it sees the same caches and
    page walks as the step, in about 0.1 s, so that it can sit beside every run."""

    def __init__(self, device: torch.device, nbytes: int):
        self.device = device
        if device.type == "cpu":
            self.data = huge_page_buffer(nbytes // 4 * 4).view(torch.float32).fill_(1.0)
        else:
            self.data = torch.ones(nbytes // 4, device=device)

    def __call__(self, trials: int = 4) -> float:
        best = 0.0
        for _ in range(trials):
            for reduce in (lambda: self.data.amax(),
                           lambda: self.data.view(torch.bfloat16).sum()):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                reduce().item()
                best = max(best, self.data.nbytes / (time.perf_counter() - start))
        return best


def shares_by_level(variants: dict[str, tuple[Runner, BandwidthProbe, int]],
                    seconds: float) -> None:
    """Each variant's share of the bound, run after run for `seconds`, grouped by the machine's
    bandwidth level. A shared machine's bandwidth jumps between levels (35 and 60-73 GB/s on
    the machines this was written on) and a five-round run mixes them; here a run counts only
    when the readings just before and just after it are at the same level."""
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, (run, probe, need) in variants.items():
            before, stamps, after = probe(), run(), probe()
            step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
            runs[name].append((min(before, after), max(before, after),
                               need / step / max(before, after)))
    readings = [reading for kept in runs.values() for run in kept for reading in run[:2]]
    low, high = min(readings), max(readings)
    split = (low + high) / 2 if high > 1.2 * low else None  # one level: no split
    print(f"\nshare of the bound by bandwidth level, {seconds:.0f} s of runs "
          + ("(one level)" if split is None else f"(levels split at {split / 1e9:.0f} GB/s)"))
    for name, kept in runs.items():
        groups = {"every run": kept} if split is None else {
            "lower level": [run for run in kept if run[1] < split],
            "higher level": [run for run in kept if run[0] >= split]}
        for level, group in groups.items():
            if not group:
                continue
            shares = [run[2] for run in group]
            print(f"  {name}, {level} ({min(run[0] for run in group) / 1e9:.0f}-"
                  f"{max(run[1] for run in group) / 1e9:.0f} GB/s): median "
                  f"{statistics.median(shares):.1%} over {len(group)} runs "
                  f"(range {min(shares):.0%}-{max(shares):.0%}); target >= 80%")


def in_small_pages(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its weights copied back into ordinary (4 KiB) pages, as before
    `prepare_model` moved them (`llmcli.model.huge_pages`)."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decoding step reads: every parameter but the token embedding table."""
    embedding = model.tok_emb.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p is not embedding or model.lm_head.weight is embedding)


def wait_quiet(limit: float, threshold: float = 0.8) -> None:
    """Wait up to `limit` seconds for the 1-minute load average to fall below `threshold`."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(10)
    print(f"load average {os.getloadavg()[0]:.2f} when measuring (other work on the machine "
          "slows every figure; ratios are measured side by side)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: greedy part only)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="first wait up to SECONDS for the machine to be idle")
    parser.add_argument("--by-level", type=float, default=0, metavar="SECONDS",
                        help="then run our greedy decoding for SECONDS more and give its share "
                             "of the bound at each bandwidth level")
    args = parser.parse_args()
    wait_quiet(args.wait_quiet)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    new = args.new_tokens

    # 1. Greedy on the scifi dimensions ----------------------------------------------------
    device = torch.device(args.device)
    cfg = ModelConfig(dropout=0.0)  # the seed's defaults: 512 x 12 x 8, vocab 100,256, ctx 128
    plain = build_model(cfg).eval().to(device)
    ours = prepare_model(copy.deepcopy(plain))
    bf16 = prepare_model(copy.deepcopy(plain), torch.bfloat16)
    small_pages = {dtype: in_small_pages(prepare_model(copy.deepcopy(plain), dtype))
                   for dtype in (None, torch.bfloat16)}
    stepped = prepare_model(copy.deepcopy(plain))
    stepped_bf16 = prepare_model(copy.deepcopy(plain), torch.bfloat16)
    stepped.native_decode = stepped_bf16.native_decode = False
    native = device.type == "cpu" and native_decoder(ours) is not None
    hf = hf_gpt2(cfg).to(device)
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), device=device)
    ids = prompt[0].tolist()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{args.threads} threads")
    print(f"greedy, batch 1, scifi dimensions, {where}, prompt 8, {new} new "
          f"tokens, {args.rounds} rounds; native decoding steps: {'yes' if native else 'no'}")
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    names = {"fp32": "llm, fp32, KV cache", "bf16": "llm, bf16, KV cache"}
    per_run: dict[str, list[float]] = {}
    bounds: dict[str, list[float]] = {}
    alone = {f"llm, {dtype}, native step alone": (native_alone(model, ids, new), new)
             for dtype, model in (("fp32", ours), ("bf16", bf16))} if native else {}
    bounded = {dtype: (names[dtype], f"llm, {dtype}, native step alone",
                       f"llm, {dtype}, KV cache, PyTorch steps (oneDNN)") for dtype in names}
    need = {dtype: bytes_per_token(model) for dtype, model in (("fp32", ours), ("bf16", bf16))}
    probes: dict[str, BandwidthProbe] = {}
    for dtype in names:
        probes |= dict.fromkeys(bounded[dtype], BandwidthProbe(device, need[dtype]))
    speed = measure({
        "transformers GPT2 generate (fp32, cache)": (hf_generate(hf, prompt, new), new),
        "transformers GPT2 generate (bf16, cache)": (hf_generate(hf_bf16, prompt, new), new),
        names["fp32"]: (ours_greedy(ours, ids, new), new),
        names["bf16"]: (ours_greedy(bf16, ids, new), new),
        "llm, fp32, KV cache, PyTorch steps (oneDNN)": (ours_greedy(stepped, ids, new), new),
        "llm, bf16, KV cache, PyTorch steps (oneDNN)": (ours_greedy(stepped_bf16, ids, new),
                                                         new),
        "llm, fp32, KV cache, 4 KiB pages": (ours_greedy(small_pages[None], ids, new), new),
        "llm, bf16, KV cache, 4 KiB pages": (ours_greedy(small_pages[torch.bfloat16], ids, new),
                                             new),
        "llm, fp32, KV cache, nn.Linear (MKL)": (ours_greedy(plain, ids, new), new),
        "llm, fp32, no cache": (ours_greedy(ours, ids, new, use_cache=False), new),
        **alone,
    }, args.rounds, per_run, probes, bounds)
    del probes
    report(speed)
    print(f"  {'':<44} {'run':>7} {'step':>7} {'p10':>7}")
    hf_speed, fp32 = speed["transformers GPT2 generate (fp32, cache)"], speed[names["fp32"]]
    bf16_speed = speed[names["bf16"]]
    ratio("fp32 cache / transformers fp32", fp32, hf_speed, "(target >= 1.6x)")
    ratio("bf16 cache / transformers bf16", bf16_speed,
          speed["transformers GPT2 generate (bf16, cache)"], "(target >= 1.6x)")
    ratio("bf16 / fp32, ours", bf16_speed, fp32)
    ratio("native / PyTorch steps, fp32", fp32,
          speed["llm, fp32, KV cache, PyTorch steps (oneDNN)"])
    ratio("native / PyTorch steps, bf16", bf16_speed,
          speed["llm, bf16, KV cache, PyTorch steps (oneDNN)"])
    ratio("huge / 4 KiB pages, fp32", fp32, speed["llm, fp32, KV cache, 4 KiB pages"])
    ratio("huge / 4 KiB pages, bf16", bf16_speed, speed["llm, bf16, KV cache, 4 KiB pages"])
    ratio("oneDNN / nn.Linear (MKL), PyTorch steps, fp32",
          speed["llm, fp32, KV cache, PyTorch steps (oneDNN)"],
          speed["llm, fp32, KV cache, nn.Linear (MKL)"])
    ratio("cache / no cache, fp32", fp32, speed["llm, fp32, no cache"])
    print(f"\nmemory-bandwidth bound ({where}): the best read of a buffer the size of one token's "
          "weights, in huge pages, just before and just after each run")
    for dtype in names:
        best = max(max(bounds[name]) for name in bounded[dtype] if name in bounds)
        for name in bounded[dtype]:
            if name not in per_run:
                continue
            shares = [got * need[dtype] / bound
                      for got, bound in zip(per_run[name], bounds[name], strict=True)]
            overall = statistics.median(per_run[name]) * need[dtype] / best
            print(f"  {name}: {need[dtype] / 1e6:,.0f} MB of weights per token; median step at "
                  f"{statistics.median(shares):.0%} of the bound beside its run (runs in turn: "
                  + " ".join(f"{share:.0%}@{bound / 1e9:.0f}"
                             for share, bound in zip(shares, bounds[name], strict=True))
                  + f" GB/s); {overall:.0%} of the best reading for {dtype} "
                  f"({best / 1e9:.1f} GB/s, {best / need[dtype]:,.1f} tokens/s); target >= 80%")
    if args.by_level > 0:
        shares_by_level({names[dtype]: (ours_greedy(model, ids, new),
                                        BandwidthProbe(device, need[dtype]), need[dtype])
                         for dtype, model in (("fp32", ours), ("bf16", bf16))}, args.by_level)
    del plain, ours, bf16, stepped, stepped_bf16, hf, hf_bf16, small_pages
    if device.type != "cpu":
        return

    # 2. Beam search on a small model ------------------------------------------------------
    small = ModelConfig(vocab_size=8192, context_length=128, d_model=128, num_blocks=4,
                        num_heads=4, dropout=0.0)
    model = prepare_model(build_model(small))
    hf_small = hf_gpt2(small)
    prompt = torch.randint(0, small.vocab_size, (1, 8))
    beams = 4
    print(f"\nbeam search, {beams} beams, small model (d_model 128, 4 blocks, vocabulary 8,192), "
          f"{new} new tokens")
    beam = measure({
        "transformers GPT2 beam search": (hf_generate(hf_small, prompt, new, beams), new),
        "llm beam search": (ours_beam(model, prompt[0].tolist(), new, beams), new),
    }, args.rounds)
    report(beam)
    ratio("llm / transformers", beam["llm beam search"], beam["transformers GPT2 beam search"],
          "(target >= 1x)")


if __name__ == "__main__":
    main()
