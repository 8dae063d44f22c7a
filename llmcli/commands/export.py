"""`llm export`: a checkpoint as a transformers folder (GPT2LMHeadModel or LlamaForCausalLM)."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcli.commands.common import path_text
from llmcli.console import fail, one_line, out, run_guarded

FORMATS = ("hf",)


def command(
    checkpoint: str = typer.Argument(
        None, help="Checkpoint file or run directory (default: the newest run).",
        show_default=False,
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder to write: new or empty (or an earlier export, with "
        "--overwrite).",
        show_default=False, parser=path_text,
    ),
    fmt: str = typer.Option(
        "hf", "--format", "-f", help="hf: config.json, model.safetensors and the tokenizer, "
        "loaded by transformers' AutoModelForCausalLM and AutoTokenizer.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier llm export there (never a run, a "
        "model llm did not export, or other files).",
    ),
) -> None:
    """Export a checkpoint (LoRA merged) for transformers: GPT-2 or Llama, by its recipe."""

    def body() -> None:
        if fmt not in FORMATS:
            fail(f"--format {fmt}: the only format is hf (a transformers folder); use --format "
                 "hf or leave it out")
        from llmcli.interop.hf_export import export_hf

        result = export_hf(checkpoint, output, overwrite=overwrite)
        eos = f"end-of-text {result.eos_id}" if result.eos_id is not None else "no end-of-text"
        out.print(one_line(f"wrote {result.out} ({result.cls}, {result.parameters:,} "
                           f"parameters, {result.dtype}) from {result.checkpoint}"))
        out.print(f"  files      {', '.join(result.files)}")
        out.print(f"  tokenizer  {result.tokenizer} ({eos})")
        out.print(f"  load with  AutoModelForCausalLM.from_pretrained({str(result.out)!r}) and "
                  f"AutoTokenizer.from_pretrained({str(result.out)!r})")

    run_guarded(body)
