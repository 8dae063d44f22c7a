"""`llm tokenize`: text, directories and Alpaca records → a uint32 token file; token viewer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from llmcli.console import fail, out, run_guarded, warn


def command(
    inputs: list[Path] = typer.Argument(
        None, help="Text files (.txt, streamed), Alpaca records (.json/.jsonl), directories of "
        ".txt files; each file or record is one document.", show_default=False,
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Token file to write [default: data/<first input>.tokens].",
        show_default=False,
    ),
    tokenizer: str = typer.Option(
        "cl100k_base", "--tokenizer", "-t", help="cl100k_base (tiktoken, offline) or bytes."
    ),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of tokens at the end kept for validation."
    ),
    errors: str = typer.Option(
        "strict", "--errors", help="Undecodable bytes: strict (stop, saying where) or replace "
        "(substitute U+FFFD)."
    ),
    context_length: int = typer.Option(
        128, "--context-length", help="Warn when a split is shorter than one window of this "
        "many tokens."
    ),
    show: str = typer.Option(
        None, "--show", help="Render TEXT token by token with its ids (writes nothing).",
        show_default=False,
    ),
    head: int = typer.Option(
        None, "--head", help="Render the first N tokens of the inputs (writes nothing).",
        show_default=False,
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the sidecar as JSON."),
) -> None:
    """Tokenize a corpus into NAME.tokens (uint32 ids) and NAME.tokens.json, or show tokens.

    Files stream through in blocks on one thread per core; documents are separated by the
    end-of-text token; the last --val-fraction of the tokens is the validation split.
    Examples: llm tokenize data/python-reference.txt; llm tokenize novels/ -o data/novels;
    llm tokenize --show "Liu Feng was born in 1990."; llm tokenize data/x.txt --head 40
    """

    def body() -> None:
        from llmcli.data.show import render
        from llmcli.data.tokenizer import get_tokenizer

        if show is not None or head is not None:
            if show is not None and (inputs or head is not None):
                fail("--show renders the given TEXT; use --head N with input files instead")
            tok = get_tokenizer(tokenizer)
            if show is not None:
                ids = tok.encode(show)
            else:
                from llmcli.data.tokenize import head_tokens

                if head <= 0:
                    fail(f"--head {head}: must be a positive number of tokens")
                if not inputs:
                    fail("--head N needs input files to read")
                ids = head_tokens(inputs, head, tokenizer, errors)
            out.print(render(tok, ids, color=out.is_terminal))
            return
        if not inputs:
            fail("give the files to tokenize (or --show TEXT); e.g. llm tokenize "
                 "data/python-reference.txt")
        _tokenize(inputs)

    def _tokenize(paths: list[Path]) -> None:
        from llmcli.data.tokenize import data_bytes, short_corpus_warning, tokenize_files
        from llmcli.data.tokenizer import get_tokenizer

        get_tokenizer(tokenizer)  # loaded before the clock starts: MB/s measures tokenizing
        if context_length <= 0:
            fail(f"--context-length {context_length}: must be positive")
        target = output or Path("data") / _stem(paths[0])
        if target.is_dir():
            target = target / _stem(paths[0])
        started = time.perf_counter()
        meta = tokenize_files(paths, target, tokenizer, val_fraction, errors)
        seconds = time.perf_counter() - started
        written = target if target.name.endswith(".tokens") else target.with_name(
            target.name + ".tokens")
        problem = short_corpus_warning(meta, context_length)
        if problem:
            warn(problem)
        if json_out:
            out.print(json.dumps(meta, indent=2, ensure_ascii=False), soft_wrap=True)
            return
        size = data_bytes(meta)
        n = meta["num_tokens"]
        rows = [
            ("tokens", f"{n:,} (train {meta['val_start']:,}, validation "
                       f"{n - meta['val_start']:,})"),
            ("bytes per token", f"{size / n:.2f}"),
            ("distinct ids", f"{meta['distinct_ids']:,} of {meta['vocab_size']:,}"),
            ("largest id", f"{meta['max_id']:,}"),
            ("documents", f"{meta['documents']:,}"),
            ("speed", f"{size / 1e6 / max(seconds, 1e-9):.1f} MB/s ({seconds:.2f} s)"),
        ]
        out.print(f"wrote {written} ({meta['tokenizer']})")
        for key, value in rows:
            out.print(f"  {key:<16}{value}")

    run_guarded(body)


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem
