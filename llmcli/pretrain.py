"""Pretraining set-up: recipe -> corpus -> vocabulary -> model -> the shared training loop.

`pretrain()` is what `llm pretrain` runs and `dry_run()` what `llm pretrain --dry-run` prints;
both are plain functions so tests and notebooks call them directly. Everything recipe-specific
(resolving `model.vocab_size: auto`, the compact vocabulary, batch sampling) happens here so
`llmcli/train/loop.py` stays one loop for pretraining and fine-tuning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcli.checkpoint import (
    check_resume_recipe,
    check_run_kind,
    claim_run_dir,
    default_run_dir,
    read_metadata,
)
from llmcli.console import fail, info, warn
from llmcli.data.batches import TokenWindows, check_ids, dense_lookup
from llmcli.data.vocab import CompactVocab
from llmcli.recipe import Recipe
from llmcli.train import distributed
from llmcli.train.loop import TrainResult, train

DATA_DIR = Path("data")
# What a resumed run cannot change: the batch streams continue from the saved state, and the
# split point is the token file's (see check_resume_recipe).
RESUME_FIXED = ("train.seed", "data.val_fraction")


@dataclass
class Corpus:
    """A tokenized corpus ready for sampling, and how the model's vocabulary maps onto it."""

    path: Path  # the .tokens file
    sidecar: dict[str, Any]
    tokens: np.ndarray  # read-only uint32 memmap
    val_start: int
    vocab: CompactVocab | None  # compact vocabulary, or None for the tokenizer's ids
    lookup: np.ndarray | None  # tokenizer id -> model id (compact only)
    unknown_val: int = 0  # validation tokens unseen in training (compact only)

    @property
    def train_tokens(self) -> int:
        return self.val_start

    @property
    def val_tokens(self) -> int:
        return len(self.tokens) - self.val_start


def load_corpus(recipe: Recipe, *, data_dir: Path = DATA_DIR,
                vocab_map: list[int] | None = None) -> tuple[Recipe, Corpus]:
    """Fetch/tokenize `data.source` as needed; return the recipe with vocab_size resolved.

    `vocab_map` (from a checkpoint being resumed) fixes the compact vocabulary instead of
    recomputing it from the corpus.
    """
    from llmcli.data.fetch import resolve_source
    from llmcli.data.tokenize import ensure_tokens, open_tokens, read_sidecar

    d = recipe.data
    sources = [resolve_source(item, data_dir) for item in d.sources]
    path = ensure_tokens(sources if len(sources) > 1 else sources[0], d.tokenizer,
                         d.val_fraction, cache_dir=data_dir)
    sidecar = read_sidecar(path)
    if sidecar.get("tokenizer") != d.tokenizer:
        fail(f"{path}: tokenized with {sidecar.get('tokenizer')}, but data.tokenizer is "
             f"{d.tokenizer}; set data.tokenizer={sidecar.get('tokenizer')} or re-tokenize")
    tokens = open_tokens(path)
    val_start = int(sidecar.get("val_start", len(tokens)))
    corpus = Corpus(path, sidecar, tokens, val_start, None, None)
    if d.vocab == "compact":
        recipe = _resolve_compact(recipe, corpus, vocab_map)
    else:
        recipe = _resolve_full(recipe, corpus)
    return recipe, corpus


def _resolve_full(recipe: Recipe, corpus: Corpus) -> Recipe:
    max_id = int(corpus.sidecar["max_id"])
    size = recipe.model.vocab_size
    if size == "auto":
        return _with_vocab(recipe, max_id + 1)
    if max_id >= size:
        fail(f"{corpus.path}: token id {max_id}{_describe_id(max_id, recipe)} is outside "
             f"model.vocab_size {size} (ids 0 to {size - 1}); set model.vocab_size=auto "
             f"(= {max_id + 1}), model.vocab_size={max(max_id + 1, _n_vocab(recipe))} for every "
             f"{recipe.data.tokenizer} id, or data.vocab=compact")
    return recipe


