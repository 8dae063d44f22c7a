"""Training-step speed: model FLOPs utilisation, and ratios against nanoGPT and the seed.

    python benchmarks/bench_train.py                 # CPU, 2 threads, scifi dims, 8 x 128, fp32
    python benchmarks/bench_train.py --precision bf16   # + ours fp32 and nanoGPT fp32 baselines
    python benchmarks/bench_train.py --compile          # what torch.compile buys (vs eager)
    python benchmarks/bench_train.py --wait-quiet 600   # on a shared machine: wait for idle CPUs
    python benchmarks/bench_train.py --device cuda --batch-size 96 --precision bf16 --compile

Each variant trains in its own process (as a user's run would; 140M-parameter models sharing
one process slow each other down), all in the same run, in interleaved rounds, keeping the best
sample of each
(on a shared machine the least-disturbed sample is the closest to what the code can do), so the
figures are ratios that survive a busy machine:
- the peak: matmul FLOP/s of a large torch.mm at each precision measured, with the same thread
  count (CPU), or the card's dense peak from a table (GPU);
- ours: the real training step of `llmcli.train.loop` (fused AdamW, clipping, decay split);
  with --precision bf16 or --compile, ours in eager fp32 too: the baseline the speed-up is of
  (and with both, ours eager at that precision: what compiling alone buys);
- nanoGPT: karpathy/nanoGPT's model.py shape (GPT-2 blocks, untied head, F.cross_entropy on
  full logits, fused AdamW, autocast for bf16), at the same dimensions;
- the seed: the tutorial's model as it wrote it (one module per head with its own Q/K/V
  Linear layers, an explicit masked softmax, concatenated heads) and its plain AdamW.
MFU = 6·N_matmul + 12·L·d·T FLOPs per token (the PaLM/nanoGPT convention) x tokens/s / peak.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmcli.model.count import count_parameters, flops_per_token  # noqa: E402
from llmcli.model.gpt import build_model  # noqa: E402
from llmcli.recipe import load_recipe  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The seed's model, as the tutorial wrote it (for the baseline only).


class SeedFeedForward(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d),
                                 nn.Dropout(dropout))

    def forward(self, x):
        return self.ffn(x)


class SeedHead(nn.Module):
    def __init__(self, d: int, head_size: int, context: int, dropout: float):
        super().__init__()
        self.key_layer = nn.Linear(d, head_size, bias=False)
        self.query_layer = nn.Linear(d, head_size, bias=False)
        self.value_layer = nn.Linear(d, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(context, context)))
        self.dropout_layer = nn.Dropout(dropout)
        self.head_size = head_size

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.query_layer(x), self.key_layer(x), self.value_layer(x)
        weights = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))
        weights = weights.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        weights = F.softmax(weights, dim=-1)
        weights = self.dropout_layer(weights)
        return weights @ v


class SeedMultiHead(nn.Module):
    def __init__(self, d: int, heads: int, context: int, dropout: float):
        super().__init__()
        self.heads = nn.ModuleList(SeedHead(d, d // heads, context, dropout)
                                   for _ in range(heads))
        self.projection_layer = nn.Linear(d, d)
        self.dropout_layer = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.dropout_layer(self.projection_layer(out))


class SeedBlock(nn.Module):
    def __init__(self, d: int, heads: int, context: int, dropout: float):
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(d)
        self.layer_norm_2 = nn.LayerNorm(d)
        self.multi_head_attention_layer = SeedMultiHead(d, heads, context, dropout)
        self.feed_forward_layer = SeedFeedForward(d, dropout)

    def forward(self, x):
        x = x + self.multi_head_attention_layer(self.layer_norm_1(x))
        return x + self.feed_forward_layer(self.layer_norm_2(x))


class SeedModel(nn.Module):
    def __init__(self, vocab: int, d: int, blocks: int, heads: int, context: int,
                 dropout: float):
        super().__init__()
        self.d, self.context = d, context
        self.token_embedding_lookup_table = nn.Embedding(vocab, d)
        self.transformer_blocks = nn.Sequential(
            *[SeedBlock(d, heads, context, dropout) for _ in range(blocks)], nn.LayerNorm(d))
        self.language_model_out_linear_layer = nn.Linear(d, vocab)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        # The tutorial rebuilt the sinusoidal table in every forward pass.
        table = torch.zeros(self.context, self.d)
        position = torch.arange(0, self.context, dtype=torch.float).unsqueeze(1)
        div = torch.exp(torch.arange(0, self.d, 2).float() * (-math.log(10000.0) / self.d))
        table[:, 0::2] = torch.sin(position * div)
        table[:, 1::2] = torch.cos(position * div)
        x = self.token_embedding_lookup_table(idx) + table[:T, :].to(idx.device)
        x = self.transformer_blocks(x)
        logits = self.language_model_out_linear_layer(x)
        loss = None
        if targets is not None:
            B, T, C = logits.shape
            loss = F.cross_entropy(logits.view(B * T, C), targets.view(B * T))
        return logits, loss


# ---------------------------------------------------------------------------------------------
# nanoGPT's model (karpathy/nanoGPT model.py) in its shape: learned positions, fused c_attn with
# bias, SDPA, GELU MLP, LayerNorm, untied bias-free lm_head, F.cross_entropy on full logits,
# fused AdamW with decay on matrices, autocast for bf16. Written here for the baseline only.


class NanoAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.heads, self.dropout = heads, dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training
                                           else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = NanoAttention(d, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                 nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, d: int, blocks: int, heads: int, context: int,
                 dropout: float):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(NanoBlock(d, heads, dropout) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                       ignore_index=-1)

    def optimizer(self, lr: float, betas: tuple[float, float], decay: float, fused: bool):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


# ---------------------------------------------------------------------------------------------


class RandomBatches:
    """A BatchSource of random token windows (speed does not depend on the text)."""

    def __init__(self, vocab: int, batch: int, context: int, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab, self.batch, self.context = vocab, batch, context
        self.tokens_per_batch = batch * context

    def get_batch(self, split):
        w = torch.randint(0, self.vocab, (self.batch, self.context + 1), generator=self.gen)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self):
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["rng"])


def cpu_peak_sample(n: int = 2048, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """FLOP/s (by wall, by CPU time) of one large torch.mm with the current threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    wall, cpu = timed(lambda: torch.mm(a, b), torch.device("cpu"))
    return 2 * n**3 / wall, 2 * n**3 / cpu


