"""`llm params`: what a recipe or a checkpoint holds, counted without allocating a single weight.

Recipes are built on the `meta` device (instant even for billions of parameters); checkpoints are
counted from the tensor shapes stored in the file, which is what is really there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.checkpoint import Checkpoint, latest_run, tied_names
from llmcli.console import fail
from llmcli.model.count import (
    Part,
    breakdown,
    count_parameters,
    flops_per_token,
    matmul_parameters,
    named_counts,
    training_memory,
)
from llmcli.recipe import Recipe, load_recipe

DEFAULT_RECIPE = Path("recipes") / "scifi.yaml"


def pick_target(target: str | None) -> tuple[Path, str]:
    """What `llm params` with no argument counts: the newest run, else the seed's scifi recipe."""
    if target == "":  # Path("") is the current folder: an unset shell variable, not a choice
        fail("an empty TARGET; give a recipe YAML, a checkpoint or a run directory")
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


@dataclass
class Trained:
    """What training a recipe builds and which part of it learns (`training_view`)."""

    recipe: Recipe  # the model section as training builds it: a fine-tune's is its base's
    vocab_note: str  # where model.vocab_size came from
    adapter: int | None = None  # LoRA adapter parameters, the only ones that train; else None
    notes: list[str] = field(default_factory=list)


def training_view(recipe: Recipe) -> Trained:
    """The model a recipe trains, as `llm finetune`/`llm pretrain` would build it: a fine-tune
    (`finetune.init`) trains its base checkpoint's model, and with `lora.rank` > 0 only the
    adapter trains. `llm params` and `llm scaling --recipe` both count through here, so they
    agree with each other and with the training run."""
    notes: list[str] = []
    vocab_note = "from the recipe"
    init = recipe.finetune.init
    if init and Path(init).exists():
        from llmcli.finetune import base_checkpoint, reconcile  # imports torch: fine-tunes only

        base = Checkpoint.read(base_checkpoint(recipe, None))
        recipe = reconcile(recipe, base.recipe, base.meta, recipe.path or "recipe")
        vocab_note = "from the base checkpoint"
        notes.append(f"fine-tuning recipe: counting its base checkpoint {base.path} "
                     "(finetune.init), the model fine-tuning trains")
    elif init:
        notes.append(f"finetune.init {init!r}: base checkpoint not found (from {Path.cwd()}); "
                     "counting the recipe's own model section instead, which fine-tuning "
                     "would replace with the base's")
    if recipe.model.vocab_size == "auto":
        recipe, vocab_note = resolve_vocab(recipe)
        notes.append(f"model.vocab_size is {vocab_note}")
    adapter = None
    if recipe.lora.rank > 0:
        adapter = lora_parameters(recipe)
        how = "" if init else " (by `llm finetune`: `llm pretrain` ignores the lora section)"
        notes.append(f"LoRA rank {recipe.lora.rank} on {', '.join(recipe.lora.targets)}: only "
                     f"the adapter's {adapter:,} parameters train{how}, the model's stay "
                     "frozen; FLOPs are the full model's")
    return Trained(recipe, vocab_note, adapter, notes)


def lora_parameters(recipe: Recipe) -> int:
    """The LoRA adapter's size: `apply_lora` itself on a meta-device model, so the count (and
    any refusal, e.g. 'head' on a tied output layer) is exactly what fine-tuning gets."""
    from llmcli.model.gpt import build_model
    from llmcli.model.lora import apply_lora

    model = build_model(recipe.model, device="meta")
    try:
        apply_lora(model, recipe.lora)
    except ValueError as exc:
        fail(f"lora: {exc}")
    return count_parameters(model)[1]