def _resolve_compact(recipe: Recipe, corpus: Corpus, vocab_map: list[int] | None) -> Recipe:
    if vocab_map is not None:
        vocab = CompactVocab(vocab_map)
    else:  # ids seen in the training part only: validation measures what unseen ids cost
        from llmcli.data.tokenizer import get_tokenizer
        from llmcli.data.vocab import compact_vocab

        tokenizer = get_tokenizer(recipe.data.tokenizer)
        vocab = compact_vocab(corpus.tokens[:corpus.val_start], tokenizer)
    size = recipe.model.vocab_size
    if size == "auto":
        recipe = _with_vocab(recipe, vocab.size)
    elif size < vocab.size:
        fail(f"model.vocab_size {size} is smaller than the compact vocabulary of "
             f"{corpus.path} ({vocab.size} ids: {len(vocab.ids)} distinct + 1 unknown); "
             "set model.vocab_size=auto")
    corpus.vocab = vocab
    corpus.lookup = dense_lookup(vocab.ids, vocab.unknown_id, int(corpus.sidecar["max_id"]))
    corpus.unknown_val = count_unknown(corpus.tokens, corpus.lookup, vocab.unknown_id,
                                       corpus.val_start, name=str(corpus.path))
    return recipe


def count_unknown(tokens: np.ndarray, lookup: np.ndarray, unknown_id: int, start: int = 0,
                  chunk: int = 1 << 22, name: str = "the token file") -> int:
    """How many tokens from `start` on map to the unknown id (in chunks: RSS stays flat)."""
    total = 0
    for lo in range(start, len(tokens), chunk):
        part = tokens[lo:lo + chunk]
        check_ids(part, len(lookup), name)
        total += int(np.count_nonzero(lookup[part] == unknown_id))
    return total


def _with_vocab(recipe: Recipe, size: int) -> Recipe:
    resolved = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model,
                                                                     vocab_size=size))
    resolved.provenance = dict(recipe.provenance)
    if recipe.model.vocab_size == "auto":
        resolved.provenance["model.vocab_size"] = (
            f"{recipe.provenance.get('model.vocab_size', 'default')}: auto from the corpus")
    return resolved


def _n_vocab(recipe: Recipe) -> int:
    from llmcli.data.tokenizer import get_tokenizer

    return int(get_tokenizer(recipe.data.tokenizer).n_vocab)


def _describe_id(token_id: int, recipe: Recipe) -> str:
    from llmcli.data.tokenizer import get_tokenizer

    try:
        if token_id == get_tokenizer(recipe.data.tokenizer).eot_id:
            return " (the end-of-text token between documents)"
    except Exception:  # the message is still right without the name
        return ""
    return ""


def make_batches(recipe: Recipe, corpus: Corpus, rank: int = 0) -> TokenWindows:
    t, m = recipe.train, recipe.model
    try:
        return TokenWindows(corpus.tokens, corpus.val_start, t.batch_size, m.context_length,
                            seed=t.seed, rank=rank, lookup=corpus.lookup,
                            limit=int(m.vocab_size), name=str(corpus.path))
    except ValueError as exc:
        fail(f"{corpus.path}: {exc}")


def extra_meta(recipe: Recipe, corpus: Corpus) -> dict[str, Any]:
    meta: dict[str, Any] = {"tokenizer": recipe.data.tokenizer, "corpus": corpus_digest(corpus)}
    if corpus.vocab is not None:
        meta["vocab_map"] = corpus.vocab.to_list()
    return meta


