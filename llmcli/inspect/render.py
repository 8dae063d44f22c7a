"""The inspect views as terminal output: rich Tables and Texts (markup off, styles explicit)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from llmcli.data.show import token_parts, visible

TAIL_COLUMNS = 2  # a wide table shows its first columns, "…", then its last two
CELL = 10  # terminal cells a value column takes ("-0.1234", padding, separator)


def _pair(i: int, width: int) -> str:
    """The dimensions sinusoidal pair i fills: an odd width's last pair has only its sine."""
    return f"{2 * i}, {2 * i + 1}" if 2 * i + 1 < width else str(2 * i)


def _columns(width: int, room: int = 8) -> list[int | None]:
    """Column indices to show in `room` columns, None marking the elided middle (like torch's
    printed tables)."""
    room = max(room, TAIL_COLUMNS + 2)
    if width <= room:
        return list(range(width))
    head = room - TAIL_COLUMNS - 1
    return [*range(head), None, *range(width - TAIL_COLUMNS, width)]


def _num(value: float) -> str:
    return f"{value:.4f}"


def _pct(p: float) -> str:
    return f"{100 * p:.2f}%" if p >= 0.0001 else "<0.01%"


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)


def value_table(title: str, row_names: list[str], row_head: str, values: Any, width: int,
                before: tuple[str, list[str]] | None = None,
                after: tuple[str, list[str]] | None = None) -> Table:
    """Rows of a wide matrix, as many columns as fit in `width` terminal cells and the middle
    elided; a row named "…" stands for elided rows; `before`/`after` are extra (name, cells)
    columns around the values."""
    table = _table(title)
    table.add_column(row_head, justify="right", no_wrap=True)
    used = max(len(row_head), *(len(n) for n in row_names)) + 3 + 2  # + the table's edges
    for extra in (before, after):
        if extra is not None:
            used += max(len(extra[0]), *(len(c) for c in extra[1])) + 3
    if before is not None:
        table.add_column(before[0], no_wrap=True)
    columns = _columns(int(values.shape[1]), (width - used - 4) // CELL + 1)  # + "…" (4)
    for c in columns:
        table.add_column("…" if c is None else str(c), justify="right", no_wrap=True)
    if after is not None:
        table.add_column(after[0], justify="right", no_wrap=True)
    for i, name in enumerate(row_names):
        if name == "…":
            table.add_row("…", *(["…"] * (len(table.columns) - 1)))
            continue
        cells = ["…" if c is None else _num(float(values[i, c])) for c in columns]
        table.add_row(name, *([before[1][i]] if before is not None else []), *cells,
                      *([after[1][i]] if after is not None else []))
    return table


# ---------------------------------------------------------------------------------------------
# embeddings


def embedding_table(rows: Any, vocab_note: str, width: int = 80) -> Table:
    vocab, d_model = rows.shape
    title = f"token embedding (tok_emb.weight): {vocab:,} × {d_model} · {vocab_note}"
    return value_table(title, [f"{i:,}" for i in rows.ids], "id", rows.rows, width,
                       before=("token", rows.tokens),
                       after=("‖row‖", [_num(float(r.norm())) for r in rows.rows]))


def neighbours_table(near: Any) -> Table:
    table = _table(f"nearest to {near.token} (id {near.id:,}) by cosine similarity")
    table.add_column("rank", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("cosine", justify="right")
    for rank, n in enumerate(near.nearest, 1):
        table.add_row(str(rank), n.token, f"{n.id:,}", f"{n.cosine:.4f}")
    return table


def pca_line(pca: Any, path: Any) -> str:
    return (f"PCA of {len(pca.ids)} tokens ({pca.source}): component 1 holds "
            f"{100 * pca.explained[0]:.1f}% of the variance, component 2 "
            f"{100 * pca.explained[1]:.1f}% → {path}")


# ---------------------------------------------------------------------------------------------
# positions


def position_tables(table: Any, rows: int, width: int = 80) -> list[Table]:
    length, columns = table.values.shape
    shown = list(range(min(rows, length)))
    if length > rows:
        shown.append(length - 1)
    out = []
    if table.frequencies is not None:
        freq = _table(f"{table.kind}: frequency θ of each dimension pair (radians per token) "
                      "and its wavelength 2π/θ (tokens)")
        freq.add_column("pair", justify="right")
        if table.kind == "sinusoidal":
            freq.add_column("dimensions", justify="right")
        freq.add_column("θ", justify="right")
        freq.add_column("wavelength", justify="right")
        pairs = _columns(len(table.frequencies))
        for i in pairs:
            if i is None:
                freq.add_row("…", *(["…"] if table.kind == "sinusoidal" else []), "…", "…")
                continue
            dims = [_pair(i, columns)] if table.kind == "sinusoidal" else []
            freq.add_row(str(i), *dims, f"{table.frequencies[i]:.6g}",
                         f"{table.wavelengths[i]:,.1f}")
        out.append(freq)
    what = {"sinusoidal": "sinusoidal table PE(pos, 2i) = sin(pos·θ_i), PE(pos, 2i+1) = "
            "cos(pos·θ_i)", "learned": "learned table (pos_emb.weight)",
            "rope": "RoPE: cos(pos·θ_i), the rotation of pair i at each position"}[table.kind]
    names = [str(p) for p in shown]
    if length > rows:
        names[-1:-1] = ["…"]
        shown[-1:-1] = [shown[-1]]  # a placeholder row for the elided positions
    out.append(value_table(f"{what}: {length} × {columns}", names, "position",
                           table.values[shown], width))
    return out


# ---------------------------------------------------------------------------------------------
# attention


def attention_text(maps: Any, blocks: list[int], heads: list[int], k: int) -> Text:
    text = Text()
    width = max(len(t) for t in maps.tokens)
    for b in blocks:
        for h in heads:
            text.append(f"block {b + 1} · head {h + 1}: each token's top {k} attended\n",
                        style="bold")
            for q, row in enumerate(maps.top(b, h, k)):
                text.append(f"  {q:>3} {maps.tokens[q]:<{width}} ←")
                for a in row:
                    text.append(f"  {a.token} ")
                    text.append(f"{a.weight:.2f}", style="cyan")
                text.append("\n")
    return text


# ---------------------------------------------------------------------------------------------
# score

# Probability bands, most surprising last; the standard colours read on 16-colour terminals.
BANDS = ((0.5, "black on green", "≥ 50%"), (0.1, "black on cyan", "10-50%"),
         (0.01, "black on yellow", "1-10%"), (0.0, "white on red", "< 1%"))


def band(p: float) -> str:
    return next(style for floor, style, _ in BANDS if p >= floor)


def score_text_view(score: Any, color: bool = True) -> Text:
    """The text drawn token by token, each coloured by the probability the model gave it."""
    view = Text()
    if score.lead:
        view.append(score.lead.decode("utf-8", errors="replace"), style="dim")
    for i, t in enumerate(score.tokens):
        style = band(t.prob) if color else ""
        if not color and (i or score.lead):
            view.append("|", style="dim")
        for part, raw in token_parts(t.data):
            part = visible(part)
            view.append(part, style=f"{style} bold".strip() if raw else style)
    legend = Text("p: ")
    for _, style, name in BANDS:
        legend.append(f" {name} ", style=style if color else "")
        legend.append(" ")
    return Text("\n").join([view, Text(""), legend])


def score_summary(score: Any) -> str:
    if score.start:
        start = f" (the first after {score.start}, a document's start)"
    else:
        start = " (all but the first: this vocabulary has no end-of-text to predict it from)"
    return (f"{len(score.tokens)} tokens scored{start}: loss {score.loss:.4f} nats/token, "
            f"perplexity {score.perplexity:.2f}, {100 * score.accuracy:.1f}% first choices, "
            f"{score.bits_per_byte:.3f} bits/byte")


def wrong_table(score: Any, limit: int) -> Table | None:
    wrong = score.wrong(limit)
    if not wrong:
        return None
    table = _table(f"where the model expected another token (the {len(wrong)} most surprising)")
    table.add_column("#", justify="right")
    table.add_column("token", no_wrap=True)
    table.add_column("p", justify="right")
    table.add_column("rank", justify="right")
    for i in range(len(wrong[0][1].top)):
        table.add_column(f"choice {i + 1}", no_wrap=True)
    for i, t in wrong:
        table.add_row(str(i), t.token, _pct(t.prob), f"{t.rank:,}",
                      *(Text.assemble(c.token, "\n", (_pct(c.prob), "dim")) for c in t.top))
    return table


# ---------------------------------------------------------------------------------------------
# lens and norms


def lens_table(lens: Any) -> Table:
    final = lens.rows[-1].top[0].token
    table = _table(f"logit lens at position {lens.position} ({lens.token}): the next-token "
                   "prediction after each layer")
    table.add_column("layer", no_wrap=True)
    for i in range(len(lens.rows[0].top)):
        table.add_column(f"#{i + 1}", no_wrap=True)
    table.add_column(f"p({final})", justify="right")
    table.add_column("rank", justify="right")
    for row in lens.rows:
        cells = [Text.assemble(c.token, "\n", (_pct(c.prob), "dim")) for c in row.top]
        table.add_row(row.layer, *cells, _pct(row.final_prob), f"{row.final_rank:,}")
    return table


def norms_table(report: Any) -> Table:
    first = report.steps[0]
    kind = "LayerNorm" if first.kind == "layernorm" else "RMSNorm"
    table = _table(f"{kind} inputs and outputs at position {report.position} ({report.token}), "
                   f"ε = {first.eps:g}")
    layer = first.kind == "layernorm"
    names = ["norm", "mean", "variance", "rms", "γ mean", *(["β mean"] if layer else []),
             "out std"]
    for name in names:
        table.add_column(name, justify="left" if name == "norm" else "right")
    for s in report.steps:
        beta = ([_num(float(s.beta.mean())) if s.beta is not None else "-"] if layer else [])
        table.add_row(s.name, _num(s.mean), _num(s.variance), _num(s.rms),
                      _num(float(s.gamma.mean())), *beta, _num(float(s.y.std(unbiased=False))))
    return table


def norm_walk(step: Any, dims: int = 6) -> Table:
    """One norm's arithmetic on its first dimensions, the tutorial's walk-through."""
    if step.kind == "layernorm":
        how = (f"x̂ = (x − {step.mean:.4f}) / √({step.variance:.4f} + {step.eps:g}) = (x − "
               f"{step.mean:.4f}) / {step.denominator:.4f}; y = x̂·γ"
               + (" + β" if step.beta is not None else " (no β)"))
    else:
        how = (f"x̂ = x / √(mean(x²) + ε) = x / {step.denominator:.4f}; y = x̂·γ")
    table = _table(f"{step.name} ({step.role}): {how}")
    table.add_column("dimension", justify="right")
    names = ["x", "x̂", "γ", *(["β"] if step.beta is not None else []), "y"]
    for name in names:
        table.add_column(name, justify="right")
    vectors = [step.x, step.normalized, step.gamma,
               *([step.beta] if step.beta is not None else []), step.y]
    for d in range(min(dims, len(step.x))):
        table.add_row(str(d), *(_num(float(v[d])) for v in vectors))
    return table