def count_target(target: Path, overrides: tuple[str, ...] | list[str] = (), *,
                 processes: int | None = None, device_bytes: int | None = None
                 ) -> dict[str, Any]:
    """The full report for a recipe file or a checkpoint (file or run directory); with
    `processes`, also the memory per device under DDP and FSDP (`llmcli.scaling.device_memory`)."""
    from llmcli.model.gpt import build_model

    notes: list[str] = []
    adapter: int | None = None  # LoRA parameters: what trains, beside the frozen model
    if is_checkpoint(target):
        if overrides:
            fail(f"{target}: overrides apply to recipes, not checkpoints; drop "
                 f"'{overrides[0]}' or count the recipe instead")
        ckpt = Checkpoint.open(target)
        recipe = ckpt.recipe
        counts = stored_counts(ckpt)
        source, kind = str(ckpt.path), "checkpoint"
        if ckpt.is_adapter:  # what runs is base + adapter; what trained is the adapter
            adapter = sum(counts.values())
            base = Checkpoint.read(ckpt.base_path)
            counts = stored_counts(base)
            notes.append(f"LoRA adapter (rank {recipe.lora.rank}) of {adapter:,} "
                         f"parameters on the base {base.path} ({sum(counts.values()):,}); "
                         "FLOPs are the full model's")
    else:
        trained = training_view(load_recipe(target, overrides))
        recipe, adapter, notes = trained.recipe, trained.adapter, trained.notes
        source, kind = str(target), "recipe"
        counts = None
    model = build_model(recipe.model, device="meta")
    counts = named_counts(model) if counts is None else model_named(counts, model)
    total = trainable = sum(counts.values())
    parts = breakdown(recipe.model, counts)
    if adapter is not None:
        trainable = adapter
        total += adapter
        parts.append(Part(f"LoRA adapter (rank {recipe.lora.rank}: "
                          f"{', '.join(recipe.lora.targets)})", adapter))
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
        "flops_n": matmul_parameters(model),
        "context_length": recipe.model.context_length,
        "device_memory": per_device,
        "notes": notes,
    }


def stored_counts(ckpt: Checkpoint) -> dict[str, int]:
    """Tensor name -> element count as stored in a checkpoint, without loading a weight."""
    return {name: math.prod(shape) for name, shape in ckpt.shapes().items()}


def model_named(counts: dict[str, int], model: Any) -> dict[str, int]:
    """`counts` under the names the model's own count uses (`named_counts`): safetensors keeps
    a tied tensor under one of its names (lm_head.weight for tied embeddings), which a count by
    prefix would give to the output layer where a recipe's count gives it to the embedding."""
    renamed = dict(counts)
    for names in tied_names(model):  # the first name is the one `named_counts` keeps
        stored = [name for name in names if name in renamed]
        if stored and names[0] not in renamed:
            renamed[names[0]] = renamed.pop(stored[0])
    return renamed


def memory_per_device(recipe: Recipe, counts: dict[str, int], total: int, trainable: int,
                      processes: int, device_bytes: int | None) -> dict[str, Any]:
    """DDP vs FSDP memory per device for this model's shape (one block's parameters, the root)."""
    from llmcli.scaling import DEFAULT_DEVICE_MEMORY, device_memory

    block = sum(n for name, n in counts.items() if name.startswith("blocks.0."))
    precision = "fp32" if recipe.train.precision == "fp32" else "bf16"
    return device_memory(total, processes, trainable=trainable, block=block,
                         blocks=recipe.model.num_blocks, precision=precision,
                         device_bytes=DEFAULT_DEVICE_MEMORY if device_bytes is None
                      else device_bytes)


def resolve_vocab(recipe: Recipe) -> tuple[Recipe, str]:
    """`vocab_size: auto` is set by the corpus: counted as pretraining would resolve it when the
    corpus is tokenized already, else with the tokenizer's full vocabulary (the note says which).
    """
    from llmcli.scaling import find_sidecar, recipe_vocab

    vocab, note = recipe_vocab(recipe, find_sidecar(recipe.data.source, recipe.data.tokenizer))
    model = dataclasses.replace(recipe.model, vocab_size=vocab)
    return dataclasses.replace(recipe, model=model), note


def _part_dict(part: Part) -> dict[str, Any]:
    return {"name": part.name, "params": part.params, "repeat": part.repeat,
            "total": part.total, "children": [_part_dict(c) for c in part.children]}
