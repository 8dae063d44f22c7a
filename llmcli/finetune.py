"""Fine-tuning: recipe → base checkpoint → instruction data → LoRA or full → the shared loop.

The fine-tuned model keeps its base's shape, tokenizer and vocabulary (a recipe that says
otherwise is refused, key by key); only the data (Alpaca records, see `data/instruct.py`) and
the trainable parameters differ from pretraining. Checkpoints carry the prompt template
("template") so `llm generate --instruct` asks questions the way training did. LoRA runs write
small adapter files (metadata "lora" and "base"); `merge_adapter` turns one into a full
checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcli.checkpoint import (
    MERGED_NAME,
    VANISHED_RETRIES,
    Checkpoint,
    base_reference,
    check_resume_recipe,
    check_run_kind,
    claim_run_dir,
    default_run_dir,
    load_model,
    raw_metadata,
    read_metadata,
    record_dependent,
    resolve_checkpoint,
    save_adapter,
    save_model,
)
from llmcli.console import UserError, fail, info, warn
from llmcli.data.instruct import (
    InstructBatches,
    ModelVocab,
    answer_end,
    build_rows,
    encode_records,
    split_examples,
)
from llmcli.data.templates import resolve_template
from llmcli.recipe import ModelConfig, Recipe, parse_records
from llmcli.train import distributed
from llmcli.train.loop import TrainResult, train

RECORD_SUFFIXES = (".json", ".jsonl")
# What a resumed run cannot change: they make the rows and the split, and the saved sampler
# state walks the saved rows (see check_resume_recipe).
RESUME_FIXED = ("train.seed", "data.val_fraction", "data.records", "finetune.template",
                "finetune.packing")


@dataclass
class FinetuneRun:
    """What a fine-tuning run did, for the command to print."""

    result: TrainResult
    run_dir: Path
    base: Path
    trainable: int
    total: int
    lora: bool
    merged: Path | None = None


@dataclass
class Prepared:
    """Everything set up before the loop starts (also what the tests inspect)."""

    recipe: Recipe
    model: torch.nn.Module
    batches: InstructBatches
    base: Path
    extra_meta: dict[str, Any]
    lora: bool
    inputs: list[tuple[str, Path]] = dataclasses.field(default_factory=list)  # what it reads


# ---------------------------------------------------------------------------------------------
# Set-up


def reconcile(recipe: Recipe, base: Recipe, base_meta: dict[str, Any], where: str) -> Recipe:
    """The fine-tune recipe with the base's model section, tokenizer and vocabulary.

    Keys the recipe leaves at their defaults are taken from the base; keys it sets must agree
    with the base (model.dropout may change: it shapes no weight).
    """
    explicit = {f.name: getattr(recipe.model, f.name) for f in dataclasses.fields(ModelConfig)
                if recipe.provenance.get(f"model.{f.name}", "default") != "default"}
    if explicit.get("vocab_size") == "auto":  # 'from the data' means the base's here
        del explicit["vocab_size"]
    wanted = dataclasses.replace(base.model, **explicit)
    for f in dataclasses.fields(ModelConfig):
        mine, theirs = getattr(wanted, f.name), getattr(base.model, f.name)
        if f.name == "ffn_hidden":
            mine, theirs = wanted.ffn_width, base.model.ffn_width
        if f.name != "dropout" and mine != theirs:
            origin = recipe.provenance.get(f"model.{f.name}")
            fail(f"model.{f.name}: {mine!r} ({'override' if origin == 'override' else where}) "
                 f"conflicts with the base checkpoint's {theirs!r}; fine-tuning keeps the base "
                 f"model's shape: remove the key or set it to {theirs!r}")
    tokenizer = base_meta.get("tokenizer") or base.data.tokenizer
    vocab = "compact" if base_meta.get("vocab_map") is not None else "full"
    for key, theirs in (("tokenizer", tokenizer), ("vocab", vocab)):
        mine = getattr(recipe.data, key)
        if recipe.provenance.get(f"data.{key}", "default") != "default" and mine != theirs:
            fail(f"data.{key}: {mine!r} conflicts with the base checkpoint's {theirs!r}; a "
                 "fine-tune uses its base's vocabulary: remove the key or set it to "
                 f"{theirs!r}")
    out = dataclasses.replace(recipe, model=wanted,
                              data=dataclasses.replace(recipe.data, tokenizer=tokenizer,
                                                       vocab=vocab))
    out.provenance = dict(recipe.provenance)
    return out


def records_path(recipe: Recipe) -> Path:
    """data.source as a local Alpaca .json/.jsonl file (downloaded first when it is a preset)."""
    from llmcli.data.fetch import resolve_source

    if len(recipe.data.sources) > 1:
        fail(f"data.source: {recipe.data.source}: fine-tuning reads one records file; give one "
             ".json/.jsonl file (or join the records into one)")
    path = Path(resolve_source(recipe.data.sources[0]))
    if path.is_dir() or path.suffix.lower() not in RECORD_SUFFIXES:
        fail(f"data.source: {path} is not instruction records; fine-tuning reads an Alpaca-style "
             ".json array or .jsonl file of {instruction, input, output} records, e.g. "
             "data.source=../shared/data/alpaca_en_demo.json")
    return path


def base_checkpoint(recipe: Recipe, resume: Path | None,
                    saved: dict[str, Any] | None = None) -> Path:
    """The checkpoint fine-tuning starts from: finetune.init, or on a resume the base the run
    started on (as it recorded it: a run directory named again may hold newer steps by now).
    finetune.init may name that base again (its file or its run directory), or hold the same
    bytes elsewhere (it moved), but not another one: a LoRA resume would silently keep its own,
    a full one would record the wrong base. A full fine-tune's recorded base may be gone (its
    checkpoints hold every weight); a LoRA one's is checked present and unchanged."""
    started = _started_base(resume, saved) if resume is not None and saved else None
    init = recipe.finetune.init
    if started is None:
        if not init:
            fail("finetune.init: no base checkpoint; set it in the recipe or on the command "
                 "line, e.g. finetune.init=checkpoints/tiny")
        return resolve_checkpoint(init)
    assert resume is not None and saved is not None
    if init and not _names(init, started):
        return _moved_base(init, started, resume, saved)
    if "lora" in saved:
        return Checkpoint.read(resume).base_path  # present, and the same bytes
    return started