def cpu_busy_elsewhere(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy during `seconds` while this process sleeps (Linux)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except OSError:
        return 0.0
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_for_quiet(limit: float, threshold: float = 0.15) -> float:
    """Wait (up to `limit` s) until other processes leave the CPUs mostly idle."""
    deadline = time.monotonic() + limit
    busy = cpu_busy_elsewhere()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy_elsewhere()
    return busy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds per thread): the second ignores time spent descheduled."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    sync(device)
    return time.perf_counter() - t0, (time.process_time() - c0) / torch.get_num_threads()


def ours_step(recipe_path: str, overrides: list[str], precision: str, compile_: bool,
              device: torch.device, scratch: Path):
    """(recipe, model, step function) of the real training step at one precision."""
    from llmcli.train.loop import Trainer

    recipe = load_recipe(recipe_path, overrides + [f"train.precision={precision}",
                                                  f"train.compile={compile_}"])
    m = recipe.model
    torch.manual_seed(0)
    model = build_model(m, device)
    batch, context = recipe.train.batch_size, m.context_length
    trainer = Trainer(recipe, model, RandomBatches(int(m.vocab_size), batch, context), scratch,
                      device, None, None)
    trainer.metrics.enabled = False
    net = trainer.training_net()
    net.train()
    return recipe, model, lambda: trainer.train_step(net)


