"""`llm fetch`: bring a corpus into data/: presets, URLs, Hugging Face files; resumable."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from llmcli.commands.common import given, path_text, refuse_unused
from llmcli.console import (
    check_output,
    check_range,
    check_readable,
    fail,
    one_line,
    out,
    run_guarded,
    warn,
)

MAX_RETRIES = 100


def command(
    ctx: typer.Context,
    source: str = typer.Argument(
        None, help="A preset (see --list), an http(s):// URL, hf://datasets/OWNER/NAME/PATH, "
        "or a local path.", show_default=False,
    ),
    output_dir: Path = typer.Option(
        None, "--output-dir", "-o", help="Directory to download into (default: data).",
        show_default=False, parser=path_text,
    ),
    sha256: str = typer.Option(
        None, "--sha256", help="Expected SHA-256 of the file (presets carry their own).",
        show_default=False,
    ),
    force: bool = typer.Option(False, "--force", help="Download again even if the file exists "
                               "(builtin: write it over a file of its name llm did not write)."),
    list_presets: bool = typer.Option(False, "--list", help="List the presets and exit."),
    retries: int = typer.Option(
        5, "--retries", help="Retries in a row that get no further (0: fail at once)."
    ),
) -> None:
    """Download a corpus (or write the built-in one) into data/, ready for `llm tokenize`.

    Downloads stream to NAME.part, resume with HTTP Range after an interruption (with
    If-Range, so a file changed on the server is downloaded afresh, never spliced), retry with
    backoff, are checked against a SHA-256 when one is known (every download preset has one),
    and get their final name only when complete. An existing file is not downloaded again.
    hf:// addresses honour HF_ENDPOINT and HF_TOKEN. The file's path is printed on stdout.
    Examples: llm fetch builtin; llm fetch sales-textbook; llm fetch https://host/corpus.txt
    """

    def body() -> None:
        from llmcli.data.fetch import PRESETS, fetch

        check_range("--retries", retries, 0, MAX_RETRIES, "e.g. --retries 5")
        if list_presets:
            refuse_unused(ctx, ("source", "output_dir", "sha256", "force", "retries"),
                          "not used with --list, which lists the presets and fetches nothing; "
                          "to fetch, leave out --list")
            _print_presets(PRESETS)
            return
        if not source:
            fail("give a SOURCE to fetch (a preset, URL, hf:// address or path); "
                 "`llm fetch --list` shows the presets")
        directory = output_dir if output_dir is not None else Path("data")
        check_output(directory, "--output-dir", file=False)
        if "://" not in source:
            local = Path(source).expanduser()
            check_readable(local, "SOURCE")
            if source not in PRESETS and local.exists():
                _warn_unused(given(ctx, "output_dir", "force", "retries"),
                             f"{source} is a local path, used where it is")
            elif source in PRESETS and not PRESETS[source].source:
                _warn_unused(given(ctx, "retries"), f"{source} is written offline")
        path = fetch(source, directory, sha256=sha256, force=force, retries=retries)
        out.print(one_line(str(path)), markup=False)

    run_guarded(body)


def _warn_unused(flags: list[str], why: str) -> None:
    """Say so when download options meet a source that downloads nothing."""
    if flags:
        warn(f"{', '.join(flags)}: ignored; {why}, and only downloads use "
             f"{'them' if len(flags) > 1 else 'it'}")


def _print_presets(presets: dict) -> None:
    for preset in presets.values():
        out.print(Text.assemble((preset.name, "bold"), "  ", preset.description))
        out.print(f"    file:   {preset.filename}", markup=False)
        out.print(f"    from:   {preset.source or '(written offline from the standard library)'}",
                  markup=False)
        if preset.sha256:
            out.print(f"    sha256: {preset.sha256}", markup=False)