def _moved_base(init: str, started: Path, resume: Path, saved: dict[str, Any]) -> Path:
    """finetune.init on a resume that names another path than the recorded base: that base
    moved when it holds the same bytes (the SHA-256 the run recorded); else refused."""
    from llmcli.files import sha256_file

    given = Path(init)
    same_name = given / started.name
    candidate = same_name if given.is_dir() and same_name.is_file() else resolve_checkpoint(init)
    want = saved.get("base_sha256")
    if isinstance(want, str) and sha256_file(candidate) == want:
        return candidate
    shown = os.path.normpath(started)
    fail(f"finetune.init: {init} is not the base {resume} was fine-tuned from ({shown}): "
         f"neither that path nor the same bytes; a resumed run keeps its base: resume with "
         f"finetune.init={shown} (or its new place, if it moved), or start a new run "
         "elsewhere (-o DIR)")


def _load_base(recipe: Recipe, resume: Path | None, saved: dict[str, Any] | None,
               user_dir: Path | None) -> tuple[Path, Any, Recipe, dict[str, Any]]:
    """The base model, from a run directory that may still be training and pruning its older
    steps: marked as the base of `user_dir`'s adapters before it is read (so that run keeps
    it), and picked again if it vanished in between. A full fine-tune's resume reads no base:
    its own checkpoint holds every weight, the shape and the vocabulary (the loop loads it)."""
    if saved is not None and resume is not None and "lora" not in saved:
        base_path = base_checkpoint(recipe, resume, saved)
        own = Checkpoint.read(resume)
        from llmcli.model.gpt import build_model

        return base_path, build_model(own.recipe.model), own.recipe, own.meta
    for attempt in range(VANISHED_RETRIES):
        base_path = base_checkpoint(recipe, resume, saved)
        if user_dir is not None:
            record_dependent(base_path, user_dir)
        try:
            model, base_recipe, base_meta, _ = load_model(base_path, "cpu")
        except UserError:
            if base_path.exists() or attempt == VANISHED_RETRIES - 1:
                raise
            continue
        return base_path, model, base_recipe, base_meta
    raise AssertionError("unreachable")


