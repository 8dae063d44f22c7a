"""`llm params`: the parameter count of a recipe or checkpoint, part by part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from llmcli.commands.common import DEVICE_MEMORY_HELP, NPROC_MEMORY_HELP, print_device_memory
from llmcli.console import check_range, check_readable, info, one_line, out, run_guarded

MAX_PROCESSES = 10_000_000


def command(
    target: str = typer.Argument(
        None, help="Recipe YAML, checkpoint file or run directory (default: the newest run, "
        "else recipes/scifi.yaml).", show_default=False,
    ),
    overrides: list[str] = typer.Argument(
        None, help="Recipe overrides section.key=value, e.g. model.num_blocks=24.",
        show_default=False,
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    nproc: int | None = typer.Option(None, "--nproc", help=NPROC_MEMORY_HELP,
                                     show_default=False),
    device_memory: str | None = typer.Option(None, "--device-memory", help=DEVICE_MEMORY_HELP,
                                             show_default=False),
) -> None:
    """Count parameters (total, trainable, per part), training memory and FLOPs per token.

    With --nproc N: memory per device under DDP and FSDP with N processes (e.g. `llm params
    recipes/scifi.yaml --nproc 8`).
    """

    def body() -> None:
        from llmcli.params import count_target, pick_target

        check_range("--nproc", nproc, 1, MAX_PROCESSES, "processes (devices) training together")
        device_bytes = None
        if device_memory is not None:
            from llmcli.scaling import parse_bytes

            device_bytes = parse_bytes(device_memory)
        path, why = pick_target(target)
        check_readable(Path(path), "TARGET")
        if why:
            info(why)
        processes = nproc if nproc is not None or device_bytes is None else 1
        report = count_target(path, tuple(overrides or ()), processes=processes,
                              device_bytes=device_bytes)
        if json_out:
            from llmcli.scaling import strict_json

            out.print_json(strict_json(report))
        else:
            print_report(report)

    run_guarded(body)


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from llmcli.model.count import AUTOCAST_NOTE
    from llmcli.scaling import format_bytes

    total = report["total"]
    table = Table(title=one_line(f"{report['name']} ({report['kind']}: {report['source']})"),
                  title_justify="left")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for part in report["parts"]:
        repeat = f" × {part['repeat']}" if part["repeat"] > 1 else ""
        table.add_row(part["name"] + repeat, f"{part['total']:,}", _share(part["total"], total))
        for child in part["children"]:
            each = f"{child['params']:,}" + (repeat and " each")
            table.add_row(f"  {child['name']}", each, "")
    table.add_section()
    table.add_row("total", f"{total:,}", "100.0%", style="bold")
    table.add_row("trainable", f"{report['trainable']:,}", _share(report["trainable"], total))
    out.print(table)

    memory = Table(title="training memory (weights, gradients, AdamW; activations not included)",
                   title_justify="left")
    for column in ("precision", "weights", "gradients", "AdamW state", "total"):
        memory.add_column(column, justify="right" if column != "precision" else "left")
    for precision, parts in report["memory_bytes"].items():
        memory.add_row(f"{precision} (any train.precision)",
                       *(format_bytes(v) for v in parts.values()),
                       format_bytes(sum(parts.values())))
    out.print(memory)
    out.print(f"memory: {AUTOCAST_NOTE}")
    flops = report["flops_per_token"]
    out.print(f"training FLOPs per token: {flops:.4g} (6N + attention at context "
              f"{report['context_length']}; N = {report['flops_n']:,} weights in matrix products; "
              "the embedding table is a lookup)")
    if report.get("device_memory"):
        print_device_memory(report["device_memory"])
    for note in report["notes"]:
        out.print(one_line(f"note: {note}"))


def _share(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}%" if total else "-"