def nanogpt_step(recipe, precision: str, compile_: bool, device: torch.device):
    m, t = recipe.model, recipe.train
    torch.manual_seed(0)
    model = NanoGPT(int(m.vocab_size), m.d_model, m.num_blocks, m.num_heads, m.context_length,
                    m.dropout).to(device)
    optimizer = model.optimizer(t.lr, (t.beta1, t.beta2), t.weight_decay,
                                fused=device.type in ("cuda", "cpu"))
    batches = RandomBatches(int(m.vocab_size), t.batch_size, m.context_length, seed=1)
    net = torch.compile(model) if compile_ else model
    net.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        x, y = batches.get_batch("train")
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = net(x.to(device), y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seed_step(recipe, device: torch.device):
    m = recipe.model
    torch.manual_seed(0)
    seed = SeedModel(int(m.vocab_size), m.d_model, m.num_blocks, m.num_heads,
                     m.context_length, m.dropout).to(device)
    optimizer = torch.optim.AdamW(seed.parameters(), lr=recipe.train.lr)
    batches = RandomBatches(int(m.vocab_size), recipe.train.batch_size, m.context_length)
    seed.train()

    def step() -> None:
        x, y = batches.get_batch("train")
        _, loss = seed(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in seed.parameters())


def build_step(spec: dict, device: torch.device, scratch: Path):
    """One variant's training step, built from its description (in the worker process)."""
    kind, precision, compile_ = spec["kind"], spec["precision"], spec["compile"]
    if kind == "ours":
        return ours_step(spec["recipe"], spec["overrides"], precision, compile_, device,
                         scratch)[2]
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    if kind == "nanoGPT":
        return nanogpt_step(recipe, precision, compile_, device)
    return seed_step(recipe, device)[0]


def worker(conn, spec: dict, device_name: str, threads: int, warmup: int) -> None:
    """Runs one variant in its own process: models this size interfere when they share one
    (4 x 2 GB of weights and optimizer state, allocator and cache effects), and a user trains
    one model per process anyway. Answers each request with one step's (wall, CPU) seconds."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    with tempfile.TemporaryDirectory() as scratch:
        step = build_step(spec, device, Path(scratch))
        for _ in range(warmup):
            step()
        conn.send("ready")
        while conn.recv() == "step":
            conn.send(timed(step, device))


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """The options that say which training step to run (profile_train.py takes them too)."""
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "scifi.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true",
                    help="compile ours (and nanoGPT, as its train.py does)")
    ap.add_argument("--compile-mode", default="default",
                    help="ours' train.compile_mode; several, comma-separated, run ours once in "
                    "each (in this benchmark the first is the one the ratios are of)")
    ap.add_argument("--dropout", type=float, default=None, help="override model.dropout")


def step_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe overrides those options make."""
    overrides = [f"train.batch_size={args.batch_size}", f"model.context_length={args.context}"]
    if args.dropout is not None:
        overrides.append(f"model.dropout={args.dropout}")
    return overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(ap)
    ap.add_argument("--steps", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-seed", action="store_true",
                    help="skip the seed baseline (run only with fp32, eager)")
    ap.add_argument("--no-nanogpt", action="store_true", help="skip the nanoGPT baseline")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each round wait up to this long for other processes to "
                    "leave the CPUs idle (for shared machines)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = step_overrides(args)
    recipe = load_recipe(args.recipe, overrides)
    m = recipe.model
    tokens = args.batch_size * args.context
    meta_model = build_model(m, "meta")
    n_params, _ = count_parameters(meta_model)
    fpt = flops_per_token(meta_model, args.context)
    label = args.precision + (" + compile" if args.compile else "")

    def spec(kind: str, precision: str, compile_: bool, extra: tuple[str, ...] = ()) -> dict:
        return {"kind": kind, "precision": precision, "compile": compile_,
                "recipe": args.recipe, "overrides": overrides + list(extra)}

    modes = args.compile_mode.split(",") if args.compile else ["default"]
    specs = {f"ours {label}" + (f" ({mode})" if len(modes) > 1 or mode != "default" else ""):
             spec("ours", args.precision, args.compile, (f"train.compile_mode={mode}",))
             for mode in modes}
    baseline = args.precision != "fp32" or args.compile
    if args.compile and args.precision != "fp32":  # what compiling alone buys
        specs[f"ours {args.precision}"] = spec("ours", args.precision, False)
    if baseline:  # the same code in fp32, eager: what the faster path is measured against
        specs["ours fp32"] = spec("ours", "fp32", False)
    if not args.no_nanogpt:
        specs[f"nanoGPT {label}"] = spec("nanoGPT", args.precision, args.compile)
        if baseline:
            specs["nanoGPT fp32"] = spec("nanoGPT", "fp32", False)
    if not args.no_seed and not baseline:  # the tutorial's code: an fp32 eager comparison
        specs["seed fp32"] = spec("seed", "fp32", False)

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers = {}
    for name, sp in specs.items():  # one at a time, so warm-up steps do not compete
        here, there = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(there, sp, args.device, args.threads,
                                                args.warmup + (2 if sp["compile"] else 0)))
        proc.start()
        if here.recv() != "ready":
            sys.exit(f"{name}: the worker failed to start")
        workers[name] = (proc, here)

    from llmcli.hardware import peak_flops

    # Interleaved rounds, best of each: on a shared machine the least-disturbed sample is the
    # closest to what the code can do, and every figure meets the same load.
    runs = list(workers)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    precisions = sorted({sp["precision"] for sp in specs.values()})
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    samples: dict[str, list[tuple[float, float]]] = {p: [] for p in precisions}
    busy_seen = []
    for _ in range(args.steps):
        if device.type == "cpu" and args.wait_quiet:
            busy_seen.append(wait_for_quiet(args.wait_quiet))
        if device.type == "cpu":
            for p in precisions:
                samples[p].extend(cpu_peak_sample(dtype=dtypes[p]) for _ in range(3))
        for name, (_, conn) in workers.items():
            conn.send("step")
            times[name].append(conn.recv())
    for proc, conn in workers.values():
        conn.send("stop")
        proc.join()
    on_cpu = device.type == "cpu"
    if on_cpu:  # each precision's matmul peak, measured: MFU of a bf16 step is against bf16's
        peak = {p: max(s[0] for s in samples[p]) for p in precisions}
        cpu_peak = {p: max(s[1] for s in samples[p]) for p in precisions}
        peak_name = f"measured torch.mm peak (2048^2, {args.threads} threads)"
    else:
        peak = cpu_peak = {p: peak_flops(device, p) or float("nan") for p in precisions}
        peak_name = f"{torch.cuda.get_device_name(device)} dense peak (table)"

    best = {name: min(t[0] for t in ts) for name, ts in times.items()}
    cpu_best = {name: min(t[1] for t in ts) for name, ts in times.items()}
    peaks_text = ", ".join(f"{p} {peak[p] / 1e9:,.1f}" + (f" (by CPU time {cpu_peak[p] / 1e9:,.1f})"
                                                           if on_cpu else "")
                           for p in precisions)
    print(f"device         {device}; {peak_name}, GFLOP/s: {peaks_text}")
    if busy_seen:
        print(f"load           other processes kept {min(busy_seen):.0%}-{max(busy_seen):.0%} "
              "of the CPUs busy just before the rounds")
    print(f"model          {recipe.path}: {n_params:,} parameters, {m.num_blocks} blocks, "
          f"d_model {m.d_model}, vocab {m.vocab_size}, dropout {m.dropout}")
    print(f"step           batch {args.batch_size} x {args.context} = {tokens:,} tokens, "
          f"{fpt * tokens / 1e9:,.1f} GFLOP per step; MFU against its precision's peak")
    width = max(len(name) for name in runs) + 2
    for name in runs:
        walls = ", ".join(f"{t[0]:.2f}" for t in times[name])
        p = specs[name]["precision"]
        text = (f"{best[name]:.3f} s/step, {tokens / best[name]:,.0f} tokens/s, MFU "
                f"{fpt * tokens / best[name] / peak[p]:.1%}")
        if on_cpu:  # CPU-time figures: robust when other processes share the cores
            text += f"; by CPU time {cpu_best[name]:.3f} s/step"
        print(f"{name:<{width}} {text}  (wall: {walls})")
    print("ratios         (time per step of the baseline / ours; >1 means ours is faster)")
    pairs = [(runs[0], name) for name in runs[1:]]
    if "ours fp32" in runs and "nanoGPT fp32" in runs and runs[0] != "ours fp32":
        pairs.append(("ours fp32", "nanoGPT fp32"))
    for fast, slow in pairs:
        text = f"{best[slow] / best[fast]:.2f}x"
        if on_cpu:
            text += f" (by CPU time {cpu_best[slow] / cpu_best[fast]:.2f}x)"
        print(f"  {fast:<{width}} vs {slow:<{width}} {text}")


if __name__ == "__main__":
    main()