def _started_base(resume: Path, saved: dict[str, Any]) -> Path | None:
    """The base a fine-tuning checkpoint records (see checkpoint.base_reference)."""
    stored = saved.get("base")
    if not isinstance(stored, str) or not stored:
        return None
    base = Path(stored)
    return base if base.is_absolute() else resume.parent / base


def _names(init: str, base: Path) -> bool:
    """Whether finetune.init names `base`: the file itself, or the run directory holding it
    (either may be gone: a full fine-tune resumes without its base)."""
    try:
        given, wanted = Path(init).resolve(), base.resolve()
    except (OSError, RuntimeError):  # a symlink loop: it names nothing
        return False
    return given in (wanted, wanted.parent)


def prepare(recipe: Recipe, *, run_dir: Path | None = None, resume: Path | None = None,
            strict: bool = False, rank: int = 0, main: bool = True) -> Prepared:
    """Load the base, encode the records, build the batches and set the trainable parameters."""
    from llmcli.data.records import read_records
    from llmcli.data.tokenizer import get_tokenizer
    from llmcli.model.gpt import build_model
    from llmcli.model.lora import apply_lora, lora_meta

    say = info if main else _quiet
    saved = read_metadata(resume) if resume is not None else None
    if saved is not None:
        check_run_kind(resume, "finetune", saved)
        check_resume_recipe(recipe, saved, resume, RESUME_FIXED)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe)
    lora = recipe.lora.rank > 0
    # the base's own run must not prune what these adapters load onto
    base_path, model, base_recipe, base_meta = _load_base(
        recipe, resume, saved, run_dir if lora and main else None)
    if not base_path.exists() and main:
        info(f"the base {base_path} is gone; {resume} holds every weight, so the full "
             "fine-tune resumes without it")
    recipe = reconcile(recipe, base_recipe, base_meta, recipe.path or "recipe")
    if recipe.model.dropout != base_recipe.model.dropout:  # same weights, new dropout modules
        weights = model.state_dict()
        model = build_model(recipe.model)
        model.load_state_dict(weights)
    model.requires_grad_(True)  # an adapter loaded as a base comes back frozen
    template = resolve_template(recipe.finetune.template)

    tokenizer = get_tokenizer(recipe.data.tokenizer)
    vocab = ModelVocab(int(recipe.model.vocab_size), base_meta.get("vocab_map"))
    _, stop = answer_end(tokenizer, vocab)
    if stop and main:
        fix = ("a corpus of several documents puts it in a compact vocabulary"
               if vocab.compact is not None else
               f"pretrain with model.vocab_size={tokenizer.n_vocab} to have it")
        warn(f"the base model's vocabulary ({vocab.vocab_size:,} ids) has no end-of-text token "
             f"(id {tokenizer.eot_id:,}): answers end with the text {stop!r} instead, stored "
             f"as the checkpoint's stop string ({fix})")

    source = records_path(recipe)
    records = read_records(source)
    span = parse_records(recipe.data.records) if recipe.data.records else None
    ctx = recipe.model.context_length
    examples, report = encode_records(
        records, tokenizer, vocab, template=template, context_length=ctx, records_range=span,
        train_on_prompt=recipe.finetune.train_on_prompt, strict=strict, source=source)
    say(f"{source}: {report.summary()}")
    for line in report.warnings(ctx) if main else []:
        warn(line)
    if report.unknown_tokens > 0.5 * max(report.tokens, 1):
        fail(f"{source}: most tokens ({report.unknown_tokens:,} of {report.tokens:,}) are not in "
             f"the base model's compact vocabulary, so there is little to learn; fine-tune a "
             "base pretrained on similar text, with data.vocab=full or data.tokenizer=bytes")
    train_ex, val_ex = split_examples(examples, recipe.data.val_fraction, recipe.train.seed,
                                      source)
    packing = recipe.finetune.packing
    splits = {"train": build_rows(train_ex, ctx, packing), "val": build_rows(val_ex, ctx, packing)}
    batches = InstructBatches(splits, recipe.train.batch_size, seed=recipe.train.seed, rank=rank)
    say(f"{len(train_ex):,} training and {len(val_ex):,} held-out records → "
        f"{batches.rows('train'):,} + {batches.rows('val'):,} rows of {ctx} tokens "
        f"({'packed' if packing else 'padded'}); {report.target_tokens:,} answer tokens")

    digest = rows_digest(splits)
    if saved is not None and saved.get("rows_digest", digest) != digest and main:
        warn(f"the records are not the ones {resume} was trained on (their text, order or "
             "encoding changed): training continues on the new rows, so the run is no longer "
             "the one an uninterrupted run would have given")

    # a resume keeps the base it recorded, which may have moved (the same bytes) or gone
    known = saved.get("base_sha256") if saved is not None else None
    extra_meta: dict[str, Any] = {"tokenizer": recipe.data.tokenizer, "template": template,
                                  "rows_digest": digest,
                                  **base_reference(run_dir, base_path, sha256=known)}
    if base_meta.get("vocab_map") is not None:
        extra_meta["vocab_map"] = base_meta["vocab_map"]
    if stop:
        extra_meta["stop"] = [stop]
    if lora:
        torch.manual_seed(recipe.train.seed)  # the adapters' A matrices start the same each run
        try:
            apply_lora(model, recipe.lora)
        except ValueError as exc:
            fail(f"lora: {exc}")
        extra_meta["lora"] = lora_meta(recipe.lora)
    inputs = [("finetune.init", base_path), ("data.source", source)]
    return Prepared(recipe, model, batches, base_path, extra_meta, lora, inputs)


