"""PNG pictures of the views (matplotlib, Agg backend), written atomically.

Token labels drop the quotes of the terminal views and show a leading or trailing space as ␣,
so ' the' reads ␣the on an axis.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from llmcli.files import atomic_path

DPI = 80


def plot_label(token: str, width: int = 12) -> str:
    """A token label for an axis: unquoted, spaces as ␣, no mathtext, at most `width` chars."""
    if len(token) >= 2 and token[0] == token[-1] == "'":
        token = token[1:-1]
    token = token.replace(" ", "␣").replace("$", r"\$")
    return token if len(token) <= width else token[:width - 1] + "…"


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig: Any, target: Path) -> Path:
    """Write the figure as a 256-colour PNG (a third of the size, no visible difference for
    heat maps and labels), or as matplotlib's own PNG when Pillow cannot."""
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a CJK token's missing glyph is drawn as a box, not an error
        warnings.simplefilter("ignore")
        fig.savefig(buffer, format="png", dpi=DPI)
    with atomic_path(target) as tmp:
        try:
            from PIL import Image

            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
            image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                tmp, format="PNG", optimize=True)
        except (ImportError, OSError, ValueError):
            tmp.write_bytes(buffer.getvalue())
    return Path(target)


def attention_png(maps: Any, target: Path, blocks: list[int], heads: list[int],
                  title: str) -> Path:
    """One heat map per (block, head): a grid (rows = blocks), or one large annotated map."""
    labels = [plot_label(t) for t in maps.tokens]
    n = len(labels)
    single = len(blocks) == 1 and len(heads) == 1
    rows, cols = len(blocks), len(heads)
    cell = 7.0 if single else max(1.6, min(3.0, 18.0 / max(rows, cols)))
    width = max(cell * cols + 1.6, 6.5)  # one narrow head: still room for the title and bar
    fig = _figure(width, cell * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False)
    ticks = n <= (40 if single else 24)
    font = 10 if single else max(5, min(8, int(100 / max(n, 1))))
    image = None
    for r, b in enumerate(blocks):
        for c, h in enumerate(heads):
            ax = axes[r][c]
            image = ax.imshow(maps.weights[b, h].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"block {b + 1} · head {h + 1}", fontsize=font + 2)
            if ticks:
                ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
                ax.set_yticks(range(n), labels, fontsize=font)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if single and n <= 16:
                for i in range(n):
                    for j in range(i + 1):
                        w = float(maps.weights[b, h, i, j])
                        ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=8,
                                color="black" if w > 0.6 else "white")
            if single:
                ax.set_ylabel("query (attending) token")
                ax.set_xlabel("key (attended-to) token")
    if not single:
        fig.supylabel("query (attending) token")
        fig.supxlabel("key (attended-to) token")
    fig.suptitle(title, fontsize=12, wrap=True)
    right = 1 - 1.1 / width  # the colour bar and its labels keep 1.1 inches, whatever the width
    fig.tight_layout(rect=(0, 0, right, 0.95))
    bar = fig.add_axes((right + 0.1 / width, 0.15, 0.15 / width, 0.7))
    fig.colorbar(image, cax=bar, label="attention weight")
    return _save(fig, target)


def positions_png(table: Any, target: Path, title: str) -> Path:
    """The position table as a heat map: positions down, dimensions (or RoPE pairs) across."""
    values = table.values.numpy()
    length, width = values.shape
    fig = _figure(min(12.0, max(7.0, 3.0 + width * 0.08)),
                  min(8.0, max(4.0, 2.0 + length * 0.06)))
    ax = fig.add_subplot()
    limit = max(1e-6, float(abs(values).max()))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest")
    ax.set_xlabel(f"{table.column_name} (0..{width - 1})")
    ax.set_ylabel(f"position (0..{length - 1})")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="cos(position × θᵢ)" if table.kind == "rope" else "value")
    fig.tight_layout()
    return _save(fig, target)


def pca_png(pca: Any, target: Path, title: str) -> Path:
    """The tokens' embeddings on their first two principal components, each point labelled."""
    coords = pca.coords.numpy()
    fig = _figure(9.0, 7.0)
    ax = fig.add_subplot()
    ax.scatter(coords[:, 0], coords[:, 1], s=12, color="tab:blue", alpha=0.6)
    size = 9 if len(coords) <= 60 else max(5, int(9 - math.log2(len(coords) / 60) * 2))
    for (x, y), token in zip(coords, pca.tokens, strict=True):
        ax.annotate(plot_label(token), (x, y), xytext=(3, 2), textcoords="offset points",
                    fontsize=size)
    ax.set_xlabel(f"principal component 1 ({100 * pca.explained[0]:.1f}% of the variance)")
    ax.set_ylabel(f"principal component 2 ({100 * pca.explained[1]:.1f}% of the variance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, target)
