"""`llm imagine`: draw images from a prompt with a diffusers pipeline (sdxl-turbo by default)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from llmcli.console import as_utf8, check_output, clip, fail, one_line, run_guarded
from llmcli.device import DEVICE_HELP
from llmcli.imagine import (  # llmcli.imagine imports diffusers only when it runs
    DEFAULT_MODEL,
    MAX_SIDE,
)

# The upper ends that ImageRequest.validate() leaves open: a typo must not run for days.
MAX_STEPS = 1000  # diffusion schedules have 1000 training timesteps
MAX_IMAGES = 10_000


def command(
    prompt: str = typer.Argument(..., help="What to draw, e.g. \"画一个大海\" (draw a sea).",
                                 parser=as_utf8),
    out: str | None = typer.Option(
        None, "--out", "-o",
        help="PNG file, or a folder for default names (default: "
        "checkpoints/images/<prompt>-<seed>.png); numbered -1, -2, ... with --num-images."),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", "-m",
        help="Hugging Face model id, or a folder saved with save_pretrained / "
        "`hf download ID --local-dir DIR`."),
    steps: int | None = typer.Option(
        None, "--steps", help="Denoising steps (default: 1, right for turbo models; 25-50 for "
        "others)."),
    guidance: float = typer.Option(
        0.0, "--guidance", help="Classifier-free guidance scale (0 for turbo models, 5-8 others)."),
    width: int = typer.Option(512, "--width", help="Image width in pixels (multiple of 8)."),
    height: int = typer.Option(512, "--height", help="Image height in pixels (multiple of 8)."),
    seed: int | None = typer.Option(
        None, "--seed", help="Noise seed; image i uses seed+i (default: random, printed)."),
    negative: str | None = typer.Option(
        None, "--negative", help="What to steer away from (needs --guidance above 1).",
        parser=as_utf8),
    num_images: int = typer.Option(
        1, "--num-images", "-n", help="How many images; the pipeline is loaded once."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (fp16 + fp16 weights on CUDA, fp32 elsewhere), fp32, fp16 "
        "or bf16."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Make images from a text prompt with Stable Diffusion (sdxl-turbo: one step, no guidance).

    Each PNG carries its prompt, negative prompt, seed, steps, guidance, model and size as text
    metadata. Prints each file with its seed and time, then the model load time separately.
    Without the model on disk and without a network, it says how to fetch it.
    """

    def body() -> None:
        from llmcli.console import out as stdout
        from llmcli.console import warn
        from llmcli.imagine import (
            ImageRequest,
            SavedImage,
            imagine,
            output_paths,
            random_seed,
        )

        for name, value, lo, hi in (("--steps", steps, 1, MAX_STEPS),
                                    ("--num-images", num_images, 1, MAX_IMAGES),
                                    ("--width", width, 8, MAX_SIDE),
                                    ("--height", height, 8, MAX_SIDE)):
            if value is not None and not -hi <= value <= hi:  # validate() computes with them
                fail(f"{name} {clip(str(value), 40)}: must be from {lo} to {hi:,}")
        request = ImageRequest(
            prompt=prompt, negative=negative, steps=1 if steps is None else steps,
            guidance=guidance, width=width, height=height,
            seed=random_seed() if seed is None else seed, num_images=num_images)
        request.validate()
        if out is not None:
            check_output(Path(out), "-o", file=None)
            output_paths(out, prompt, request.seed, request.num_images)  # before the slow load
        if steps is None and "turbo" not in model.lower():
            warn("1 step is for turbo models; others need e.g. --steps 30 --guidance 7")

        def show(saved: SavedImage) -> None:
            if not json_out:
                stdout.print(one_line(f"{saved.path}  seed {saved.seed}  {saved.seconds:.2f} s"),
                             markup=False)

        result = imagine(request, out=out, model=model, device=device, dtype=dtype,
                         on_saved=show)
        if json_out:
            stdout.print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2), markup=False)
            return
        total = sum(img.seconds for img in result.images)
        count = len(result.images)
        stdout.print(f"elapsed {total:.2f} s for {count} image{'s' if count > 1 else ''} "
                     f"({total / count:.2f} s each), model load {result.loaded.seconds:.2f} s")

    run_guarded(body)
