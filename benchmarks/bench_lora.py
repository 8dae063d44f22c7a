"""Step time and trainable parameters of LoRA against full fine-tuning, on the same model.

The model has recipes/tiny.yaml's shape, with a compact vocabulary of the distinct cl100k ids
of the shared Alpaca demo records (what a tiny model pretrained on similar text would have); the
batches are those records through the real fine-tuning pipeline (`llmcli.finetune.prepare`).
Both variants are timed in the same process, alternating, so the ratio holds across machines;
LoRA uses recipes/tiny-lora.yaml's targets (every projection and the output layer).

    python benchmarks/bench_lora.py [--steps 10] [--rounds 3] [--rank 8] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from llmcli.checkpoint import save_model
from llmcli.data.tokenizer import get_tokenizer
from llmcli.finetune import prepare
from llmcli.model.count import count_parameters
from llmcli.model.gpt import build_model
from llmcli.pretrain import measure_speed
from llmcli.recipe import build_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def make_base(directory: Path) -> Path:
    from llmcli.data.records import read_records, record_text

    tok = get_tokenizer("cl100k_base")
    texts = [record_text(r) for r in read_records(RECORDS)]
    ids = sorted({i for row in tok.encode_batch(texts) for i in row} | {tok.eot_id})
    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml")
    model_section = {k: getattr(tiny.model, k) for k in
                     ("context_length", "d_model", "num_blocks", "num_heads", "dropout")}
    recipe = build_recipe({"name": "bench-base", "data": {"vocab": "compact"},
                           "model": {**model_section, "vocab_size": len(ids) + 1}})
    torch.manual_seed(0)
    path = directory / "base.safetensors"
    save_model(path, build_model(recipe.model), recipe, tokenizer="cl100k_base", vocab_map=ids)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=None, help="lora.targets (default: the recipe's)")
    parser.add_argument("--lora-dropout", type=float, default=None,
                        help="lora.dropout (default: the recipe's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default); 1 is steadier on a busy "
                        "machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not RECORDS.exists():
        raise SystemExit(f"{RECORDS} not found (the shared demo data)")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp))
        common = [f"finetune.init={base}", f"data.source={RECORDS}", "train.batch_size=16",
                  "train.precision=fp32"]
        lora_extra = []
        if args.targets:
            lora_extra.append(f"lora.targets={args.targets}")
        if args.lora_dropout is not None:
            lora_extra.append(f"lora.dropout={args.lora_dropout}")
        variants = {  # (recipe, overrides): the two fine-tuning recipes as shipped
            "full": ("tiny-finetune.yaml", []),
            f"lora r={args.rank}": ("tiny-lora.yaml", [f"lora.rank={args.rank}", *lora_extra]),
        }
        prepared = {}
        for name, (file, extra) in variants.items():
            recipe = load_recipe(ROOT / "recipes" / file, [*common, *extra])
            prep = prepare(recipe, main=False)
            prepared[name] = (prep, *count_parameters(prep.model))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (prep, _, _) in prepared.items():
                seconds = measure_speed(prep.recipe, prep.model.to(device), prep.batches,
                                        device, args.steps).step
                times[name].append(seconds)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch 16 x "
          f"{prepared['full'][0].recipe.model.context_length} tokens, best of {args.rounds} "
          f"rounds of {args.steps} steps")
    full_time = min(times["full"])
    for name, (_, total, trainable) in prepared.items():
        best = min(times[name])
        print(f"{name:10s} trainable {trainable:>10,} of {total:,} ({trainable / total:6.2%})  "
              f"step {best * 1e3:7.1f} ms (median {statistics.median(times[name]) * 1e3:.1f})  "
              f"speed vs full x{full_time / best:.2f}")


if __name__ == "__main__":
    main()
