"""Checkpoints: safetensors files that carry their own recipe, so any command can rebuild the model.

Layout of a run directory (`checkpoints/<recipe name>/` unless `-o`):

    step-00001000.safetensors          model weights + metadata (recipe, tokenizer, step, losses)
    step-00001000.trainer.safetensors  optimizer tensors, RNG and sampler state (for --resume)
    best.safetensors                   the weights with the lowest validation loss so far
    metrics.jsonl, loss.png            what the run measured

Weights are only ever read with safetensors: nothing here unpickles a file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llmcli.console import fail
from llmcli.recipe import Recipe, build_recipe

FORMAT = "llmcli-checkpoint/1"
CHECKPOINTS_DIR = Path("checkpoints")
STEP_RE = re.compile(r"^step-(\d+)\.safetensors$")


def step_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:08d}.safetensors"


def trainer_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name.replace(".safetensors", ".trainer.safetensors"))


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in a run directory, oldest first."""
    found = []
    for path in run_dir.glob("step-*.safetensors"):
        match = STEP_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_run(root: Path = CHECKPOINTS_DIR) -> Path | None:
    """The run directory under `root` with the most recently written checkpoint."""
    candidates = []
    for run_dir in root.glob("*/"):
        files = [p for _, p in step_checkpoints(run_dir)] + list(run_dir.glob("best.safetensors"))
        if files:
            candidates.append((max(p.stat().st_mtime for p in files), run_dir))
    return max(candidates)[1] if candidates else None


def resolve_checkpoint(spec: str | Path | None, root: Path = CHECKPOINTS_DIR) -> Path:
    """A checkpoint file from a file, a run directory (its latest step) or nothing (newest run)."""
    if spec is None:
        run_dir = latest_run(root)
        if run_dir is None:
            fail(f"no checkpoint given and none found under {root}/; train one first "
                 "(llm pretrain recipes/tiny.yaml) or pass a checkpoint path")
        spec = run_dir
    path = Path(spec)
    if path.is_dir():
        steps = step_checkpoints(path)
        if steps:
            return steps[-1][1]
        if (path / "best.safetensors").exists():
            return path / "best.safetensors"
        fail(f"{path}: no checkpoint in this directory (expected step-*.safetensors); "
             "give a run directory written by `llm pretrain` or a .safetensors file")
    if not path.exists():
        fail(f"{path}: checkpoint not found; give a .safetensors file or a run directory "
             f"such as {root}/tiny")
    if path.suffix != ".safetensors":
        fail(f"{path}: not a safetensors checkpoint; llm only loads .safetensors files "
             "(pickled .pt/.bin files are refused for safety)")
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata, decoded; a foreign or broken file is a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        fail(f"{path}: not a readable safetensors file ({exc}); was it fully written?")
    if raw.get("format") != FORMAT:
        fail(f"{path}: not an llm checkpoint (no '{FORMAT}' metadata); "
             "give a checkpoint written by `llm pretrain` or `llm finetune`")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def recipe_from_metadata(meta: dict[str, Any], where: str) -> Recipe:
    return build_recipe(meta["recipe"], where=f"{where} (stored recipe)")


def save_model(path: Path, model: Any, recipe: Recipe, **meta: Any) -> None:
    """Write weights and metadata atomically; values of `meta` are stored as JSON."""
    from safetensors.torch import save_model as st_save_model

    from llmcli.files import atomic_path

    metadata = {"format": FORMAT, "recipe": json.dumps({"name": recipe.name,
                                                        **recipe.to_dict()})}
    metadata.update({key: json.dumps(value) for key, value in meta.items()})
    with atomic_path(path) as tmp:
        st_save_model(unwrap(model), str(tmp), metadata=metadata)


def load_model(spec: str | Path | None, device: Any = "cpu"):
    """(model, recipe, metadata, path) from a checkpoint file, run directory or the newest run."""
    from safetensors.torch import load_model as st_load_model

    from llmcli.model.gpt import build_model

    path = resolve_checkpoint(spec)
    meta = read_metadata(path)
    if "lora" in meta:  # a LoRA adapter file: its base checkpoint with the adapter merged in
        return load_adapter(path, meta, device)
    recipe = recipe_from_metadata(meta, str(path))
    model = build_model(recipe.model, device=device)
    try:
        st_load_model(model, str(path), strict=True, device=str(device))
    except RuntimeError as exc:
        fail(f"{path}: weights do not match the stored recipe ({first_line(exc)})")
    model.eval()
    return model, recipe, meta, path


