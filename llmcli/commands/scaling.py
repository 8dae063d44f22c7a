"""`llm scaling`: Chinchilla planning (model size, tokens, compute, loss, wall-clock), no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from llmcli.commands.common import (
    DEVICE_MEMORY_HELP,
    path_text,
    print_device_memory,
    refuse_unused,
)
from llmcli.console import (
    check_png_output,
    check_readable,
    fail,
    info,
    one_line,
    out,
    run_guarded,
)

MAX_GPUS = 10_000_000  # more than any cluster: a bound, so typos fail rather than overflow


PLAN_OPTIONS = ("overrides", "params", "tokens", "flops", "recipe", "fit", "gpu", "num_gpus",
                "mfu", "tokens_per_second", "plot", "device_memory")


def command(
    ctx: typer.Context,
    overrides: list[str] = typer.Argument(
        None, help="Recipe overrides section.key=value (with --recipe), e.g. "
        "train.max_iters=100000.", show_default=False,
    ),
    params: str = typer.Option(
        None, "--params", "-n", help="Model size N: 140M, 1.4e8, 7B.", show_default=False
    ),
    tokens: str = typer.Option(
        None, "--tokens", "-d", help="Training tokens D: 2.8B, 1.5T.", show_default=False
    ),
    flops: str = typer.Option(
        None, "--flops", "-c", help="Compute budget C in FLOPs: 1e21, 5.76e23.",
        show_default=False,
    ),
    recipe: Path = typer.Option(
        None, "--recipe", "-r", help="A recipe: its N (from the model section) and its planned "
        "tokens (iterations × batch × grad_accum × context × --num-gpus, as llm pretrain "
        "--nproc trains).", show_default=False,
        parser=path_text,
    ),
    fit: str = typer.Option(
        "chinchilla", "--fit", help="Loss law: chinchilla (Hoffmann et al. 2022, approach 3) or "
        "epoch (Besiroglu et al. 2024 refit).",
    ),
    gpu: str = typer.Option(
        None, "--gpu", help="GPU for the wall-clock estimate (h100, h200, a100, l40s, a10g, v100, "
        "rtx4090, ...; see --list-gpus). Default: h100.", show_default=False,
    ),
    num_gpus: str = typer.Option("1", "--num-gpus", help="GPUs training together."),
    mfu: str = typer.Option(
        None, "--mfu", help="Assumed model FLOPs utilisation of the GPU's dense peak (default "
        "40%; not with --tokens-per-second, which measures it).", show_default=False,
    ),
    tokens_per_second: str = typer.Option(
        None, "--tokens-per-second", help="Measured training throughput per GPU, for the model "
        "of --params/--recipe (replaces the GPU peak × MFU estimate).", show_default=False,
    ),
    plot: Path = typer.Option(
        None, "--plot", help="Write the iso-FLOP view (loss vs model size at five compute "
        "budgets, optima marked) to FILE.png.", show_default=False, parser=path_text,
    ),
    device_memory: str = typer.Option(
        None, "--device-memory", help=DEVICE_MEMORY_HELP + " With --num-gpus above 1 (or this "
        "option) the report adds memory per GPU under DDP and FSDP.", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    list_gpus: bool = typer.Option(False, "--list-gpus", help="List the known GPUs and exit."),
) -> None:
    """Plan a training run with the Chinchilla scaling laws: N, D, C = 6ND, loss, time.

    Give one of --params, --tokens, --flops (or two, for a specific plan), or --recipe.
    Examples: llm scaling --params 140M; llm scaling --flops 1e21 --gpu a100 --num-gpus 8;
    llm scaling --recipe recipes/scifi.yaml --plot isoflop.png
    """

    def body() -> None:
        from llmcli.scaling import (
            analyse,
            parse_count,
            parse_fraction,
            parse_number,
            plot_isoflops,
            strict_json,
        )

        # Every number is checked, even with --list-gpus: a typo is never silently ignored.
        # N and D are counts (whole numbers, as --num-gpus); C and a throughput need not be.
        n = {"--params": None if params is None else parse_count(params, "--params",
                                                                 "parameters"),
             "--tokens": None if tokens is None else parse_count(tokens, "--tokens", "tokens")}
        n |= {k: None if v is None else parse_number(v, k)
              for k, v in (("--flops", flops), ("--tokens-per-second", tokens_per_second))}
        gpus = parse_number(num_gpus, "--num-gpus", example="8 or 1k")
        if gpus != int(gpus) or gpus > MAX_GPUS:
            fail(f"--num-gpus {num_gpus!r}: must be a whole number of GPUs, at most "
                 f"{MAX_GPUS:,}")
        fraction = None if mfu is None else parse_fraction(mfu, "--mfu")
        device_bytes = None
        if device_memory is not None:
            from llmcli.scaling import parse_bytes

            device_bytes = parse_bytes(device_memory)
        if list_gpus:
            refuse_unused(ctx, PLAN_OPTIONS, "not used with --list-gpus, which lists the "
                          "known GPUs and plans nothing; to plan, leave out --list-gpus")
            print_gpus(json_out)
            return
        if plot is not None:
            check_png_output(plot, "--plot")
        if recipe is not None:
            check_readable(recipe, "--recipe")
        report = analyse(params=n["--params"], tokens=n["--tokens"], flops=n["--flops"],
                         recipe=recipe, overrides=tuple(overrides or ()), fit=fit, gpu=gpu,
                         num_gpus=int(gpus), mfu=fraction,
                         tokens_per_second=n["--tokens-per-second"],
                         device_bytes=device_bytes)
        if plot is not None:
            report["plot"] = str(plot_isoflops(plot, report))
            info(f"wrote {plot}")
        if json_out:
            out.print_json(strict_json(report))
        else:
            print_report(report)
            if report["device_memory"] and (gpus > 1 or device_bytes is not None):
                print_device_memory(report["device_memory"])

    run_guarded(body)


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from llmcli.scaling import format_count, format_duration, format_flops, format_ratio

    fit = report["fit"]
    if "recipe" in report:
        print_recipe(report["recipe"])
    plans = report["plans"]
    table = Table(title=f"Chinchilla plan ({fit['title']})", title_justify="left")
    table.add_column("")
    for plan in plans.values():
        table.add_column(plan["label"], justify="right")
    rows = [
        ("N parameters", lambda p: format_count(p["params"])),
        ("D tokens", lambda p: format_count(p["tokens"])),
        ("D / N", lambda p: format_ratio(p["tokens_per_param"])),
        ("C = 6ND FLOPs", lambda p: format_flops(p["flops"])),
        ("loss L(N, D)", lambda p: f"{p['loss']:.3f}"),
        ("wall-clock", lambda p: format_duration(p["seconds"])),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(p) if p["meaningful"] else "-" for p in plans.values()))
    out.print(table)
    for plan in plans.values():
        if not plan["meaningful"]:
            out.print(f"{plan['label']}: not a model ({format_ratio(plan['params'])} parameters "
                      f"and {format_ratio(plan['tokens'])} tokens; it needs at least 1 of each)")
    if "verdict" in report:
        out.print(f"verdict: {report['verdict']}")
    out.print(f"law: L(N, D) = {fit['E']:g} + {fit['A']:g}/N^{fit['alpha']:g} + "
              f"{fit['B']:g}/D^{fit['beta']:g} (fitted on the paper's data and tokenizer: other "
              f"corpora shift the loss, not the trade-off)")
    out.print(f"wall-clock: {report['hardware']['label']}")


def print_recipe(facts: dict[str, Any]) -> None:
    from rich.table import Table

    from llmcli.scaling import format_count, format_ratio

    table = Table(title=one_line(f"recipe {facts['name']} ({facts['path']})"), title_justify="left",
                  show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("parameters", f"{facts['params']:,} ({format_count(facts['params'])})")
    if facts["trainable"] != facts["params"]:
        table.add_row("  trainable", f"{facts['trainable']:,} (the LoRA adapter)")
    auto = facts["vocab_note"].startswith("auto")
    table.add_row("vocabulary", f"{facts['vocab_size']:,} "
                  f"({'model.vocab_size: auto' if auto else facts['vocab_note']})")
    table.add_row("planned tokens", f"{facts['planned_tokens']:,} "
                  f"({format_count(facts['planned_tokens'])})")
    table.add_row(*planned_tokens_row(facts))
    if facts["planned_tokens"] < facts["step_tokens"]:
        table.add_row("  capped", f"by train.max_tokens {facts['max_tokens']:,}: "
                      f"{facts['steps']:,} of {facts['max_iters']:,} steps")
    if facts.get("corpus_tokens"):
        table.add_row("corpus", one_line(f"{format_count(facts['corpus_tokens'])} training "
                                         f"tokens in {facts['corpus']}: "
                                         f"{format_ratio(facts['epochs'])} epochs"))
    out.print(table)
    for note in facts["notes"]:
        out.print(one_line(f"note: {note}"))


def planned_tokens_row(facts: dict[str, Any]) -> tuple[str, str]:
    """How the planned tokens come about: with several GPUs each trains its own batch, as
    `llm pretrain --nproc N` does, so they multiply the tokens of a step."""
    names = "steps × batch × accum × context"
    values = (f"{facts['steps']:,} × {facts['batch_size']} × {facts['grad_accum']} × "
              f"{facts['context_length']}")
    if facts["processes"] > 1:
        names += " × GPUs"
        values += f" × {facts['processes']}"
    return f"  = {names}", values


def print_gpus(json_out: bool) -> None:
    from dataclasses import asdict

    from rich.table import Table

    from llmcli.scaling import GPUS

    if json_out:
        out.print_json(json.dumps([asdict(g) for g in GPUS.values()]))
        return
    table = Table(title="dense tensor-core peaks (no sparsity), the denominator of MFU",
                  title_justify="left")
    for column in ("--gpu", "name", "TFLOPS", "dtype"):
        table.add_column(column, justify="right" if column == "TFLOPS" else "left")
    for g in GPUS.values():
        table.add_row(g.key, g.name, f"{g.tflops:g}", g.dtype)
    out.print(table)
    out.print("sources:")
    for g in GPUS.values():
        out.print(f"  {g.key}: {g.source}")
