"""One module per subcommand; each exposes a Typer command function, registered here in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REGISTERED: list[tuple[str, Callable[..., Any]]] = []


def _load() -> None:
    # Each import is cheap: command modules import heavy libraries inside their functions.
    from llmcli.commands import fetch, tokenize
    from llmcli.commands import params
    from llmcli.commands import pretrain
    from llmcli.commands import finetune
    from llmcli.commands import generate
    from llmcli.commands import scaling
    from llmcli.commands import imagine

    REGISTERED.extend([
        ("fetch", fetch.command),
        ("tokenize", tokenize.command),
        ("params", params.command),
        ("pretrain", pretrain.command),
        ("finetune", finetune.command),
        ("generate", generate.command),
        ("scaling", scaling.command),
        ("imagine", imagine.command),
    ])


_load()
