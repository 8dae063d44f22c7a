"""What the training commands share: how `--resume` reads its argument, and option texts.

Not a command itself: command modules import this, never each other.
"""

from __future__ import annotations

from typing import Any

from llmcli.console import fail

RESUME_HELP = ("Continue the run exactly from its newest checkpoint; put a checkpoint file or run "
               "directory after it to resume from that one, or `auto` to take the newest intact "
               "one when the newest is damaged.")
OVERWRITE_HELP = "Delete an earlier run in the run directory and start afresh."


def split_resume(items: list[str], resume: bool) -> tuple[list[str], Any]:
    """With --resume, a positional argument without '=' is the checkpoint to resume from."""
    paths = [item for item in items if "=" not in item]
    rest = [item for item in items if "=" in item]
    if paths and not resume:
        fail(f"'{paths[0]}': overrides look like section.key=value (e.g. train.max_iters=100); "
             "to resume from a checkpoint use --resume PATH")
    if len(paths) > 1:
        fail(f"--resume takes one checkpoint, got {', '.join(paths)}")
    if not resume:
        return rest, None
    return rest, (paths[0] if paths else True)
