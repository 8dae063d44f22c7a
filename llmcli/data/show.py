"""The token viewer behind `llm tokenize --show`: text drawn token by token, with the ids.

cl100k splits many Chinese characters across two or three tokens, so a token may hold only
part of a character's UTF-8 bytes; such bytes are shown as `<e5 a4>`, never as U+FFFD.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from llmcli.data.tokenizer import Tokenizer

# The eight standard colours, so neighbouring tokens differ even on a 16-colour terminal.
PALETTE = ("black on cyan", "black on yellow", "white on blue", "black on green",
           "white on magenta", "white on red")
SEPARATOR = "|"  # between tokens when there is no colour to tell them apart


def token_parts(data: bytes) -> list[tuple[str, bool]]:
    """A token's bytes as (text, is_raw_bytes) parts: UTF-8 text, and `<xx yy>` for the rest."""
    parts: list[tuple[str, bool]] = []
    while data:
        try:
            parts.append((data.decode("utf-8"), False))
            break
        except UnicodeDecodeError as exc:
            if exc.start:
                parts.append((data[:exc.start].decode("utf-8"), False))
            parts.append((f"<{data[exc.start:exc.end].hex(' ')}>", True))
            data = data[exc.end:]
    return parts


# Tabs, returns and line ends drawn, other control characters as their Unicode pictures (ESC
# as ␛): a token's bytes must never move the cursor, ring, or restyle the terminal.
_PICTURES = {**{c: chr(0x2400 + c) for c in range(32)}, 0x7F: "␡", 9: "→", 13: "␍", 10: "↵\n"}
_PICTURES.update({c: "�" for c in range(0x80, 0xA0)})  # C1 controls


def visible(text: str) -> str:
    return text.translate(_PICTURES)


def render(tok: Tokenizer, ids: Sequence[int], color: bool = True) -> Text:
    """The tokens of `ids` in turn, then the ids in matching colours, then a count line."""
    view = Text()
    id_line = Text("ids: [")
    total_bytes = 0
    for i, token_id in enumerate(ids):
        data = tok.token_bytes(token_id)
        total_bytes += len(data)
        colour = PALETTE[i % len(PALETTE)] if color else ""
        special = token_id == tok.eot_id
        if not color and i:
            view.append(SEPARATOR, style="dim")
        for text, raw in token_parts(data):
            style = f"{colour} bold" if raw or special else colour
            view.append(visible(text), style=style.strip())
        if i:
            id_line.append(", ")
        id_line.append(str(token_id), style=colour)
    id_line.append("]")
    summary = Text(f"{len(ids):,} tokens, {total_bytes:,} bytes", style="dim")
    if ids:
        summary.append(f", {total_bytes / len(ids):.2f} bytes per token", style="dim")
    summary.append(f" ({tok.name})", style="dim")
    return Text("\n").join([view, Text(""), id_line, summary])
