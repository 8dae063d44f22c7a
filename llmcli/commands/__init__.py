"""One module per subcommand; each exposes a Typer command function, registered here in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REGISTERED: list[tuple[str, Callable[..., Any]]] = []


def _load() -> None:
    # Each import is cheap: command modules import heavy libraries inside their functions.
    from llmcli.commands import params

    REGISTERED.extend([
        ("params", params.command),
    ])


_load()
