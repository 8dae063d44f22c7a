"""Training-step speed: model FLOPs utilisation and the speed-up over the seed's implementation.

    python benchmarks/bench_train.py                 # CPU, 2 threads, scifi dims, 8 x 128, fp32
    python benchmarks/bench_train.py --wait-quiet 600   # on a shared machine: wait for idle CPUs
    python benchmarks/bench_train.py --device cuda --batch-size 96 --precision bf16 --compile

Everything is measured in the same run, in interleaved rounds, keeping the best sample of each
(on a shared machine the least-disturbed sample is the closest to what the code can do), so the
figures are ratios that survive a busy machine:
- the peak: fp32 matmul FLOP/s of a large torch.mm with the same thread count (CPU), or the
  card's dense peak from a table (GPU);
- ours: the real training step of `llmcli.train.loop` (fused AdamW, clipping, decay split);
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


def cpu_peak_sample(n: int = 2048) -> tuple[float, float]:
    """FLOPs and (wall, CPU) seconds of one large fp32 torch.mm with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "scifi.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dropout", type=float, default=None, help="override model.dropout")
    ap.add_argument("--steps", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-seed", action="store_true", help="skip the seed baseline")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each round wait up to this long for other processes to "
                    "leave the CPUs idle (for shared machines)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = [f"train.batch_size={args.batch_size}", f"model.context_length={args.context}",
                 f"train.precision={args.precision}", f"train.compile={args.compile}"]
    if args.dropout is not None:
        overrides.append(f"model.dropout={args.dropout}")
    recipe = load_recipe(args.recipe, overrides)
    m = recipe.model
    tokens = args.batch_size * args.context

    from llmcli.hardware import peak_flops
    from llmcli.train.loop import Trainer

    torch.manual_seed(0)
    ours = build_model(m, device)
    n_params, _ = count_parameters(ours)
    fpt = flops_per_token(ours, args.context)
    scratch = tempfile.TemporaryDirectory()
    trainer = Trainer(recipe, ours, RandomBatches(int(m.vocab_size), args.batch_size,
                                                  args.context), Path(scratch.name), device,
                      None, None)
    trainer.metrics.enabled = False
    net = torch.compile(ours) if args.compile else ours
    net.train()
    runs = {"ours": lambda: trainer.train_step(net)}

    if not args.no_seed:
        # The same model trained the plain nanoGPT way: logits then F.cross_entropy, and
        # AdamW's foreach implementation (nanoGPT fuses only on CUDA). It isolates what the
        # fused output-layer loss and the fused optimizer add.
        torch.manual_seed(0)
        plain = build_model(m, device)
        plain_trainer = Trainer(recipe, plain, RandomBatches(int(m.vocab_size), args.batch_size,
                                                             args.context), Path(scratch.name),
                                device, None, None)
        plain_trainer.metrics.enabled = False
        plain_trainer.fused_loss = False
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in plain_trainer.optimizer.param_groups]
        plain_trainer.optimizer = torch.optim.AdamW(
            groups, lr=recipe.train.lr, betas=(recipe.train.beta1, recipe.train.beta2),
            foreach=True)
        plain.train()
        runs["nanogpt-style"] = lambda: plain_trainer.train_step(plain)

    if not args.no_seed:
        torch.manual_seed(0)
        seed = SeedModel(int(m.vocab_size), m.d_model, m.num_blocks, m.num_heads,
                         m.context_length, m.dropout).to(device)
        seed_params = sum(p.numel() for p in seed.parameters())
        assert seed_params == n_params, (seed_params, n_params)
        optimizer = torch.optim.AdamW(seed.parameters(), lr=recipe.train.lr)
        seed_batches = RandomBatches(int(m.vocab_size), args.batch_size, args.context)
        seed.train()

        def seed_step() -> None:
            x, y = seed_batches.get_batch("train")
            _, loss = seed(x.to(device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        runs["seed"] = seed_step

    # Interleaved rounds, best of each: on a shared machine the least-disturbed sample is the
    # closest to what the code can do, and every figure meets the same load.
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    peaks: list[tuple[float, float]] = []
    for name, step in runs.items():
        for _ in range(args.warmup + (2 if args.compile and name == "ours" else 0)):
            step()
    busy_seen = []
    for _ in range(args.steps):
        if device.type == "cpu" and args.wait_quiet:
            busy_seen.append(wait_for_quiet(args.wait_quiet))
        if device.type == "cpu":
            peaks.extend(cpu_peak_sample() for _ in range(3))
        for name, step in runs.items():
            times[name].append(timed(step, device))
    on_cpu = device.type == "cpu"
    if on_cpu:
        peak = max(p[0] for p in peaks)
        cpu_peak = max(p[1] for p in peaks)
        peak_name = f"measured fp32 torch.mm peak, {args.threads} threads"
    else:
        peak = cpu_peak = peak_flops(device, args.precision) or float("nan")
        peak_name = f"{torch.cuda.get_device_name(device)} dense {args.precision} peak (table)"
    scratch.cleanup()

    def line(name: str) -> tuple[float, float, str]:
        best = min(t[0] for t in times[name])
        cpu_best = min(t[1] for t in times[name])
        text = (f"{best:.3f} s/step, {tokens / best:,.0f} tokens/s, MFU "
                f"{fpt * tokens / best / peak:.1%}")
        if on_cpu:  # CPU-time figures: robust when other processes share the cores
            text += (f"; by CPU time {cpu_best:.3f} s/step, MFU "
                     f"{fpt * tokens / cpu_best / cpu_peak:.1%}")
        text += f"  (wall: {', '.join(f'{t[0]:.2f}' for t in times[name])})"
        return best, cpu_best, text

    def ratio(slow: tuple[float, float], fast: tuple[float, float]) -> str:
        text = f"{slow[0] / fast[0]:.2f}x"
        return text + (f" (by CPU time {slow[1] / fast[1]:.2f}x)" if on_cpu else "")

    print(f"device         {device} ({peak_name}: {peak / 1e9:,.1f} GFLOP/s"
          + (f"; by CPU time {cpu_peak / 1e9:,.1f}" if on_cpu else "") + ")")
    if busy_seen:
        print(f"load           other processes kept {min(busy_seen):.0%}-{max(busy_seen):.0%} "
              "of the CPUs busy just before the rounds")
    print(f"model          {recipe.path}: {n_params:,} parameters, {m.num_blocks} blocks, "
          f"d_model {m.d_model}, vocab {m.vocab_size}, dropout {m.dropout}")
    print(f"step           batch {args.batch_size} x {args.context} = {tokens:,} tokens, "
          f"{args.precision}{' + compile' if args.compile else ''}, "
          f"{fpt * tokens / 1e9:,.1f} GFLOP per step")
    *ours, text = line("ours")
    print(f"ours           {text}")
    if "nanogpt-style" in times:
        *plain, text = line("nanogpt-style")
        print(f"nanogpt-style  {text}")
        print(f"               ours is {ratio(plain, ours)} faster than the nanoGPT-style step")
    if "seed" in times:
        *seed_t, text = line("seed")
        print(f"seed           {text}")
        print(f"speed-up       {ratio(seed_t, ours)} over the seed's implementation")


if __name__ == "__main__":
    main()
