"""One module per subcommand; each exposes a Typer command function, registered here in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REGISTERED: list[tuple[str, Callable[..., Any]]] = []


def _load() -> None:
    # Each import is cheap: command modules import heavy libraries inside their functions.
    from llmcli.commands import (
        export,
        fetch,
        finetune,
        generate,
        imagine,
        import_model,
        inspect,
        params,
        pretrain,
        scaling,
        tokenize,
    )

    REGISTERED.extend([
        ("fetch", fetch.command),
        ("tokenize", tokenize.command),
        ("pretrain", pretrain.command),
        ("finetune", finetune.command),
        ("params", params.command),
        ("generate", generate.command),
        ("inspect", inspect.command),
        ("imagine", imagine.command),
        ("scaling", scaling.command),
        ("export", export.command),
        ("import", import_model.command),
    ])


_load()