def corpus_digest(corpus: Corpus) -> str:
    """What the token file was made from (its sources' SHA-256s) and its length, as one short
    digest: a resume on other data is then told, not silently continued."""
    sources = sorted(str(s.get("sha256", "")) for s in corpus.sidecar.get("sources", []))
    text = json.dumps([sources, corpus.sidecar.get("num_tokens"), corpus.sidecar.get("tokenizer")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_resume_data(recipe: Recipe, meta: dict[str, Any], resume: Path) -> None:
    """The tokenizer and vocabulary kind a run was trained with are fixed: its ids mean nothing
    under another, so a recipe asking for others is refused (another corpus is only told, by
    `prepare`, once it is loaded)."""
    check_run_kind(resume, "pretrain", meta)
    check_resume_recipe(recipe, meta, resume, RESUME_FIXED)
    theirs = meta.get("tokenizer")
    if theirs is not None and theirs != recipe.data.tokenizer:
        fail(f"--resume {resume}: the run was trained with the {theirs} tokenizer, but "
             f"data.tokenizer is {recipe.data.tokenizer}; resume with data.tokenizer={theirs}, "
             "or start a new run elsewhere (-o DIR)")
    compact = meta.get("vocab_map") is not None
    if compact != (recipe.data.vocab == "compact"):
        was = "compact" if compact else "full"
        fail(f"--resume {resume}: the run was trained on a {was} vocabulary, but data.vocab is "
             f"{recipe.data.vocab}; resume with data.vocab={was}, or start a new run elsewhere")


def prepare(recipe: Recipe, dist: distributed.Dist, resume: Path | None,
            data_dir: Path = DATA_DIR) -> tuple[Recipe, Corpus]:
    """Corpus and resolved recipe. Rank 0 fetches/tokenizes first, then the first process of
    every other machine (which finds the files on a shared file system, or makes its own copy
    on a local one), then the rest: no two processes ever write the same file."""
    vocab_map = None
    meta: dict[str, Any] = {}
    if resume is not None:
        meta = read_metadata(resume)
        check_resume_data(recipe, meta, resume)
        vocab_map = meta.get("vocab_map")
    phases = (dist.is_main, dist.is_local_main and not dist.is_main, not dist.is_local_main)
    result = None
    for mine in phases:
        if mine:
            result = load_corpus(recipe, data_dir=data_dir, vocab_map=vocab_map)
        distributed.barrier(dist)
    assert result is not None
    before = meta.get("corpus")
    if before is not None and before != corpus_digest(result[1]) and dist.is_main:
        warn(f"the corpus is not the one {resume} was trained on (its text or tokens changed): "
             "training continues on the new data, so the run is no longer the one an "
             "uninterrupted run would have given")
        _warn_unknown_starts(result[0], result[1], resume)
    return result


def _warn_unknown_starts(recipe: Recipe, corpus: Corpus, resume: Path | None) -> None:
    """A run begun before documents began with the tokenizer's BOS has no id for it in its
    compact vocabulary: every document start of the remade corpus becomes the unknown id."""
    from llmcli.data.tokenizer import get_tokenizer

    starts = get_tokenizer(recipe.data.tokenizer).start_ids
    if corpus.vocab is None or not starts:
        return
    missing = [i for i in starts if corpus.vocab.to_dense([i])[1]]
    if missing:
        warn(f"{resume}: its compact vocabulary has no id for the tokenizer's start id(s) "
             f"{', '.join(map(str, missing))}, which now begin every document: each maps to "
             "the unknown id (start a new run to learn them)")


def finetune_keys(recipe: Recipe) -> list[str]:
    """The finetune.* and lora.* keys the recipe sets: `llm finetune`'s, unused by pretraining."""
    return [key for key, _, origin in recipe.rows()
            if key.split(".")[0] in ("finetune", "lora") and origin != "default"]


def check_pretrain_keys(recipe: Recipe) -> None:
    """A fine-tuning key typed on `llm pretrain`'s command line is a mistake: it would train a
    new model from scratch, with no base and no adapters, and say nothing."""
    unused = set(finetune_keys(recipe))
    typed = [item for key, item in recipe.override_items.items() if key in unused]
    if typed:
        fail(f"{typed[0]}: `llm pretrain` trains a new model from scratch and uses no "
             f"finetune.* or lora.* key; to fine-tune, run `llm finetune RECIPE "
             f"{' '.join(typed)}`")


def _warn_unused(recipe: Recipe) -> None:
    """Keys a pretraining run does not use, said: data.records (it reads every record of its
    sources) and the fine-tuning sections a recipe may carry for a later `llm finetune`."""
    if recipe.data.records is not None:
        warn(f"data.records {recipe.data.records!r} selects the records `llm finetune` uses; "
             "`llm pretrain` reads every record of data.source (drop the key, or cut the file)")
    unused = finetune_keys(recipe)
    if unused:
        warn(f"{', '.join(unused)}: `llm finetune`'s key(s), unused by `llm pretrain`, which "
             "trains a new model from scratch (fine-tune with `llm finetune RECIPE`)")


def pretrain(recipe: Recipe, *, run_dir: Path | None = None, resume: str | Path | bool | None =
             None, overwrite: bool = False, device: str = "auto",
             data_dir: Path = DATA_DIR) -> TrainResult:
    """Train the recipe's model on its corpus; checkpoints go to `run_dir`.

    `resume`: True / "latest" / "auto" / a checkpoint or run directory (see
    `llmcli.checkpoint.resolve_resume`); `overwrite` replaces an earlier run in `run_dir`.
    """
    from llmcli.device import resolve_device
    from llmcli.interop.tokenizer_store import keep_with_run
    from llmcli.model.count import count_parameters
    from llmcli.model.gpt import build_model
    from llmcli.train.state import seed_everything

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe)
    dist, dev = distributed.setup(resolve_device(device))
    try:
        with claim_run_dir(run_dir, resume=resume, overwrite=overwrite,
                           main=dist.is_main, kind="pretrain",
                           share=partial(distributed.from_main, info=dist)) as claim:
            resume_path = claim.resume
            recipe, corpus = prepare(recipe, dist, resume_path, data_dir)
            seed_everything(recipe.train.seed)
            model = build_model(recipe.model, dev)
            batches = make_batches(recipe, corpus, dist.rank)
            if dist.is_main:
                _warn_unused(recipe)
                total, _ = count_parameters(model)
                per_step = batches.tokens_per_batch * recipe.train.grad_accum * dist.world_size
                describe_run(recipe, corpus, total, per_step, run_dir, dev, dist, resume_path)

            def start() -> None:  # the earlier run goes only now that everything is loaded
                claim.start(corpus_inputs(recipe, corpus))
                if dist.is_main:
                    keep_with_run(recipe.data.tokenizer, run_dir)

            return train(recipe, model, batches, run_dir, device=dev, resume=resume_path,
                         extra_meta=extra_meta(recipe, corpus), before_start=start)
    finally:
        distributed.cleanup()


def corpus_inputs(recipe: Recipe, corpus: Corpus) -> list[tuple[str, Path]]:
    """What the run reads, which clearing its run directory must not delete."""
    return [("data.source", Path(s)) for s in recipe.data.sources] + [
        ("the token file", corpus.path)]


def describe_run(recipe: Recipe, corpus: Corpus, params: int, tokens_per_step: int,
                 run_dir: Path, device: torch.device, dist: distributed.Dist,
                 resume: Path | None) -> None:
    vocab = f"vocabulary {recipe.model.vocab_size:,}"
    if corpus.vocab is not None:
        vocab += (f" (compact: {len(corpus.vocab.ids):,} {recipe.data.tokenizer} ids: the "
                  "corpus's, end-of-text and the prompt templates'; + unknown)")
    procs = dist.describe(recipe.train.parallel)
    info(f"{recipe.name}: {params / 1e6:.2f}M parameters, {vocab}; corpus {corpus.path} "
         f"({corpus.train_tokens:,} train / {corpus.val_tokens:,} validation tokens); "
         f"{tokens_per_step:,} tokens/step on {device}{procs}; run directory {run_dir}")
    if corpus.unknown_val:
        share = corpus.unknown_val / max(1, corpus.val_tokens)
        info(f"validation: {corpus.unknown_val:,} tokens ({share:.2%}) never occur in the "
             "training part and map to the unknown id")
    if resume is not None:
        info(f"resuming from {resume}")


# ---------------------------------------------------------------------------------------------
# --dry-run


@dataclass
class DryRun:
    rows: list[tuple[str, Any, str]]  # (key, value, where it came from)
    params: int
    trainable: int
    memory: dict[str, dict[str, int]]
    tokens_per_step: int
    steps: int  # the steps the run will take: by max_iters, max_tokens or (measured) max_time
    total_tokens: int
    chinchilla_tokens: float
    corpus_tokens: int
    step_seconds: float | None
    device: str
    processes: int = 1  # a step takes a batch from each (DDP / FSDP)
    stopped_by: str = "max_iters"  # what ends the run: max_iters | max_tokens | max_time
    max_time: float | None = None  # train.max_time: seconds of training steps
    evaluations: int = 0  # at step 0, every eval_interval steps and at the end
    eval_batches: int = 0  # forward passes per evaluation: eval_iters for each split
    eval_batch_seconds: float | None = None  # measured, one eval batch (forward, no gradients)

    @property
    def eval_seconds(self) -> float | None:
        """Evaluation on top of the steps (max_time counts training steps alone)."""
        if self.eval_batch_seconds is None:
            return None
        return self.eval_batch_seconds * self.eval_batches * self.evaluations

    @property
    def eta_seconds(self) -> float | None:
        if self.step_seconds is None or self.eval_seconds is None:
            return None
        return self.step_seconds * self.steps + self.eval_seconds

    @property
    def stop_note(self) -> str:
        """Which limit ends the run, when it is not train.max_iters."""
        if self.stopped_by == "max_time":
            from llmcli.scaling import format_ratio

            return (f"; train.max_time={format_ratio(self.max_time or 0)} s stops it after "
                    f"about {self.steps:,} steps at the measured speed (training steps only: "
                    "evaluations come on top)")
        return "; train.max_tokens stops it" if self.stopped_by == "max_tokens" else ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rows"] = [{"key": k, "value": v, "origin": o} for k, v, o in self.rows]
        out["eval_seconds"] = self.eval_seconds
        out["eta_seconds"] = self.eta_seconds
        return out


@dataclass
class Speed:
    step: float  # seconds per optimizer step (grad_accum micro-batches, forward and backward)
    eval_batch: float  # seconds per evaluation batch (a forward pass without gradients)


def dry_run(recipe: Recipe, *, device: str = "auto", data_dir: Path = DATA_DIR,
            measure_steps: int = 2, processes: int = 1) -> DryRun:
    """Resolve everything a run would use and time a couple of steps, without writing a run.

    `processes`: the run's process count: a step then covers that many batches (the step
    time is one process's, measured here; the gradient exchange comes on top). The ETA adds
    the evaluations the run makes, timed on one batch of each split; train.max_time ends
    the steps where the measured speed says it would."""
    from llmcli.device import resolve_device
    from llmcli.model.count import count_parameters, training_memory
    from llmcli.model.gpt import build_model
    from llmcli.scaling import chinchilla_tokens
    from llmcli.train.schedule import total_steps, warmup_problem
    from llmcli.train.state import seed_everything

    dev = resolve_device(device)
    recipe, corpus = load_corpus(recipe, data_dir=data_dir)
    seed_everything(recipe.train.seed)
    model = build_model(recipe.model, dev)
    total, trainable = count_parameters(model)
    batches = make_batches(recipe, corpus)
    cfg = recipe.train
    tokens_per_step = batches.tokens_per_batch * cfg.grad_accum * processes
    steps = total_steps(cfg, tokens_per_step)
    problem = warmup_problem(cfg, steps)
    if problem:
        warn(problem)
    _warn_unused(recipe)
    speed = measure_speed(recipe, model, batches, dev, measure_steps)
    stopped_by = "max_tokens" if steps < cfg.max_iters else "max_iters"
    if speed is not None and cfg.max_time:
        timed = steps_within(cfg.max_time, speed.step)
        if timed < steps:
            steps, stopped_by = timed, "max_time"
    return DryRun(
        rows=recipe.rows(), params=total, trainable=trainable,
        memory=training_memory(total, trainable), tokens_per_step=tokens_per_step, steps=steps,
        total_tokens=steps * tokens_per_step, chinchilla_tokens=chinchilla_tokens(total),
        corpus_tokens=corpus.train_tokens, step_seconds=speed.step if speed else None,
        device=str(dev), processes=processes, stopped_by=stopped_by, max_time=cfg.max_time,
        evaluations=evaluations(steps, cfg.eval_interval), eval_batches=2 * cfg.eval_iters,
        eval_batch_seconds=speed.eval_batch if speed else None)


def steps_within(max_time: float, step_seconds: float) -> int:
    """Steps a run takes under train.max_time: it stops at the first step boundary at which its
    training steps (evaluations aside) have taken max_time seconds."""
    return max(1, math.ceil(max_time / step_seconds)) if step_seconds > 0 else 1


def evaluations(steps: int, interval: int) -> int:
    """Evaluations in a run of `steps` steps: at step 0, every `interval`, and at the last."""
    return steps // interval + 1 + (1 if steps % interval else 0)


def measure_speed(recipe: Recipe, model: torch.nn.Module, batches: TokenWindows,
                  device: torch.device, steps: int) -> Speed | None:
    """Seconds per optimizer step (one warm-up step, then the mean of `steps` timed ones) and
    per evaluation batch (an evaluation of one batch per split, after an untimed one)."""
    if steps <= 0:
        return None
    from llmcli.console import progress
    from llmcli.train.loop import Trainer

    one_batch = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train,
                                                                       eval_iters=1))
    with _scratch_dir() as scratch, progress(transient=True) as bar:
        task = bar.add_task("warm-up step", total=steps + 3)
        trainer = Trainer(one_batch, model, batches, scratch, device, None, None)
        trainer.metrics.enabled = False
        net = trainer.training_net()
        model.train()
        trainer.train_step(net)
        _sync(device)
        bar.update(task, advance=1, description="timing steps")
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(net)
            bar.update(task, advance=1)
        _sync(device)
        step = (time.perf_counter() - start) / steps
        bar.update(task, description="timing an evaluation")
        trainer.evaluate(net)
        bar.update(task, advance=1)
        _sync(device)
        start = time.perf_counter()
        trainer.evaluate(net)  # one batch of each split
        _sync(device)
        eval_batch = (time.perf_counter() - start) / 2
        bar.update(task, advance=1)
    return Speed(step, eval_batch)


def _scratch_dir() -> Any:
    import tempfile

    class _Dir(tempfile.TemporaryDirectory):
        def __enter__(self) -> Path:  # type: ignore[override]
            return Path(super().__enter__())

    return _Dir(prefix="llm-dry-run-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
