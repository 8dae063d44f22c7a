"""Load time and per-image time of `llm imagine` on the tiny SD and SDXL test pipelines.

Prints, per pipeline and dtype, the load time and the median per-image time, then ratios
measured in the same run: drawing N images with one load against reloading for each image
(why `--num-images` reuses the pipeline), fused SDPA attention against diffusers' plain
attention, and (on CUDA) fp16 against fp32. The tiny models say little about absolute speed
of sdxl-turbo, but the ratios and the fp16 path are the real code's.

    python benchmarks/bench_imagine.py [--device auto] [--images 4] [--size 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers_imagine import build_tiny_sd, build_tiny_sdxl  # noqa: E402

from llmcli.device import resolve_device  # noqa: E402
from llmcli.imagine import ImageRequest, draw, load_pipeline  # noqa: E402


def image_seconds(loaded, request: ImageRequest, count: int) -> list[float]:
    import torch

    times = []
    for seed in range(count):
        start = time.perf_counter()
        draw(loaded, request, seed)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        times.append(time.perf_counter() - start)
    return times


def bench(name: str, model: Path, device, dtype: str, args) -> float:
    from diffusers.models.attention_processor import AttnProcessor

    request = ImageRequest("a calm sea at dawn", steps=args.steps, width=args.size,
                           height=args.size)
    loaded = load_pipeline(str(model), device, dtype)
    image_seconds(loaded, request, 1)  # warm-up: kernels, allocator
    per_image = statistics.median(image_seconds(loaded, request, args.images))
    reused = loaded.seconds + args.images * per_image
    reloads = [load_pipeline(str(model), device, dtype).seconds for _ in range(args.images)]
    reloaded = sum(reloads) + args.images * per_image
    loaded.pipe.unet.set_attn_processor(AttnProcessor())
    image_seconds(loaded, request, 1)
    plain = statistics.median(image_seconds(loaded, request, args.images))
    print(f"{name:5s} {dtype:4s}  load {statistics.median(reloads):6.3f} s  "
          f"image {per_image * 1000:7.1f} ms  "
          f"one load for {args.images} images: {reloaded / reused:4.1f}x faster than reloading  "
          f"SDPA vs plain attention: {plain / per_image:4.2f}x")
    return per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = resolve_device(args.device)
    import torch
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # before diffusers pulls in its image processors
    disable_progress_bars()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()

    label = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device {label}; {args.size}x{args.size}, {args.steps} steps, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        models = {"sd": build_tiny_sd(Path(tmp) / "sd"), "sdxl": build_tiny_sdxl(Path(tmp) / "xl")}
        for name, model in models.items():
            fp32 = bench(name, model, device, "fp32", args)
            if device.type == "cuda":
                fp16 = bench(name, model, device, "fp16", args)
                print(f"{name:5s} fp16 vs fp32 per image: {fp32 / fp16:4.2f}x")


if __name__ == "__main__":
    main()