def rows_digest(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """The encoded rows and masks of both splits as one short digest: a resume on other
    records (even as many) is then told, as pretraining's corpus digest tells other text."""
    h = hashlib.sha256()
    for name in sorted(splits):
        for part in splits[name]:
            h.update(name.encode())
            h.update(str(part.shape).encode())
            h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def finetune(recipe: Recipe, *, run_dir: Path | None = None, device: str = "auto",
             resume: str | Path | bool | None = None, overwrite: bool = False,
             strict: bool = False, merge: bool = False) -> FinetuneRun:
    """Fine-tune as the recipe says; returns what happened (see FinetuneRun)."""
    from llmcli.device import resolve_device
    from llmcli.interop.tokenizer_store import keep_with_run
    from llmcli.model.count import count_parameters

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe)
    dist, dev = distributed.setup(resolve_device(device))
    try:
        with claim_run_dir(run_dir, resume=resume, overwrite=overwrite,
                           main=dist.is_main, kind="finetune",
                           share=partial(distributed.from_main, info=dist)) as claim:
            resume_path = claim.resume
            prep = prepare(recipe, run_dir=run_dir, resume=resume_path, strict=strict,
                           rank=dist.rank, main=dist.is_main)
            total, trainable = count_parameters(prep.model)
            if dist.is_main:
                kind = f"LoRA rank {prep.recipe.lora.rank}" if prep.lora else "full fine-tuning"
                source = (prep.base if Path(prep.base).exists() else
                          f"its own checkpoint (its base {prep.base} is gone)")
                info(f"{kind}: training {trainable:,} of {total:,} parameters "
                     f"({trainable / total:.2%}) from {source} on {dev}"
                     f"{dist.describe(prep.recipe.train.parallel)}; run directory {run_dir}")
                if resume_path is not None:
                    info(f"resuming from {resume_path}")

            save_weights = None
            if prep.lora:
                def save_weights(path: Path, model: Any, meta: dict) -> None:
                    save_adapter(path, model, prep.recipe, **meta)

            def start() -> None:  # the earlier run goes only now that everything is loaded
                claim.start(prep.inputs)
                if dist.is_main:
                    keep_with_run(prep.recipe.data.tokenizer, run_dir)

            result = train(prep.recipe, prep.model, prep.batches, run_dir, device=dev,
                           resume=resume_path, save_weights=save_weights,
                           extra_meta=prep.extra_meta, base=prep.base, before_start=start)
            run = FinetuneRun(result, run_dir, prep.base, trainable, total, prep.lora)
            if merge and dist.is_main:
                if not prep.lora:
                    info("--merge: a full fine-tune's checkpoints are already complete models")
                else:  # a resume already at its last step wrote nothing: merge what it holds
                    adapter = result.checkpoint or resume_path
                    if adapter is None:
                        fail(f"--merge: {run_dir} has no adapter to merge (no step was "
                             "trained); raise train.max_iters")
                    run.merged = merge_adapter(adapter, run_dir / MERGED_NAME)
            return run
    finally:
        distributed.cleanup()


