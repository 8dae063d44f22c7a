"""`llm params`: what a recipe or a checkpoint holds, counted without allocating a single weight.

Recipes are built on the `meta` device (instant even for billions of parameters); checkpoints are
counted from the tensor shapes stored in the file, which is what is really there.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from llmcli.checkpoint import Checkpoint, latest_run
from llmcli.console import fail
from llmcli.model.count import Part, breakdown, flops_per_token, named_counts, training_memory
from llmcli.recipe import Recipe, load_recipe

DEFAULT_RECIPE = Path("recipes") / "scifi.yaml"


def pick_target(target: str | None) -> tuple[Path, str]:
    """What `llm params` with no argument counts: the newest run, else the seed's scifi recipe."""
    if target:
        return Path(target), ""
    run = latest_run()
    if run is not None:
        return run, f"no target given: counting the newest run, {run}"
    if DEFAULT_RECIPE.exists():
        return DEFAULT_RECIPE, f"no target given and no run under checkpoints/: counting " \
                               f"{DEFAULT_RECIPE}"
    fail("no target given, no run under checkpoints/ and no recipes/scifi.yaml here; "
         "pass a recipe or a checkpoint: llm params RECIPE.yaml")


def is_checkpoint(path: Path) -> bool:
    return path.suffix == ".safetensors" or path.is_dir()


def count_target(target: Path, overrides: tuple[str, ...] | list[str] = (), *,
                 processes: int | None = None, device_bytes: int | None = None
                 ) -> dict[str, Any]:
    """The full report for a recipe file or a checkpoint (file or run directory); with
    `processes`, also the memory per device under DDP and FSDP (`llmcli.scaling.device_memory`)."""
    from llmcli.model.gpt import build_model

    notes: list[str] = []
    if is_checkpoint(target):
        if overrides:
            fail(f"{target}: overrides apply to recipes, not checkpoints; drop "
                 f"'{overrides[0]}' or count the recipe instead")
        ckpt = Checkpoint.open(target)
        recipe = ckpt.recipe
        counts = {name: math.prod(shape) for name, shape in ckpt.shapes().items()}
        source, kind = str(ckpt.path), "checkpoint"
        if ckpt.is_adapter:  # what runs is base + adapter; what trained is the adapter
            adapter = counts
            base = Checkpoint.read(ckpt.base_path)
            counts = {name: math.prod(shape) for name, shape in base.shapes().items()}
            notes.append(f"LoRA adapter (rank {recipe.lora.rank}) of {sum(adapter.values()):,} "
                         f"parameters on the base {base.path} ({sum(counts.values()):,}); "
                         "FLOPs are the full model's")
    else:
        recipe = load_recipe(target, overrides)
        source, kind = str(target), "recipe"
        recipe = resolve_vocab_for_counting(recipe, notes)
        counts = None
    model = build_model(recipe.model, device="meta")
    if counts is None:
        counts = named_counts(model)
    total = sum(counts.values())
    trainable = total
    if kind == "recipe":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = breakdown(recipe.model, counts)
    if kind == "checkpoint" and ckpt.is_adapter:
        trainable = sum(adapter.values())
        total += trainable
        parts.append(Part(f"LoRA adapter (rank {recipe.lora.rank}: "
                          f"{', '.join(recipe.lora.targets)})", trainable))
    flops = flops_per_token(model)
    per_device = None
    if processes is not None:
        per_device = memory_per_device(recipe, counts, total, trainable, processes, device_bytes)
    return {
        "source": source,
        "kind": kind,
        "name": recipe.name,
        "total": total,
        "trainable": trainable,
        "parts": [_part_dict(p) for p in parts],
        "memory_bytes": training_memory(total, trainable),
        "flops_per_token": flops,
        "context_length": recipe.model.context_length,
        "device_memory": per_device,
        "notes": notes,
    }


def memory_per_device(recipe: Recipe, counts: dict[str, int], total: int, trainable: int,
                      processes: int, device_bytes: int | None) -> dict[str, Any]:
    """DDP vs FSDP memory per device for this model's shape (one block's parameters, the root)."""
    from llmcli.scaling import DEFAULT_DEVICE_MEMORY, device_memory

    block = sum(n for name, n in counts.items() if name.startswith("blocks.0."))
    precision = "fp32" if recipe.train.precision == "fp32" else "bf16"
    return device_memory(total, processes, trainable=trainable, block=block,
                         blocks=recipe.model.num_blocks, precision=precision,
                         device_bytes=device_bytes or DEFAULT_DEVICE_MEMORY)


def resolve_vocab_for_counting(recipe: Recipe, notes: list[str]) -> Recipe:
    """`vocab_size: auto` is set by the corpus: counted as pretraining would resolve it when the
    corpus is tokenized already, else with the tokenizer's full vocabulary (and said so)."""
    from llmcli.scaling import find_sidecar, recipe_vocab

    if recipe.model.vocab_size != "auto":
        return recipe
    vocab, note = recipe_vocab(recipe, find_sidecar(recipe.data.source, recipe.data.tokenizer))
    notes.append(f"model.vocab_size is {note}")
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=vocab))


def _part_dict(part: Part) -> dict[str, Any]:
    return {"name": part.name, "params": part.params, "repeat": part.repeat,
            "total": part.total, "children": [_part_dict(c) for c in part.children]}
