"""`llm pretrain`: train a GPT from a recipe, on CPU, one GPU or several; resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

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
from llmcli.console import (
    check_output,
    check_range,
    check_readable,
    fail,
    one_line,
    out,
    run_guarded,
)
from llmcli.device import DEVICE_HELP


def command(
    recipe: Path | None = typer.Argument(
        None, help="Recipe YAML, e.g. recipes/tiny.yaml.", show_default=False, parser=path_text),
    overrides: list[str] | None = typer.Argument(
        None, help="section.key=value overrides, e.g. train.max_iters=100 model.dropout=0.",
        show_default=False),
    out_dir: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory (default: checkpoints/<recipe name>/).",
        parser=path_text),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + "."),
    nproc: int = typer.Option(
        1, "--nproc", help="Processes to train with (DDP via torchrun; one per GPU)."),
    nnodes: int = typer.Option(1, "--nnodes", help=NNODES_HELP),
    node_rank: int | None = typer.Option(None, "--node-rank", help=NODE_RANK_HELP),
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help=RDZV_HELP),
    master_addr: str | None = typer.Option(None, "--master-addr", help=MASTER_ADDR_HELP),
    master_port: int | None = typer.Option(None, "--master-port", help=MASTER_PORT_HELP),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved recipe, size, memory, token budget and an "
        "ETA from a couple of measured steps, then exit; the corpus is fetched and tokenized "
        "first if it has to be (as training would), no run directory is written."),
    keys: bool = typer.Option(False, "--keys", help="List every recipe key with its default."),
    json_out: bool = typer.Option(False, "--json", help="With --dry-run or --keys: JSON."),
) -> None:
    """Pretrain a model from a recipe; checkpoints, metrics.jsonl and loss.png in the run dir.

    Examples: `llm pretrain recipes/tiny.yaml`, `llm pretrain recipes/sales.yaml
    data.source=../shared/data/sales_textbook.txt train.max_iters=500`, `llm pretrain
    recipes/tiny.yaml --resume`, `llm pretrain recipes/scifi.yaml --nproc 2`, on each of two
    machines `llm pretrain R --nnodes 2 --nproc 8 --rdzv-endpoint node0:29400`.
    """

    def body() -> None:
        check_range("--nproc", nproc, 1, MAX_NPROC, "one process per GPU")
        if keys:
            if recipe is not None or overrides or dry_run or resume or overwrite:
                fail("--keys lists every recipe key and reads no recipe; drop the other "
                     "arguments (or --keys)")
            _print_keys(json_out)
            return
        if json_out and not dry_run:
            fail("--json goes with --dry-run or --keys; a training run writes its figures to "
                 "metrics.jsonl in the run directory")
        if recipe is None:
            fail("missing RECIPE: give a recipe file such as recipes/tiny.yaml "
                 "(`llm pretrain --keys` lists what a recipe can set)")
        recipe_path, given = recipe_first(recipe, list(overrides or []), resume)
        check_readable(recipe_path, "RECIPE")
        if out_dir is not None:
            check_output(out_dir, "--out", file=False)
        items, resume_spec = split_resume(given, resume)
        from llmcli.recipe import load_recipe

        loaded = load_recipe(recipe_path, items)  # checked once, before any worker starts
        from llmcli.pretrain import check_pretrain_keys

        check_pretrain_keys(loaded)
        launch = launch_options(nproc, nnodes, node_rank, rdzv_endpoint, master_addr,
                                master_port)
        if dry_run:  # reported for the processes asked for, by this one alone
            from llmcli.pretrain import dry_run as do_dry_run
            from llmcli.train.distributed import from_env

            group = from_env()
            if group.is_main:
                processes = launch.world_size if launch.needed else group.world_size
                _print_dry_run(do_dry_run(loaded, device=device, processes=processes),
                               json_out)
            return
        if launch.needed:
            from llmcli.train.distributed import relaunch_under_torchrun

            check_before_launch(loaded, launch, device, out_dir, resume_spec, overwrite)
            relaunch_under_torchrun(launch)
        from llmcli.pretrain import pretrain

        result = pretrain(loaded, run_dir=out_dir, resume=resume_spec, overwrite=overwrite,
                          device=device)
        _print_result(result)

    run_guarded(body)


def _print_keys(json_out: bool) -> None:
    from llmcli.recipe import describe_keys

    rows = describe_keys()
    if json_out:
        import json

        out.print(json.dumps([{"key": k, "default": d, "doc": doc} for k, d, doc in rows],
                             indent=2), markup=False)
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    table.add_column("key")
    table.add_column("default")
    table.add_column("meaning")
    for key, default, doc in rows:
        table.add_row(key, repr(default) if isinstance(default, str) else str(default), doc)
    out.print(table)


def _print_dry_run(report: Any, json_out: bool) -> None:
    if json_out:
        import json

        out.print(json.dumps(report.to_dict(), indent=2, default=str), markup=False)
        return
    from rich.table import Table

    from llmcli.scaling import format_count, format_duration

    table = Table(title="resolved recipe", box=None, pad_edge=False, header_style="bold")
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("from", overflow="fold")
    for key, value, origin in report.rows:
        if key.split(".")[0] in ("finetune", "lora", "generate") and origin == "default":
            continue  # not used by pretraining; `--keys` lists them
        table.add_row(key, one_line(str(value)), one_line(origin))
    out.print(table)
    mem = report.memory
    gib = 1024**3

    def memory(kind: str) -> str:
        from llmcli.model.count import AUTOCAST_NOTE

        parts = mem[kind]
        return (f"{sum(parts.values()) / gib:.2f} GiB ({kind}: weights "
                f"{parts['weights'] / gib:.2f} + gradients {parts['gradients'] / gib:.2f} + "
                f"AdamW {parts['adamw'] / gib:.2f}; activations extra; {AUTOCAST_NOTE})")

    ratio = report.total_tokens / report.chinchilla_tokens if report.chinchilla_tokens else 0
    lines = [
        f"parameters      {report.params:,} ({format_count(report.params)}), "
        f"trainable {report.trainable:,}",
        f"memory          {memory('fp32')}",
        f"tokens/step     {report.tokens_per_step:,}" + (
            f" ({report.processes} processes x {report.tokens_per_step // report.processes:,})"
            if report.processes > 1 else ""),
        f"total tokens    {report.total_tokens:,} over {report.steps:,} "
        f"step{'s' * (report.steps != 1)} "
        f"({report.total_tokens / max(1, report.corpus_tokens):.1f} epochs of "
        f"{report.corpus_tokens:,} training tokens{report.stop_note})",
        f"Chinchilla      {format_count(report.chinchilla_tokens)} tokens (20 per parameter): "
        f"this run is {ratio:.2%} of it",
    ]
    if report.step_seconds is not None:
        procs = f" x {report.processes} processes" if report.processes > 1 else ""
        lines.append(f"ETA             {format_duration(report.eta_seconds)} on {report.device}"
                     f"{procs} ({report.step_seconds:.3f} s/step measured in one process, "
                     f"{report.tokens_per_step / report.step_seconds:,.0f} tokens/s; "
                     f"{report.evaluations:,} evaluations of {report.eval_batches:,} batches "
                     f"at {report.eval_batch_seconds:.3f} s each, measured: "
                     f"{format_duration(report.eval_seconds)})")
    for line in lines:
        out.print(line)


def _print_result(result: Any) -> None:
    parts = [f"step {result.step}"]
    if result.train_loss is not None:
        parts.append(f"train loss {result.train_loss:.4f}")
    if result.val_loss is not None:
        parts.append(f"val loss {result.val_loss:.4f}")
    if result.best_val is not None:
        parts.append(f"best val {result.best_val:.4f} (step {result.best_step})")
    from llmcli.train.distributed import from_env

    if from_env().is_main:
        out.print(one_line(", ".join(parts) + (f"; checkpoint {result.checkpoint}"
                                               if result.checkpoint else "")))