# ---------------------------------------------------------------------------------------------
# Merging


def merge_adapter(adapter: str | Path, out: str | Path | None = None) -> Path:
    """Write base + adapter as one full checkpoint (default: merged.safetensors beside it)."""
    path = resolve_checkpoint(adapter)
    if not Checkpoint.read(path).is_adapter:
        fail(f"{path}: not a LoRA adapter (no 'lora' metadata); only adapter files are merged, "
             "full checkpoints already hold every weight")
    target = Path(out) if out is not None else path.parent / MERGED_NAME
    if target.is_dir():
        target = target / MERGED_NAME
    if target.suffix != ".safetensors":
        fail(f"-o {target}: the merged checkpoint is a .safetensors file; give a name ending in "
             ".safetensors or an existing directory (merged.safetensors goes in it)")
    if target.exists():
        _check_replaceable(target, path)
    model, recipe, meta, _ = load_model(path, "cpu")
    dropped = ("format", "recipe", "lora", "base", "base_sha256", "save_id")
    kept = {k: v for k, v in meta.items() if k not in dropped}
    # relative to the merged file, as an adapter names its base: the run can move as a whole
    kept["merged_from"] = os.path.relpath(path.resolve(), target.parent.resolve())
    recipe = dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, rank=0))
    save_model(target, model, recipe, **kept)
    return target


def _check_replaceable(target: Path, adapter: Path) -> None:
    """A merge replaces only an earlier merge of the same run's adapters (a newer step merged
    over an older one); another run's merge, or any other weights, are refused."""
    import json

    stored = raw_metadata(target).get("merged_from")
    if stored is None:
        fail(f"-o {target}: exists and is not an earlier merge (a run's checkpoint?); "
             "merging never replaces other weights: give a new file name")
    try:
        source = Path(json.loads(stored))
    except (json.JSONDecodeError, TypeError):
        source = Path(stored)
    # recorded relative to the merged file (older merges: to the folder they were run from)
    named = [source] if source.is_absolute() else [target.parent / source, source]
    run = adapter.resolve().parent
    if not any(_resolved(p).parent == run for p in named):
        fail(f"-o {target}: is the merge of {os.path.normpath(named[0])}, another run's "
             f"adapter; merging {adapter} replaces only a merge of its own run: give -o "
             "another file")


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: matches nothing
        return path


def _quiet(message: str) -> None:
    pass
