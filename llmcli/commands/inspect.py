"""`llm inspect VIEW`: look inside a trained model (embeddings, positions, attention, score, lens,
norms). A Typer sub-app, one command per view; the work is in `llmcli.inspect`."""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from llmcli.commands.common import path_text, refuse_unused
from llmcli.console import (
    as_utf8,
    check_png_output,
    fail,
    info,
    out,
    read_text_input,
    run_guarded,
)


class _Views(TyperGroup):
    """An unknown view is the one-line error (exit 2) every bad input gets."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else None
        if name is not None and not name.startswith("-") and self.get_command(ctx, name) is None:
            views = self.list_commands(ctx)
            close = difflib.get_close_matches(name, views, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            run_guarded(lambda: fail(f"inspect: no view {name!r}; {hint}choose one of "
                                     f"{', '.join(views)}"))
        return super().resolve_command(ctx, args)


command = typer.Typer(
    name="inspect", cls=_Views, no_args_is_help=True, add_completion=False,
    help="Look inside a trained model: embeddings, positions, attention, score, lens, norms.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

CKPT_HELP = ("Checkpoint file, run directory (its latest step) or run name under checkpoints/ "
             "(a LoRA adapter is merged into its base).")
CHECKPOINT = typer.Argument(..., help=CKPT_HELP, show_default=False)
PROMPT = typer.Argument(..., help="The prompt, as the model reads it (at most its context).",
                        show_default=False, parser=as_utf8)
JSON = typer.Option(False, "--json", help="Print the numbers as JSON.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
POSITION = typer.Option(-1, "--position", "-p", help="Prompt position (0-based; -1 = the last).")


def _spec(checkpoint: str) -> str:
    """A bare run name means that run under checkpoints/, as for `llm generate`."""
    from llmcli.checkpoint import CHECKPOINTS_DIR

    if not Path(checkpoint).exists() and (CHECKPOINTS_DIR / checkpoint).is_dir():
        return str(CHECKPOINTS_DIR / checkpoint)
    return checkpoint


def _load(checkpoint: str, device: str) -> Any:
    from llmcli.inspect.tokens import open_model

    gen = open_model(_spec(checkpoint), device)
    info(f"{gen.path} · {gen.tokenizer.name} · vocabulary {gen.vocab.vocab_size:,} · context "
         f"{gen.context_length}")
    return gen


def _json(data: Any) -> None:
    out.file.write(json.dumps(data, ensure_ascii=False) + "\n")
    out.file.flush()


def _wrote(path: Path, started: float) -> None:
    info(f"wrote {path} ({time.perf_counter() - started:.1f}s)")


def _pick(value: int | None, count: int, what: str) -> list[int]:
    """A 1-based --block/--head as 0-based indices (all of them when not given)."""
    if value is None:
        return list(range(count))
    if not 1 <= value <= count:
        fail(f"--{what} {value}: this model has {count} {what}s; use 1..{count}")
    return [value - 1]


@command.command("embeddings")
def embeddings(
    ctx: typer.Context,
    checkpoint: str = CHECKPOINT,
    tokens: str = typer.Option(None, "--tokens", "-t", help="Show the rows of this text's "
                               "tokens (default: the first and last ids).", show_default=False,
                               parser=as_utf8),
    near: str = typer.Option(None, "--near", help="List the tokens nearest to this one token "
                             "by cosine similarity, e.g. ' the'.", show_default=False,
                             parser=as_utf8),
    top: int = typer.Option(10, "--top", "-k", min=1, help="Neighbours to list with --near."),
    png: Path = typer.Option(None, "--png", help="Write a 2-D PCA map of the most frequent "
                             "tokens to this PNG.", show_default=False, parser=path_text),
    count: int = typer.Option(60, "--count", "-n", min=3, help="Tokens on the PCA map."),
    json_out: bool = JSON,
    device: str = DEVICE,
) -> None:
    """The token-embedding table: rows with their token text, nearest neighbours, a PCA map.

    The PCA map shows the corpus's most frequent tokens (its token file in data/),
    else those of a built-in English paragraph.

    Examples:
    llm inspect embeddings tiny --tokens "The list of"
    llm inspect embeddings tiny --near " list"
    llm inspect embeddings tiny --png embeddings.png
    """

    def body() -> None:
        if near is None:
            refuse_unused(ctx, ("top",), "not used without --near, whose neighbours it counts; "
                          "add --near TOKEN")
        if png is None:
            refuse_unused(ctx, ("count",), "not used without --png, whose PCA map it fills; "
                          "add --png FILE.png")
        if png is not None:
            check_png_output(png, "--png")
        from llmcli.inspect import embeddings as emb
        from llmcli.inspect import render
        from llmcli.inspect.tokens import single_id, text_ids

        started = time.perf_counter()
        gen = _load(checkpoint, device)
        rows = emb.embedding_rows(gen, text_ids(gen, tokens) if tokens is not None else None)
        near_result = emb.nearest(gen, single_id(gen, near), top) if near is not None else None
        pca = None
        if png is not None:
            ids, source = emb.frequent_ids(gen, min(count, gen.vocab.vocab_size))
            pca = emb.pca(gen, ids, source)
        if json_out:
            _json({"checkpoint": str(gen.path), **rows.to_json(gen),
                   **({"near": near_result.to_json(gen)} if near_result else {}),
                   **({"pca": pca.to_json(gen)} if pca else {})})
        else:
            compact = gen.vocab.compact is not None
            note = (f"{'compact vocabulary of ' if compact else ''}{gen.tokenizer.name}")
            out.print(render.embedding_table(rows, note, out.width))
            if near_result is not None:
                out.print(render.neighbours_table(near_result))
        if pca is not None:
            from llmcli.inspect.plots import pca_png

            pca_png(pca, png, f"token embeddings of {gen.path.parent.name}/{gen.path.name}: "
                    f"{len(pca.ids)} frequent tokens, PCA")
            info(render.pca_line(pca, png))
        info(f"{time.perf_counter() - started:.1f}s")

    run_guarded(body)


@command.command("positions")
def positions(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="Recipe YAML (no weights needed) or checkpoint "
                                 "(a learned table needs one).", show_default=False),
    rows: int = typer.Option(16, "--rows", min=1, help="Positions to print (then the last)."),
    png: Path = typer.Option(None, "--png", help="Write the table as a heat map PNG.",
                             show_default=False, parser=path_text),
    json_out: bool = JSON,
) -> None:
    """The position table: sinusoidal or learned values, or RoPE's rotation frequencies.

    Examples:
    llm inspect positions recipes/sales.yaml --png positions.png
    llm inspect positions tiny
    """

    def body() -> None:
        if json_out:
            refuse_unused(ctx, ("rows",), "not used with --json, which gives every position; "
                          "to print some, leave out --json")
        if png is not None:
            check_png_output(png, "--png")
        from llmcli.inspect import render
        from llmcli.inspect.positions import load_positions

        started = time.perf_counter()
        spec = target if target.endswith((".yaml", ".yml")) else _spec(target)
        table = load_positions(spec)
        if json_out:
            _json(table.to_json())
        else:
            for part in render.position_tables(table, rows, out.width):
                out.print(part)
        if png is not None:
            from llmcli.inspect.plots import positions_png

            length, width = table.values.shape
            titles = {"sinusoidal": f"sinusoidal position table ({length} × {width})",
                      "learned": f"learned position table ({length} × {width})",
                      "rope": f"RoPE rotations cos(position × θᵢ) ({length} positions × "
                              f"{width} pairs per head)"}
            positions_png(table, png, titles[table.kind])
            _wrote(png, started)

    run_guarded(body)


@command.command("attention")
def attention(
    checkpoint: str = CHECKPOINT,
    prompt: str = PROMPT,
    block: int = typer.Option(None, "--block", "-b", help="Only this block (1-based).",
                              show_default=False),
    head: int = typer.Option(None, "--head", help="Only this head (1-based); with --block, "
                             "one large map with the weights written in.", show_default=False),
    top: int = typer.Option(3, "--top", "-k", min=1, help="Attended tokens to list per token."),
    png: Path = typer.Option(None, "--png", help="Write the heat maps (a grid of blocks × "
                             "heads) to this PNG.", show_default=False, parser=path_text),
    json_out: bool = JSON,
    device: str = DEVICE,
) -> None:
    """Attention weights of every block and head over the prompt's tokens.

    Computed by the seed's explicit steps: scores, −inf mask, softmax.
    They give the same output as the fused kernel.

    Examples:
    llm inspect attention tiny "The list of" --png attention.png
    llm inspect attention tiny "The list of" --block 2 --head 1
    """

    def body() -> None:
        if png is not None:
            check_png_output(png, "--png")
        from llmcli.inspect import render
        from llmcli.inspect.attention import attention_maps
        from llmcli.inspect.tokens import prompt_ids

        started = time.perf_counter()
        gen = _load(checkpoint, device)
        blocks = _pick(block, int(gen.recipe.model.num_blocks), "block")
        heads = _pick(head, int(gen.recipe.model.num_heads), "head")
        maps = attention_maps(gen, prompt_ids(gen, prompt))
        if json_out:
            _json({"checkpoint": str(gen.path), **maps.to_json(gen, blocks, heads, top)})
        else:
            out.print(render.attention_text(maps, blocks, heads, top))
        if png is not None:
            from llmcli.inspect.plots import attention_png

            if len(blocks) == 1:
                where = f"block {blocks[0] + 1} · " + (f"head {heads[0] + 1}" if len(heads) == 1
                                                       else "one map per head")
            else:
                where = "rows: blocks · columns: heads"
            attention_png(maps, png, blocks, heads, f"attention weights of "
                          f"{gen.path.parent.name} ({where})")
        info(f"{len(maps.ids)} tokens · {time.perf_counter() - started:.1f}s"
             + (f" · wrote {png}" if png is not None else ""))

    run_guarded(body)


@command.command("score")
def score(
    ctx: typer.Context,
    checkpoint: str = CHECKPOINT,
    text: str = typer.Argument(None, help="The text to score (or --file).", show_default=False,
                               parser=as_utf8),
    file: Path = typer.Option(None, "--file", "-f", help="Score the text of this file.",
                              show_default=False, parser=path_text),
    top: int = typer.Option(3, "--top", "-k", min=1, help="First choices shown per token."),
    limit: int = typer.Option(10, "--limit", min=0, help="Wrong guesses to list."),
    json_out: bool = JSON,
    device: str = DEVICE,
) -> None:
    """The probability the model gives each token of a text, coloured; loss and perplexity.

    Example:
    llm inspect score tiny "The list of the arguments is evaluated."
    """

    def body() -> None:
        from llmcli.inspect import render
        from llmcli.inspect.score import score_text

        started = time.perf_counter()
        if json_out:
            refuse_unused(ctx, ("limit",), "not used with --json, which gives every token's "
                          "probability and first choices; to list wrong guesses, leave out "
                          "--json")
        if text is None and file is None:
            fail("score: no text given; give the text to score as TEXT or with --file FILE")
        if text is not None and file is not None:
            fail("score: give the text to score either as TEXT or with --file, not both")
        content = text if file is None else read_text_input(file, f"--file {file}")
        gen = _load(checkpoint, device)
        result = score_text(gen, content, top)
        if json_out:
            _json({"checkpoint": str(gen.path), **result.to_json(gen)})
        else:
            out.print(render.score_text_view(result, color=out.is_terminal))
            out.print(render.score_summary(result))
            table = render.wrong_table(result, limit)
            if table is not None and limit:
                out.print(table)
        info(f"{time.perf_counter() - started:.1f}s")

    run_guarded(body)



@command.command("lens")
def lens(
    checkpoint: str = CHECKPOINT,
    prompt: str = PROMPT,
    position: int = POSITION,
    top: int = typer.Option(3, "--top", "-k", min=1, help="Predictions shown per layer."),
    json_out: bool = JSON,
    device: str = DEVICE,
) -> None:
    """The logit lens: the next-token prediction after each block, as the prediction forms.

    Each block's residual stream goes through the final norm and the output layer.
    The last row is the model's real prediction.

    Example:
    llm inspect lens tiny "The list of"
    """

    def body() -> None:
        from llmcli.inspect import render
        from llmcli.inspect.lens import logit_lens
        from llmcli.inspect.tokens import position_index, prompt_ids

        started = time.perf_counter()
        gen = _load(checkpoint, device)
        ids = prompt_ids(gen, prompt)
        result = logit_lens(gen, ids, position_index(len(ids), position), top)
        if json_out:
            _json({"checkpoint": str(gen.path), **result.to_json(gen)})
        else:
            out.print(render.lens_table(result))
        info(f"{time.perf_counter() - started:.1f}s")

    run_guarded(body)


@command.command("norms")
def norms(
    ctx: typer.Context,
    checkpoint: str = CHECKPOINT,
    prompt: str = PROMPT,
    position: int = POSITION,
    block: int = typer.Option(1, "--block", "-b", help="Walk through this block's first norm "
                              "(0 = the final norm)."),
    dims: int = typer.Option(6, "--dims", min=1, help="Dimensions in the walk-through."),
    json_out: bool = JSON,
    device: str = DEVICE,
) -> None:
    """LayerNorm / RMSNorm at one position: mean, variance, ε, γ, β, step by step.

    Example:
    llm inspect norms tiny "The list of" --block 2
    """

    def body() -> None:
        from llmcli.inspect import render
        from llmcli.inspect.norms import norm_report
        from llmcli.inspect.tokens import position_index, prompt_ids

        started = time.perf_counter()
        if json_out:
            refuse_unused(ctx, ("block", "dims"), "not used with --json, which gives every "
                          "norm in full; for one norm's walk-through, leave out --json")
        gen = _load(checkpoint, device)
        blocks = int(gen.recipe.model.num_blocks)
        if not 0 <= block <= blocks:
            fail(f"--block {block}: this model has {blocks} blocks; use 1..{blocks} (0 = the "
                 "final norm)")
        ids = prompt_ids(gen, prompt)
        report = norm_report(gen, ids, position_index(len(ids), position))
        if json_out:
            _json({"checkpoint": str(gen.path), **report.to_json(gen)})
        else:
            out.print(render.norms_table(report))
            step = report.steps[-1] if block == 0 else report.steps[2 * (block - 1)]
            out.print(render.norm_walk(step, dims))
        info(f"{time.perf_counter() - started:.1f}s")

    run_guarded(body)
