"""`llm finetune`: turn a pretrained completer into an assistant on instruction records."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcli import console
from llmcli.commands.common import (
    MASTER_ADDR_HELP,
    MASTER_PORT_HELP,
    MAX_NPROC,
    NNODES_HELP,
    NODE_RANK_HELP,
    OVERWRITE_HELP,
    RDZV_HELP,
    RESUME_HELP,
    check_before_launch,
    launch_options,
    path_text,
    recipe_first,
    split_resume,
)
from llmcli.console import check_output, check_range, check_readable, fail, one_line, run_guarded
from llmcli.device import DEVICE_HELP


def command(
    recipe: Path = typer.Argument(
        ..., help="Fine-tuning recipe (YAML); with --merge alone, a LoRA adapter file or run "
        "directory to merge into its base.", parser=path_text),
    overrides: list[str] = typer.Argument(
        None, help="Recipe overrides section.key=value, e.g. finetune.init=checkpoints/tiny "
        "lora.rank=8 train.max_iters=200"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory (default checkpoints/<recipe name>); with "
        "--merge ADAPTER, the merged .safetensors file (an existing one only if it is a merge "
        "of the same run).", parser=path_text),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    merge: bool = typer.Option(
        False, "--merge", help="After a LoRA run, also write merged.safetensors (base + "
        "adapter); `llm finetune --merge ADAPTER` merges an existing adapter."),
    strict: bool = typer.Option(
        False, "--strict", help="Refuse malformed records instead of skipping them."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    nproc: int = typer.Option(1, "--nproc", help="Processes (DDP via torchrun)."),
    nnodes: int = typer.Option(1, "--nnodes", help=NNODES_HELP),
    node_rank: int | None = typer.Option(None, "--node-rank", help=NODE_RANK_HELP),
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help=RDZV_HELP),
    master_addr: str | None = typer.Option(None, "--master-addr", help=MASTER_ADDR_HELP),
    master_port: int | None = typer.Option(None, "--master-port", help=MASTER_PORT_HELP),
) -> None:
    """Fine-tune a checkpoint on Alpaca-style records, fully or with LoRA adapters.

    The loss covers the answers only; the prompt template is stored for `llm generate
    --instruct`. Examples: `llm finetune recipes/tiny-lora.yaml --merge`, `llm finetune
    recipes/tiny-finetune.yaml train.max_iters=50 --resume`, `llm finetune --merge
    checkpoints/tiny-lora`.
    """

    def body() -> None:
        from llmcli.recipe import load_recipe

        stdout = console.out
        check_range("--nproc", nproc, 1, MAX_NPROC, "one process per GPU")
        recipe_path, given = recipe_first(recipe, list(overrides or []), resume)
        check_readable(recipe_path, "RECIPE")

        if merge and (recipe_path.suffix == ".safetensors" or recipe_path.is_dir()):
            if given or resume or overwrite or nproc > 1 or nnodes > 1:
                fail("--merge ADAPTER takes no overrides or --resume; to train and merge, give "
                     "a recipe: llm finetune RECIPE --merge")
            if out is not None:
                check_output(out, "--out", file=None)  # a folder gets merged.safetensors
            from llmcli.finetune import merge_adapter

            stdout.print(one_line(f"merged checkpoint: {merge_adapter(recipe_path, out)}"))
            return
        if recipe_path.suffix == ".safetensors":
            fail(f"{recipe_path}: a checkpoint, not a recipe; add --merge to merge a LoRA "
                 "adapter, or give a recipe such as recipes/tiny-lora.yaml")
        if out is not None:
            check_output(out, "--out", file=False)
        items, resume_spec = split_resume(given, resume)
        loaded = load_recipe(recipe_path, items)  # checked once, before any worker starts
        launch = launch_options(nproc, nnodes, node_rank, rdzv_endpoint, master_addr,
                                master_port)
        if launch.needed:
            from llmcli.train.distributed import relaunch_under_torchrun

            check_before_launch(loaded, launch, device, out, resume_spec, overwrite,
                                finetune=True)
            relaunch_under_torchrun(launch)
        from llmcli.finetune import finetune
        from llmcli.train.distributed import from_env

        run = finetune(loaded, run_dir=out, device=device, resume=resume_spec,
                       overwrite=overwrite, strict=strict, merge=merge)
        if not from_env().is_main:
            return
        r = run.result
        stdout.print(f"fine-tuned to step {r.step}: train loss {_fmt(r.train_loss)}, "
                     f"validation loss {_fmt(r.val_loss)} (best {_fmt(r.best_val)} at step "
                     f"{r.best_step}); trained {run.trainable:,} of {run.total:,} parameters")
        if r.checkpoint is not None:
            kind = "adapter" if run.lora else "checkpoint"
            stdout.print(one_line(f"{kind}: {r.checkpoint}"))
        if run.merged is not None:
            stdout.print(one_line(f"merged checkpoint: {run.merged}"))

    run_guarded(body)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
