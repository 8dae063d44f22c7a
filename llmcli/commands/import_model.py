"""`llm import`: a transformers GPT-2 or Llama checkpoint (folder or Hub id) as an llm run."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcli.commands.common import path_text
from llmcli.console import one_line, out, run_guarded, shell_word


def command(
    source: str = typer.Argument(
        ..., help="Folder written by save_pretrained, or a Hugging Face model id (e.g. "
        "openai-community/gpt2; downloaded when the Hub is reachable).", show_default=False,
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Run directory to write (default: checkpoints/NAME).",
        show_default=False, parser=path_text,
    ),
    tokenizer: str = typer.Option(
        "auto", "--tokenizer", help="auto: the folder's tokenizer.json; cl100k_base or bytes: "
        "llm's own instead.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier import there (never a training run or "
        "other files).",
    ),
) -> None:
    """Import a GPT2LMHeadModel or LlamaForCausalLM (safetensors only) as an llm checkpoint."""

    def body() -> None:
        from llmcli.interop.hf_import import import_hf

        result = import_hf(source, output, overwrite=overwrite, tokenizer=tokenizer)
        m = result.recipe.model
        eos = f", end-of-text {result.eos}" if result.eos else ""
        out.print(one_line(f"wrote {result.path} ({result.cls} from {result.source})"))
        mixed = (f"; the file mixes {' and '.join(result.stored)}, each held exactly"
                 if len(result.stored) > 1 else "")
        out.print(f"  parameters {result.parameters:,} ({result.dtype}{mixed})")
        out.print(f"  tokenizer  {result.tokenizer}{eos}")
        out.print(f"  model      vocab {m.vocab_size:,}, context {m.context_length:,}, "
                  f"d_model {m.d_model}, {m.num_blocks} block{'s' * (m.num_blocks != 1)}, "
                  f"{m.num_heads} head{'s' * (m.num_heads != 1)}, "
                  f"{m.positions}, {m.norm}, {m.activation}, tied {str(m.tie_embeddings).lower()}")
        run = str(result.path.parent)  # quoted: the lines are to be pasted into a shell
        run = f"./{run}" if run.startswith("-") else run  # a path, not an option
        out.print(f"  next       llm generate {shell_word(run)} \"Hello\"  ·  llm finetune "
                  f"RECIPE {shell_word(f'finetune.init={run}')}")

    run_guarded(body)