def unwrap(model: Any) -> Any:
    """The plain GPT under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Trainer state (for --resume): optimizer tensors, RNG and sampler state, next to the weights.

TRAINER_FORMAT = "llmcli-trainer/1"


def best_path(run_dir: Path) -> Path:
    return run_dir / "best.safetensors"


def save_trainer_state(path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Tensors in safetensors, the small non-tensor parts as JSON metadata; atomic."""
    from safetensors.torch import save_file

    from llmcli.files import atomic_path

    metadata = {"format": TRAINER_FORMAT}
    metadata.update({key: json.dumps(value) for key, value in meta.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_trainer_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, metadata) of a trainer state; a missing or foreign file is a one-line error."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        fail(f"{path}: trainer state not found, so this checkpoint cannot be resumed exactly; "
             "resume from a step-*.safetensors that has a .trainer.safetensors beside it")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        fail(f"{path}: not a readable trainer state ({exc}); was it fully written?")
    if raw.get("format") != TRAINER_FORMAT:
        fail(f"{path}: not an llm trainer state (no '{TRAINER_FORMAT}' metadata)")
    meta = {key: json.loads(value) for key, value in raw.items() if key != "format"}
    return tensors, meta


def resumable_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Step checkpoints whose trainer state is complete too, oldest first."""
    return [(s, p) for s, p in step_checkpoints(run_dir) if trainer_path(p).exists()]


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints (weights and trainer state)."""
    removed = []
    for _, path in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        for victim in (trainer_path(path), path):
            victim.unlink(missing_ok=True)
            removed.append(victim)
    return removed


# ---------------------------------------------------------------------------------------------
# LoRA adapter files: only the adapter tensors, plus metadata "lora" (its config) and "base" (the
# base checkpoint's path). `load_model` returns base + merged adapter, so every command that
# loads a model accepts an adapter file too.


def save_adapter(path: Path, model: Any, recipe: Recipe, **meta: Any) -> None:
    """Write a model's LoRA tensors and metadata atomically (meta must hold "lora" and "base")."""
    from safetensors.torch import save_file

    from llmcli.files import atomic_path
    from llmcli.model.lora import lora_state_dict

    metadata = {"format": FORMAT, "recipe": json.dumps({"name": recipe.name,
                                                        **recipe.to_dict()})}
    metadata.update({key: json.dumps(value) for key, value in meta.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(unwrap(model)).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_adapter(path: Path, meta: dict[str, Any], device: Any = "cpu"):
    """(base model with the adapter merged, adapter recipe, adapter metadata, path)."""
    from safetensors.torch import load_file

    from llmcli.model.lora import apply_lora, load_lora_state, merge_lora

    base = meta.get("base")
    if not base or not Path(base).is_file():
        fail(f"{path}: LoRA adapter whose base checkpoint {base!r} is missing; put the base "
             "back at that path, or use a merged checkpoint (llm finetune --merge ADAPTER)")
    model, base_recipe, _, _ = load_model(base, device)
    recipe = recipe_from_metadata(meta, str(path))
    if dataclasses_differ(recipe.model, base_recipe.model):
        fail(f"{path}: the adapter was trained on a model shaped unlike its base {base}; "
             "give the base checkpoint it was trained on")
    try:
        apply_lora(model, recipe.lora)
        load_lora_state(model, load_file(str(path), device=str(device)))
    except ValueError as exc:
        fail(f"{path}: adapter does not fit its base {base} ({first_line(exc)})")
    merge_lora(model)
    model.eval()
    return model, recipe, meta, path


def dataclasses_differ(a: Any, b: Any, ignore: tuple[str, ...] = ("dropout",)) -> bool:
    """Whether two configs differ in anything but `ignore` (dropout does not shape weights)."""
    import dataclasses

    return any(getattr(a, f.name) != getattr(b, f.name)
               for f in dataclasses.fields(a) if f.name not in ignore)
