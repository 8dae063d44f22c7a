"""`llm tokenize`: text, directories and Alpaca records → a uint32 token file; token viewer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from llmcli.commands.common import path_text, refuse_unused
from llmcli.console import (
    as_utf8,
    check_output,
    check_range,
    fail,
    one_line,
    out,
    run_guarded,
    warn,
)

MAX_HEAD = 100_000  # tokens --head renders: more is no longer something to read
MAX_CONTEXT = 1_048_576  # as model.context_length allows
MAX_SHARD_TOKENS = 1 << 36  # 256 GiB of uint32 in one shard: more is a typo
MAX_WORKERS = 1024


# What only writing a token file uses: --show and --head render tokens and write nothing
WRITING_OPTIONS = ("output", "val_fraction", "context_length", "shard_tokens", "workers")


def command(
    ctx: typer.Context,
    inputs: list[Path] = typer.Argument(
        None, help="Text files (.txt, streamed), Alpaca records (.json/.jsonl), directories of "
        ".txt files; each file or record is one document.", show_default=False, parser=path_text,
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Token file to write (default: data/<input>.tokens; "
        "several inputs: data/<a>+<b>.tokens, the name pretraining looks for).",
        show_default=False, parser=path_text,
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
        show_default=False, parser=as_utf8,
    ),
    head: int = typer.Option(
        None, "--head", help="Render the first N tokens of the inputs (writes nothing).",
        show_default=False,
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print the sidecar as JSON (with --show or --head: the ids and "
        "their text)."
    ),
    shard_tokens: int = typer.Option(
        None, "--shard-tokens", help="Write a folder NAME.tokens/ of shards of N tokens each "
        "with one index.json (pretraining reads the folder); e.g. 100000000.",
        show_default=False,
    ),
    text_field: str = typer.Option(
        "text", "--text-field", help="The field holding the text in .jsonl, .jsonl.gz, "
        ".jsonl.zst and .parquet records (FineWeb, C4: text)."
    ),
    workers: int = typer.Option(
        1, "--workers", help="Processes tokenizing input files in parallel (for many files; "
        "the output is the same as with one)."
    ),
) -> None:
    """Tokenize a corpus into NAME.tokens (uint32 ids) and NAME.tokens.json, or show tokens.

    Files stream through in blocks on one thread per core; documents are separated by the
    end-of-text token; the last --val-fraction of the tokens is the validation split.
    Examples: llm tokenize data/python-reference.txt; llm tokenize novels/ -o data/novels;
    llm tokenize --show "Liu Feng was born in 1990."; llm tokenize data/x.txt --head 40;
    llm tokenize fineweb/ --workers 8 --shard-tokens 100000000 -o data/fineweb
    """

    def body() -> None:
        from llmcli.data.show import render
        from llmcli.data.tokenize import ERRORS
        from llmcli.data.tokenizer import get_tokenizer

        if errors not in ERRORS:
            fail(f"--errors {errors!r}: choose {' or '.join(ERRORS)}")
        if not 0 <= val_fraction < 1:  # NaN too
            fail(f"--val-fraction {val_fraction}: must be in [0, 1), the share of tokens kept "
                 "for validation, e.g. 0.1 (0 keeps none)")
        check_range("--context-length", context_length, 1, MAX_CONTEXT, "e.g. 128")
        check_range("--shard-tokens", shard_tokens, 1024, MAX_SHARD_TOKENS,
                    "tokens per shard, e.g. 100000000")
        check_range("--workers", workers, 1, MAX_WORKERS, "processes, e.g. the number of cores")
        if not text_field.strip():
            fail("--text-field: give the name of the field holding the text, e.g. text")
        if show is not None or head is not None:
            if show is not None and (inputs or head is not None):
                fail("--show renders the given TEXT; use --head N with input files instead")
            shown = "--show" if show is not None else "--head"
            refuse_unused(ctx, WRITING_OPTIONS + (("errors", "text_field") if show else ()),
                          f"not used with {shown}, which renders tokens and writes nothing; "
                          f"to write a token file, leave out {shown}")
            tok = get_tokenizer(tokenizer)
            if show is not None:
                ids = tok.encode(show)
            else:
                from llmcli.data.tokenize import head_tokens

                check_range("--head", head, 1, MAX_HEAD, "a number of tokens to show, e.g. 40")
                if not inputs:
                    fail("--head N needs input files to read")
                ids = head_tokens(inputs, head, tokenizer, errors, text_field)
            if json_out:
                raw = [tok.token_bytes(i) for i in ids]  # a token may be part of a character
                out.print(json.dumps({
                    "tokenizer": tok.name, "ids": [int(i) for i in ids],
                    "tokens": [b.decode("utf-8", errors="replace") for b in raw],
                    "bytes": [b.hex() for b in raw]}, ensure_ascii=False), soft_wrap=True)
                return
            out.print(render(tok, ids, color=out.is_terminal))
            return
        if not inputs:
            fail("give the files to tokenize (or --show TEXT); e.g. llm tokenize "
                 "data/python-reference.txt")
        _tokenize(inputs)

    def _tokenize(paths: list[Path]) -> None:
        from llmcli.data.shards import is_shard_folder
        from llmcli.data.token_cache import corpus_name, expand_inputs
        from llmcli.data.tokenize import (
            data_bytes,
            short_corpus_warning,
            sidecar_path,
            tokenize_files,
        )
        from llmcli.data.tokenizer import get_tokenizer

        get_tokenizer(tokenizer)  # loaded before the clock starts: MB/s measures tokenizing
        files = expand_inputs(paths)  # missing inputs named before any output is checked
        seen: dict[Path, Path] = {}
        for path in files:
            first = seen.setdefault(path.resolve(), path)
            if first is not path:
                again = "given twice" if str(first) == str(path) else f"the same file as {first}"
                warn(f"{path}: {again}; its text is tokenized each time it is given")
        # several inputs: the name pretraining looks for when its data.source lists them
        name = corpus_name(paths)
        target = output or Path("data") / name
        if output is not None:  # -o names a prefix: a device there (/dev/null) is no place
            check_output(output, "--output", file=None)
        if is_shard_folder(target) and not shard_tokens:
            fail(f"--output {target}: is a sharded corpus (a folder with index.json); add "
                 "--shard-tokens N to rewrite it, or choose another path")
        if target.is_dir() and not (shard_tokens and is_shard_folder(target)):
            target = target / name
        written = target if target.name.endswith(".tokens") else target.with_name(
            target.name + ".tokens")
        option = "--output" if output else "the default output (set one with -o)"
        if shard_tokens:
            check_output(written, option, file=False)
            if written.exists() and not is_shard_folder(written):
                fail(f"{option} {written}: exists and is not a sharded corpus; choose another "
                     "path")
        else:
            check_output(written, option)
            check_output(sidecar_path(written), option)
        started = time.perf_counter()
        meta = tokenize_files(paths, target, tokenizer, val_fraction, errors,
                              text_field=text_field, shard_tokens=shard_tokens, workers=workers)
        seconds = time.perf_counter() - started
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
        if "shards" in meta:
            out.print(one_line(f"wrote {written}/ ({len(meta['shards']):,} shards of up to "
                               f"{meta['shard_tokens']:,} tokens, index {written / 'index.json'}; "
                               f"{meta['tokenizer']})"))
        else:
            out.print(one_line(f"wrote {written} ({meta['tokenizer']})"))
        for key, value in rows:
            out.print(f"  {key:<16}{value}")

    run_guarded(body)
