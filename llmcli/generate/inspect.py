"""The inspector: why each token was chosen (`--show-probs`) and strategies side by side
(`--compare`). Plain lines that fit an 80-column terminal, and the same facts as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.cells import cell_len, set_cell_size

from llmcli.generate.decode import BeamStep, Generation, SampleStep

TokenBytes = Callable[[int], bytes]
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def visible(data: bytes) -> str:
    """A token's text with its edges visible: quoted, whitespace escaped, stray bytes as \\xNN."""
    text = data.decode("utf-8", errors="backslashreplace")
    shown = "".join(_ESCAPES.get(c, c if c.isprintable() or c == " " else f"\\x{ord(c):02x}")
                    for c in text)
    return f"'{shown}'"


def fit(text: str, width: int) -> str:
    """Pad or cut to `width` terminal cells (CJK characters take two), marking cuts with …."""
    if cell_len(text) <= width:
        return set_cell_size(text, width)
    return set_cell_size(text, width - 1) + "…"


def tail(text: str, width: int) -> str:
    """The end of `text` in at most `width` cells, right-aligned."""
    text = "".join(_ESCAPES.get(c, c) for c in text)
    if cell_len(text) > width:
        while cell_len(text) > width - 1:
            text = text[1:]
        text = "…" + text
    return " " * (width - cell_len(text)) + text


def _pct(p: float) -> str:
    return f"{100 * p:7.2f}%" if p >= 0.0001 else "  <0.01%"


def sample_step_lines(step: SampleStep, token_bytes: TokenBytes) -> list[str]:
    """One step of greedy search or sampling: the top candidates, what the filters kept, the
    draw probability after renormalising, and the chosen token (◀)."""
    chosen = visible(token_bytes(step.chosen))
    how = "the most probable" if step.greedy else "drawn at random"
    row = f" (sequence {step.row + 1})" if step.row else ""
    lines = [f"step {step.step}{row}: {fit(chosen, 40).rstrip()}  ({how})"]
    if step.greedy:
        lines.append(f"  {'rank':>4}  {fit('token', 28)} {'p':>8}")
    else:
        lines.append(f"  {'rank':>4}  {fit('token', 28)} {'p':>8} {'p(draw)':>8}  kept")
    for i, token in enumerate(step.ids):
        mark = "◀" if token == step.chosen else ""
        label = fit(visible(token_bytes(token)), 28)
        if step.greedy:
            lines.append(f"  {step.ranks[i]:>4}  {label} {_pct(step.probs[i])}  {mark}".rstrip())
            continue
        removed = step.removed_by[i]
        kept = f"no: {removed}" if removed else "yes"
        draw = _pct(step.draw_probs[i]) if not removed else f"{'-':>8}"
        lines.append(f"  {step.ranks[i]:>4}  {label} {_pct(step.probs[i])} {draw}  "
                     f"{kept:<10}{mark}".rstrip())
    return lines


def beam_step_lines(step: BeamStep, token_bytes: TokenBytes,
                    text_of: Callable[[list[int]], str]) -> list[str]:
    """One step of beam search: each ranked extension, its beam's recent text, and its fate."""
    lines = [f"step {step.step}: {len(step.parents)} running beam(s), "
             f"{len(step.candidates)} best extensions"]
    lines.append(f"  {'beam':>4}  {'…ending':>18}  {fit('+ token', 18)} {'log p':>7} "
                 f"{'sum':>8}  result")
    next_beam = 0
    for cand in step.candidates:
        if cand.status == "beam":
            next_beam += 1
            result = f"beam {next_beam}"
        elif cand.status in ("eos", "stop"):
            result = f"finished ({cand.status})"
        else:
            result = "dropped"
        before = tail(text_of(step.parents[cand.parent]), 18)
        label = fit(visible(token_bytes(cand.token)), 18)
        lines.append(f"  {cand.parent + 1:>4}  {before}  {label} {cand.token_logprob:7.3f} "
                     f"{cand.total:8.3f}  {result}")
    return lines


def step_json(step: SampleStep | BeamStep, token_text: Callable[[int], str]) -> dict[str, Any]:
    """A step for `--json --show-probs` (token ids are the tokenizer's)."""
    if isinstance(step, SampleStep):
        return {
            "step": step.step,
            "sequence": step.row,
            "chosen": token_text(step.chosen),
            "candidates": [
                {"token": token_text(t), "rank": r, "p": p, "p_draw": d, "removed_by": why}
                for t, r, p, d, why in zip(step.ids, step.ranks, step.probs, step.draw_probs,
                                           step.removed_by, strict=True)
            ],
        }
    return {
        "step": step.step,
        "candidates": [
            {"beam": c.parent, "token": token_text(c.token), "logprob": c.token_logprob,
             "sum": c.total, "status": c.status}
            for c in step.candidates
        ],
    }


def result_line(gen: Generation) -> str:
    """'12 tokens, log p -23.41, score -1.951, ended by eos'."""
    return (f"{len(gen.tokens)} tokens, log p {gen.logprob:.2f}, score {gen.score:.3f}, "
            f"ended by {gen.finish}")


def compare_table(rows: Sequence[tuple[str, str, Generation]], width: int = 80) -> Any:
    """Strategies side by side: one column each, the text, then how it scored."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_lines=False, expand=True, width=width)
    for name, _, _ in rows:
        table.add_column(name, ratio=1, overflow="fold")
    table.add_row(*(Text(text) for _, text, _ in rows))
    table.add_row(*("" for _ in rows))
    table.add_row(*(f"{len(g.tokens)} tokens\nlog p {g.logprob:.2f}\n"
                    f"per token {g.logprob / max(len(g.tokens), 1):.3f}\nended by {g.finish}"
                    for _, _, g in rows))
    return table
