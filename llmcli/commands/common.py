"""What the training commands share: how `--resume` reads its argument, and option texts.

Not a command itself: command modules import this, never each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from llmcli.console import fail

MAX_NPROC = 1024  # processes on one machine (torchrun --standalone): more GPUs than any has
RESUME_HELP = ("Continue the run exactly from its newest checkpoint; put a checkpoint file or run "
               "directory after it to resume from that one, or `auto` to take the newest intact "
               "one when the newest is damaged.")
OVERWRITE_HELP = "Delete an earlier run in the run directory and start afresh."


def path_text(value: str) -> Path:
    """Every path argument's parser: an empty one is refused, not read as the current folder
    (`-o ""` from an unset shell variable would otherwise write there)."""
    if not value:
        raise typer.BadParameter("an empty path; give a file or folder name")
    return Path(value)


def given(ctx: typer.Context, *names: str) -> list[str]:
    """The options (and arguments) among `names` that the command line sets, as the user knows
    them (`--count`, `SOURCE`): one left at its default says nothing, whatever its value."""
    return [param.opts[0] if param.param_type_name == "option" else param.name.upper()
            for param in ctx.command.params
            if param.name in names
            and getattr(ctx.get_parameter_source(param.name), "name", "") == "COMMANDLINE"]


def refuse_unused(ctx: typer.Context, names: tuple[str, ...], why: str) -> None:
    """Refuse in one line the options among `names` given where they do nothing (`why` says
    why and how to fix it): an option dropped in silence is a result nobody asked for."""
    flags = given(ctx, *names)
    if flags:
        fail(f"{', '.join(flags)}: {why}")


def recipe_first(recipe: Path, items: list[str], resume: bool) -> tuple[Path, list[str]]:
    """The recipe and the other positionals, with the recipe the YAML one: `--resume auto R`
    put the checkpoint (`auto`) where the recipe is expected."""
    yaml = [item for item in items if "=" not in item and Path(item).suffix.lower() in _YAML]
    if resume and Path(recipe).suffix.lower() not in _YAML and len(yaml) == 1:
        return Path(yaml[0]), [str(recipe) if item == yaml[0] else item for item in items]
    return recipe, items


_YAML = (".yaml", ".yml")


def split_resume(items: list[str], resume: bool) -> tuple[list[str], Any]:
    """With --resume, a positional argument without '=' is the checkpoint to resume from."""
    paths = [item for item in items if "=" not in item]
    rest = [item for item in items if "=" in item]
    if paths and not resume:
        fail(f"'{paths[0]}': overrides look like section.key=value (e.g. train.max_iters=100); "
             "to resume from a checkpoint use --resume PATH")
    if len(paths) > 1:
        fail(f"--resume takes one checkpoint, got {', '.join(paths)}")
    if not resume:
        return rest, None
    return rest, (paths[0] if paths else True)

# torchrun's multi-machine settings, shared by `llm pretrain` and `llm finetune`.
MAX_NNODES = 100_000
NNODES_HELP = ("Machines to train on (torchrun's --nnodes): run the same command on each, with "
               "--rdzv-endpoint or --master-addr/--node-rank; --nproc is then per machine.")
NODE_RANK_HELP = "This machine's rank, 0 to nnodes-1 (with --master-addr; 0 is that machine)."
RDZV_HELP = ("HOST:PORT where the machines meet (torchrun's c10d rendezvous; HOST one of them, "
             "PORT free there); ranks are handed out there.")
MASTER_ADDR_HELP = "Node 0's address (static rendezvous, with --node-rank and --master-port)."
MASTER_PORT_HELP = "A free port on node 0 (default 29500)."


def launch_options(nproc: int, nnodes: int, node_rank: int | None, rdzv_endpoint: str | None,
                   master_addr: str | None, master_port: int | None) -> Any:
    """The `Launch` the options describe, checked (one-line errors), before any worker starts."""
    from llmcli.console import check_range

    check_range("--nnodes", nnodes, 1, MAX_NNODES, "machines")
    from llmcli.train.distributed import Launch

    launch = Launch(nproc, nnodes, node_rank, rdzv_endpoint, master_addr, master_port)
    launch.check()
    return launch


def check_before_launch(recipe: Any, launch: Any, device: str, run_dir: Path | None,
                        resume: Any, overwrite: bool, finetune: bool = False) -> None:
    """What every worker would refuse, refused once before any starts (they would refuse it
    only after loading the data, each saying so); `finetune`: its base must exist too."""
    import torch

    from llmcli.checkpoint import (
        check_run_dir,
        default_run_dir,
        refuse_cleared_inputs,
        resolve_checkpoint,
    )
    from llmcli.data.fetch import check_source
    from llmcli.device import check_device
    from llmcli.train.precision import check_sharded_precision

    if check_device(device).type == "cuda" and launch.nproc > torch.cuda.device_count():
        count = torch.cuda.device_count()
        fail(f"--nproc {launch.nproc}: this machine has {count} CUDA device(s), one per "
             f"process; use --nproc {count} or fewer")
    check_sharded_precision(recipe.train.precision, recipe.train.parallel == "fsdp")
    inputs = [("data.source", Path(source)) for source in recipe.data.sources]
    for source in recipe.data.sources:
        check_source(source)
    if finetune and recipe.finetune.init and resume is None:  # a resume names its own base
        inputs.append(("finetune.init", resolve_checkpoint(recipe.finetune.init)))
    if launch.nnodes == 1:  # elsewhere it may be another machine's directory that counts
        where = run_dir or default_run_dir(recipe)
        old = check_run_dir(where, resuming=resume is not None, overwrite=overwrite)
        if resume is None:
            refuse_cleared_inputs(where, old, inputs, overwrite)


NPROC_MEMORY_HELP = ("Also show the memory per device when training with this many processes, "
                     "under DDP and under FSDP (train.parallel).")
DEVICE_MEMORY_HELP = "Memory of one device for that comparison: 80GiB (default), 141G, 24GB."


def print_device_memory(mem: dict[str, Any]) -> None:
    """The DDP vs FSDP table of `llmcli.scaling.device_memory`, then its verdict."""
    from rich.table import Table

    from llmcli.console import out
    from llmcli.scaling import format_bytes

    def cell(value: int | None) -> str:
        return "?" if value is None else format_bytes(value)

    table = Table(title=f"memory per device with {mem['processes']} process(es), "
                  f"{mem['precision']} compute, {format_bytes(mem['device_bytes'])} each "
                  "(activations extra)", title_justify="left")
    for column in ("", "weights", "gradients", "AdamW", "buffers", "total", "fits"):
        table.add_column(column, justify="left" if column in ("", "fits") else "right")
    for name, label in (("ddp", "DDP"), ("fsdp", "FSDP")):
        row = mem[name]
        table.add_row(label, *(cell(row[k]) for k in ("weights", "gradients", "adamw",
                                                        "working", "total")),
                      "yes" if row["fits"] else "no")
    out.print(table)
    out.print("buffers: DDP's gradient buckets; FSDP's gathered working copies (the root and "
              "two blocks, their unsharded gradients)")
    if not mem["shape_known"] and mem["processes"] > 1:
        out.print("note: FSDP's working copies depend on the model's shape and are left out: "
                  "give a recipe (--recipe) for them")
    out.print(f"verdict: {mem['verdict']}")
